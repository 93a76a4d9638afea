"""Model loading: bundled configs, configs as JSON files, and the missing-weights error."""
import json
import socket

import pytest
import torch

from dynaprompt.model import ModelSpec, WeightsNotFoundError, load_clip


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test at once."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_missing_hub_weights_fail_at_once_naming_what_was_tried(no_network, tmp_path):
    spec = ModelSpec(arch="ViT-B-16", pretrained="openai", cache_dir=str(tmp_path), device="cpu")
    with pytest.raises(WeightsNotFoundError) as error:
        load_clip(spec)
    message = str(error.value)
    for expected in ("ViT-B-16", "openai", "timm/vit_base_patch16_clip_224.openai", str(tmp_path), "HF_HUB_OFFLINE=1"):
        assert expected in message


def test_missing_local_weights_file_is_named(no_network, tmp_path):
    missing = tmp_path / "weights.safetensors"
    with pytest.raises(WeightsNotFoundError, match="weights.safetensors"):
        load_clip(ModelSpec(arch="tiny-clip", pretrained=str(missing), device="cpu"))


def test_unknown_tag_lists_the_known_ones(no_network):
    with pytest.raises(WeightsNotFoundError, match="known"):
        load_clip(ModelSpec(arch="ViT-B-16", pretrained="no-such-tag", device="cpu"))


def test_unknown_arch_is_named():
    with pytest.raises(ValueError, match="ViT-Z-99"):
        load_clip(ModelSpec(arch="ViT-Z-99", device="cpu"))


def test_local_weights_file_round_trip(tmp_path, clip):
    path = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = load_clip(ModelSpec(arch="tiny-clip", pretrained=str(path), init_seed=99, device="cpu"))
    assert loaded.weights == str(path)
    for (name, a), (_, b) in zip(clip.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_model_config_given_as_a_json_file(tmp_path):
    config = json.loads((__import__("dynaprompt").model.BUNDLED_CONFIGS / "tiny-clip.json").read_text())
    config["vision_cfg"]["layers"] = 1
    config["text_cfg"]["layers"] = 1
    path = tmp_path / "one-layer-clip.json"
    path.write_text(json.dumps(config))
    loaded = load_clip(ModelSpec(arch=str(path), device="cpu"))
    assert len(loaded.model.transformer.resblocks) == 1
    assert loaded.image_size == 32


def test_random_weights_are_seeded_and_frozen(clip):
    again = load_clip(ModelSpec(arch="tiny-clip", init_seed=0, device="cpu"))
    assert torch.equal(again.model.token_embedding.weight, clip.model.token_embedding.weight)
    assert not any(p.requires_grad for p in again.model.parameters())
