"""Loading a frozen CLIP from open_clip: a named architecture, a config given as data, local or cached weights."""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import open_clip
import torch

from .blocks import use_lean_blocks
from .specs import ModelSpec  # noqa: F401  (defined with the other params blocks; re-exported here)

BUNDLED_CONFIGS = Path(__file__).parent / "model_configs"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_registered_config_paths: set[Path] = set()


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for and cannot be had without a download."""


@dataclass
class LoadedClip:
    """A frozen CLIP with what the methods need around it."""

    model: torch.nn.Module
    tokenizer: object
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    device: torch.device
    weights: str  # what was loaded, for run metadata: a path, or "random(seed)"
    activation: str = "GELU"  # GELU or QuickGELU (OpenAI's models)
    weights_format: str = "random"  # torchscript | openai | open_clip | random


def resolve_device(name: str) -> torch.device:
    """Map 'auto' to cuda when present, else cpu; a CUDA device that is not there is one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count or count == 0:
            raise ValueError(f"model.device is {name!r} but torch sees {count} CUDA device(s) "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                             "set model.device to cpu or auto")
    return device


def located(path: str | Path, base_dir: str | Path | None) -> Path:
    """`path` with `~` expanded and, when relative, taken from `base_dir` (the params file's folder; None: the
    working directory, for specs built in code)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def locate_files(spec: ModelSpec, base_dir: str | Path | None) -> ModelSpec:
    """`spec` with its paths (a JSON arch, a weights file, the cache folder) taken from `base_dir`; tags and names
    stay as they are. The spec as written (relative) is what fingerprints see; this copy is only for loading."""
    arch = str(located(spec.arch, base_dir)) if spec.arch.endswith(".json") else spec.arch
    pretrained = spec.pretrained
    if pretrained and _looks_like_path(pretrained):
        pretrained = str(located(pretrained, base_dir))
    cache_dir = str(located(spec.cache_dir, base_dir)) if spec.cache_dir else spec.cache_dir
    return replace(spec, arch=arch, pretrained=pretrained, cache_dir=cache_dir)


def register_arch(arch: str, base_dir: str | Path | None = None) -> str:
    """Make `arch` known to open_clip (bundled or JSON-file configs, a relative file taken from `base_dir`) and
    return its registry name."""
    if BUNDLED_CONFIGS not in _registered_config_paths:
        open_clip.add_model_config(BUNDLED_CONFIGS)
        _registered_config_paths.add(BUNDLED_CONFIGS)
    if arch.endswith(".json"):
        path = located(arch, base_dir).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path} (model.arch in params)")
        if path not in _registered_config_paths:
            open_clip.add_model_config(path)
            _registered_config_paths.add(path)
        return path.stem
    if open_clip.get_model_config(arch) is None:
        raise ValueError(
            f"unknown model.arch {arch!r}: not an open_clip model, not in {BUNDLED_CONFIGS}, "
            "and not a path to a .json model config"
        )
    return arch


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES)


def _cached_hub_file(cfg: dict, cache_dir: str | None) -> str | None:
    """Path of the tag's weights if a hub or URL download already sits in a local cache."""
    from huggingface_hub import try_to_load_from_cache

    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        candidates = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename:
            stem = filename.rsplit(".", 1)[0]
            candidates = [f"{stem}.safetensors", filename]
        for name in candidates:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url", "")
    if url:
        url_cache = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        if url_cache.is_file():
            return str(url_cache)
    return None


def _missing_weights_message(spec: ModelSpec, name: str, tried: list[str]) -> str:
    return (
        f"No weights for model.arch={name!r} model.pretrained={spec.pretrained!r}. Tried: "
        + "; ".join(tried)
        + ". Supply them one of these ways: set model.pretrained to a local weights file "
        "(OpenAI's ~/.cache/clip/ViT-B-16.pt as it is, or /data/ViT-B-16.safetensors, with model.quick_gelu: true "
        "for OpenAI weights converted to open_clip's format); "
        "or populate a Hugging Face cache where there is network (huggingface-cli download <repo>) "
        "and point model.cache_dir at it, running with HF_HUB_OFFLINE=1; "
        "or set model.allow_download: true on a machine with network access."
    )


def resolve_weights(spec: ModelSpec, name: str) -> tuple[str | None, dict]:
    """Turn `pretrained` into a local file (or None for random weights) without touching the network."""
    if not spec.pretrained:
        return None, {}
    if _looks_like_path(spec.pretrained):
        path = Path(spec.pretrained).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(_missing_weights_message(spec, name, [f"local file {path} (missing)"]))
        return str(path), {}
    cfg = open_clip.get_pretrained_cfg(name, spec.pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise WeightsNotFoundError(
            _missing_weights_message(
                spec, name, [f"tag {spec.pretrained!r} is not a known open_clip tag for {name} (known: {tags})"]
            )
        )
    extra = {"force_quick_gelu": bool(cfg.get("quick_gelu", False))}
    for key, kwarg in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation")):
        if key in cfg:
            extra[kwarg] = cfg[key]
    cached = _cached_hub_file(cfg, spec.cache_dir)
    if cached:
        return cached, extra
    if spec.allow_download:
        return open_clip.download_pretrained(cfg, cache_dir=spec.cache_dir), extra
    tried = [f"Hugging Face cache for {cfg.get('hf_hub')!r} (cache_dir={spec.cache_dir or 'default'})"]
    if cfg.get("url"):
        tried.append(f"URL cache for {os.path.basename(cfg['url'])}")
    raise WeightsNotFoundError(_missing_weights_message(spec, name, tried))


OPENAI_KEYS = {"input_resolution", "context_length", "vocab_size"}  # buffers only OpenAI's own checkpoints carry


class WeightsMismatchError(ValueError):
    """model.arch and the weights describe different models."""


def weights_format(path: str | Path) -> str:
    """How a weights file is written: 'torchscript' (OpenAI's ~/.cache/clip/*.pt), 'openai' (a state dict of
    OpenAI's module, with its input_resolution/context_length/vocab_size buffers) or 'open_clip' (open_clip's
    state dict: .safetensors, .bin, .pt)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return "open_clip"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 -- any unreadable file gets one message naming it
        raise WeightsMismatchError(f"model.pretrained {path}: neither a TorchScript archive, a state dict nor a "
                                   f"safetensors file ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return "openai" if OPENAI_KEYS & set(state) else "open_clip"


def sidecar_config(path: str | Path) -> dict | None:
    """open_clip_config.json next to the weights (a Hugging Face snapshot of an open_clip model), if any."""
    sidecar = Path(path).with_name("open_clip_config.json")
    return json.loads(sidecar.read_text()) if sidecar.is_file() else None


def parameter_shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in OPENAI_KEYS}


def check_architecture(name: str, model: torch.nn.Module, weights: str) -> None:
    """One error naming both when `name`'s config builds other shapes than the loaded weights have."""
    with torch.device("meta"):
        skeleton = open_clip.create_model(name, pretrained=None, device="meta")
    expected, found = parameter_shapes(skeleton), parameter_shapes(model)
    differ = [k for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    if differ:
        shown = "; ".join(f"{k}: arch {expected.get(k)} vs weights {found.get(k)}" for k in differ[:3])
        raise WeightsMismatchError(f"model.arch {name!r} does not describe the weights {weights} ({len(differ)} "
                                   f"tensors differ, e.g. {shown}): set model.arch to the weights' architecture")


def quick_gelu_for(spec: ModelSpec, name: str, weights: str | None, extra: dict) -> tuple[bool, str]:
    """Whether the activation is QuickGELU, and why: the explicit setting, the tag, the file beside the weights,
    or the arch's own config."""
    if spec.quick_gelu is not None:
        return bool(spec.quick_gelu), "model.quick_gelu"
    if "force_quick_gelu" in extra:
        return extra["force_quick_gelu"], f"the tag {spec.pretrained!r}"
    sidecar = sidecar_config(weights) if weights else None
    if sidecar and "quick_gelu" in sidecar.get("model_cfg", {}):
        return bool(sidecar["model_cfg"]["quick_gelu"]), "open_clip_config.json beside the weights"
    return bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False)), f"the config of {name!r}"


def load_clip(spec: ModelSpec, base_dir: str | Path | None = None) -> LoadedClip:
    """Build the frozen CLIP of `spec`; fail fast with one clear message when its weights are missing or are not
    the arch's. OpenAI's checkpoints (TorchScript or state dict) load through open_clip's OpenAI loader, with
    QuickGELU whatever the arch's name says.

    Relative paths in `spec` are taken from `base_dir`: pass the params file's folder (`settings.base_dir`), so
    that the process's working directory never matters (`load_model(settings)` does).
    """
    spec = locate_files(spec, base_dir)
    name = register_arch(spec.arch)
    weights, extra = resolve_weights(spec, name)
    device = resolve_device(spec.device)
    fmt = weights_format(weights) if weights else "random"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        if fmt in ("torchscript", "openai"):
            model = open_clip.load_openai_model(weights, precision="fp32", device=device)
            activation, why = "QuickGELU", "OpenAI's checkpoint"
            extra = {"image_mean": open_clip.OPENAI_DATASET_MEAN, "image_std": open_clip.OPENAI_DATASET_STD,
                     **{k: v for k, v in extra.items() if k.startswith("image_")}}
        else:
            quick, why = quick_gelu_for(spec, name, weights, extra)
            activation = "QuickGELU" if quick else "GELU"
            try:
                model = open_clip.create_model(name, pretrained=weights, device=device,
                                               **_model_kwargs({**extra, "force_quick_gelu": quick}))
            except RuntimeError as error:
                if "size mismatch" not in str(error) and "Missing key" not in str(error):
                    raise
                raise WeightsMismatchError(f"model.arch {name!r} does not describe the weights {weights}: "
                                           f"{str(error).splitlines()[0]}") from None
    if fmt in ("torchscript", "openai"):
        check_architecture(name, model, weights)
    if fmt != "random":
        print(f"model: {name} from {weights} ({fmt}), {activation} activations ({why})", flush=True)
    model.eval().requires_grad_(False)
    use_lean_blocks(model)
    preprocess = getattr(model.visual, "preprocess_cfg", {})
    size = model.visual.image_size
    return LoadedClip(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        image_size=size[0] if isinstance(size, (tuple, list)) else int(size),
        image_mean=tuple(extra.get("image_mean", preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))),
        image_std=tuple(extra.get("image_std", preprocess.get("std", open_clip.OPENAI_DATASET_STD))),
        device=device,
        weights=weights or f"random(seed={spec.init_seed})",
        activation=activation if fmt != "random" else ("QuickGELU" if quick_gelu_for(spec, name, None, extra)[0]
                                                       else "GELU"),
        weights_format=fmt,
    )


def load_model(settings) -> LoadedClip:
    """The CLIP of a params file (`dynaprompt.specs.Settings`), its paths taken from the file's folder."""
    return load_clip(settings.model, settings.base_dir)


def _model_kwargs(extra: dict) -> dict:
    """create_model takes the tag's quick_gelu; the preprocessing keys are read back from the model."""
    kwargs = {"force_quick_gelu": extra.get("force_quick_gelu", False)}
    preprocess = {k.removeprefix("image_"): v for k, v in extra.items() if k.startswith("image_")}
    if preprocess:
        kwargs["force_preprocess_cfg"] = preprocess
    return kwargs
