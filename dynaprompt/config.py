"""Settings: params.yaml mapped onto the library's dataclasses, every unknown key named."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from .model import ModelSpec
from .objectives import TuningConfig
from .views import ViewConfig


@dataclass
class PromptConfig:
    """The learnable context; the `prompt:` block of params.yaml."""

    n_ctx: int = 4
    ctx_init: str | None = "a photo of a"  # null: CoOp's random init
    truncate: bool = True  # cut token sequences after the last end-of-text token
    init_seed: int = 0  # only used when ctx_init is null


@dataclass
class Settings:
    """Everything one run needs to know, from params.yaml."""

    model: ModelSpec = field(default_factory=ModelSpec)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    block_size: int = 200
    datasets: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    orderings: dict = field(default_factory=dict)
    mixtures: dict = field(default_factory=dict)  # name -> {members: [...], per_member, seed}
    paths: dict = field(default_factory=dict)  # prepared, features, ...: where the pipeline's stages write
    base_dir: Path = Path(".")  # relative paths in params are relative to the params file


def project_path(settings: Settings, name: str) -> Path | None:
    """A `paths:` entry resolved against the params file's folder (None when not configured)."""
    value = settings.paths.get(name)
    return settings.base_dir / value if value else None


def dataclass_from(cls, options: dict | None, where: str):
    """Instantiate a config dataclass from a mapping, naming any unknown key."""
    return with_overrides(cls(), options or {}, where)


def with_overrides(config, changes: dict, where: str):
    """A copy of a config dataclass with some fields changed, naming any unknown key."""
    known = {f.name for f in fields(config)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} in {where} (known: {sorted(known)})")
    return replace(config, **changes)


def load_params(path: str | Path) -> dict:
    """Read a params file; a missing or malformed file is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    with path.open() as handle:
        params = yaml.safe_load(handle) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return params


def settings_from_params(params: dict, base_dir: str | Path = ".") -> Settings:
    """Settings from a params mapping (as read from params.yaml)."""
    tuning = dict(params.get("tuning") or {})
    if "betas" in tuning:
        tuning["betas"] = tuple(tuning["betas"])
    return Settings(
        model=dataclass_from(ModelSpec, params.get("model"), "model"),
        prompt=dataclass_from(PromptConfig, params.get("prompt"), "prompt"),
        views=dataclass_from(ViewConfig, params.get("views"), "views"),
        tuning=dataclass_from(TuningConfig, tuning, "tuning"),
        block_size=int(params.get("run", {}).get("block_size", 200)),
        datasets=dict(params.get("datasets") or {}),
        methods=dict(params.get("methods") or {}),
        orderings=dict(params.get("orderings") or {}),
        mixtures=dict(params.get("mixtures") or {}),
        paths=dict(params.get("paths") or {}),
        base_dir=Path(base_dir),
    )


def load_settings(path: str | Path) -> Settings:
    """Settings from a params file; relative paths inside it resolve against its folder."""
    return settings_from_params(load_params(path), base_dir=Path(path).resolve().parent)
