"""Loading a frozen CLIP from open_clip: a named architecture, a config given as data, local or cached weights."""
from __future__ import annotations

import os
from dataclasses import dataclass
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


def register_arch(arch: str) -> str:
    """Make `arch` known to open_clip (bundled or JSON-file configs) and return its registry name."""
    if BUNDLED_CONFIGS not in _registered_config_paths:
        open_clip.add_model_config(BUNDLED_CONFIGS)
        _registered_config_paths.add(BUNDLED_CONFIGS)
    if arch.endswith(".json"):
        path = Path(arch).resolve()
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
        "(e.g. /data/ViT-B-16.safetensors, with model.arch ViT-B-16-quickgelu for OpenAI weights); "
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


def load_clip(spec: ModelSpec) -> LoadedClip:
    """Build the frozen CLIP of `spec`; fail fast with one clear message when its weights are missing."""
    name = register_arch(spec.arch)
    weights, extra = resolve_weights(spec, name)
    device = resolve_device(spec.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        model = open_clip.create_model(name, pretrained=weights, device=device, **_model_kwargs(extra))
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
    )


def _model_kwargs(extra: dict) -> dict:
    """create_model takes the tag's quick_gelu; the preprocessing keys are read back from the model."""
    kwargs = {"force_quick_gelu": extra.get("force_quick_gelu", False)}
    preprocess = {k.removeprefix("image_"): v for k, v in extra.items() if k.startswith("image_")}
    if preprocess:
        kwargs["force_preprocess_cfg"] = preprocess
    return kwargs
