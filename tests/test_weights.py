"""Random ViT-B/16 weights written in every form users have, each loaded by `load_clip` and checked to give the same
features; OpenAI's checkpoints get QuickGELU whatever the arch's name says; an arch that contradicts the weights
stops with one message naming both."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dynaprompt.model import ModelSpec, WeightsMismatchError, load_clip, weights_format

pytestmark = pytest.mark.slow
HUB_REPO = "models--timm--vit_base_patch16_clip_224.openai"


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """The source model (QuickGELU, random weights) and its weights in five files."""
    import open_clip

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    source = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).eval()
    with torch.no_grad():  # OpenAI's checkpoints hold fp16 values (its loader converts through fp16)
        for tensor in source.state_dict().values():
            tensor.copy_(tensor.half().float())
    state = {k: v.contiguous() for k, v in source.state_dict().items() if k != "attn_mask"}
    torch.jit.script(state_holder(state)).save(str(root / "ViT-B-16.pt"))  # as OpenAI ships it: TorchScript
    openai = {**state, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(49408)}
    torch.save(openai, root / "openai-state-dict.pt")  # OpenAI's module's state dict
    torch.save(state, root / "open_clip-state-dict.pt")
    save_file(state, str(root / "ViT-B-16.safetensors"))
    snapshot = root / "hub" / HUB_REPO / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "open_clip_model.safetensors"))
    (snapshot / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {**open_clip.get_model_config("ViT-B-16"), "quick_gelu": True}}))
    (root / "hub" / HUB_REPO / "refs").mkdir()
    (root / "hub" / HUB_REPO / "refs" / "main").write_text("0123abcd")
    return source, root


class Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def state_holder(state: dict) -> torch.nn.Module:
    """A scriptable module whose state dict is `state` under the same dotted names (OpenAI's archive keeps the
    attention mask as a plain attribute, so it is not among them)."""
    root = Holder()
    for key, value in state.items():
        if key == "attn_mask":
            continue
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, Holder())
            module = getattr(module, part)
        module.register_buffer(leaf, value.clone())
    return root


def features(model, tokenizer):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 224, 224, generator=generator)
    with torch.no_grad():
        return (model.encode_image(images, normalize=True),
                model.encode_text(tokenizer(["a photo of a dog.", "a photo of a cat."]), normalize=True))


@pytest.mark.parametrize("form, spec, fmt", [
    ("torchscript", {"arch": "ViT-B-16", "pretrained": "ViT-B-16.pt"}, "torchscript"),
    ("openai state dict", {"arch": "ViT-B-16", "pretrained": "openai-state-dict.pt"}, "openai"),
    ("hub cache", {"arch": "ViT-B-16", "pretrained": "openai", "cache_dir": "hub"}, "open_clip"),
    ("safetensors", {"arch": "ViT-B-16", "pretrained": "ViT-B-16.safetensors", "quick_gelu": True}, "open_clip"),
    ("state dict .pt", {"arch": "ViT-B-16-quickgelu", "pretrained": "open_clip-state-dict.pt"}, "open_clip"),
])
def test_every_form_loads_the_same_model(forms, form, spec, fmt, monkeypatch):
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, root = forms
    spec = {**spec, "pretrained": spec["pretrained"] if spec["pretrained"] == "openai"
            else str(root / spec["pretrained"])}
    if "cache_dir" in spec:
        spec["cache_dir"] = str(root / spec["cache_dir"])
    clip = load_clip(ModelSpec(**spec, device="cpu"))
    assert clip.activation == "QuickGELU" and clip.weights_format == fmt, form
    expected = features(source, open_clip.get_tokenizer("ViT-B-16"))
    for got, want in zip(features(clip.model, clip.tokenizer), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_formats_are_told_apart(forms):
    _, root = forms
    assert weights_format(root / "ViT-B-16.pt") == "torchscript"
    assert weights_format(root / "openai-state-dict.pt") == "openai"
    assert weights_format(root / "open_clip-state-dict.pt") == "open_clip"
    assert weights_format(root / "ViT-B-16.safetensors") == "open_clip"


def test_an_open_clip_file_under_a_gelu_arch_says_so_and_differs(forms, capsys):
    source, root = forms
    clip = load_clip(ModelSpec(arch="ViT-B-16", pretrained=str(root / "ViT-B-16.safetensors"), device="cpu"))
    assert clip.activation == "GELU"
    assert "GELU activations (the config of 'ViT-B-16')" in capsys.readouterr().out
    import open_clip

    got, want = features(clip.model, clip.tokenizer)[0], features(source, open_clip.get_tokenizer("ViT-B-16"))[0]
    assert not torch.allclose(got, want, atol=1e-3)  # why OpenAI weights need QuickGELU


@pytest.mark.parametrize("weights", ["ViT-B-16.pt", "ViT-B-16.safetensors"])
def test_an_arch_that_contradicts_the_weights_names_both(forms, weights):
    _, root = forms
    with pytest.raises(WeightsMismatchError) as error:
        load_clip(ModelSpec(arch="ViT-B-32", pretrained=str(root / weights), device="cpu"))
    assert "ViT-B-32" in str(error.value) and weights in str(error.value)
