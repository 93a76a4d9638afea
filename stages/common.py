"""What every stage script shares: the params file, the project's paths, one-line failures."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dynaprompt.config import Settings, load_params, settings_from_params

PARAMS_FILE = Path(os.environ.get("DYNAPROMPT_PARAMS", "params.yaml"))
DEFAULT_PATHS = {
    "prepared": "data/prepared",
    "features": "data/features",
    "models": "data/models",
    "validation": "reports/validation",
    "reports": "reports",
    "results": "results",
}


def params() -> dict:
    return load_params(PARAMS_FILE)


def settings() -> Settings:
    return settings_from_params(params(), base_dir=PARAMS_FILE.resolve().parent)


def path(name: str) -> Path:
    """A project path from `paths:` in params, relative to the params file's folder."""
    configured = {**DEFAULT_PATHS, **(params().get("paths") or {})}
    return PARAMS_FILE.resolve().parent / configured[name]


def write_json(target: Path, payload) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def fail(message: str, code: int = 1):
    """Stop the stage with one clear line on stderr (DVC then stops `dvc repro`)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def dataset_spec(name: str) -> dict:
    datasets = params().get("datasets") or {}
    if name not in datasets:
        fail(f"dataset {name!r} is not defined in {PARAMS_FILE} (defined: {sorted(datasets)})")
    return datasets[name]
