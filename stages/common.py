"""What every stage script shares: the params file, checked once, and one-line failures."""
from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from pathlib import Path

from dynaprompt.config import load_settings
from dynaprompt.schema import ParamsError
from dynaprompt.specs import Settings

PARAMS_FILE = Path(os.environ.get("DYNAPROMPT_PARAMS", "params.yaml"))


@lru_cache(maxsize=1)
def settings() -> Settings:
    """params.yaml, checked (an unknown key or name stops the stage with one line naming it)."""
    try:
        return load_settings(PARAMS_FILE)
    except (ParamsError, FileNotFoundError) as error:
        fail(str(error))


def write_json(target: Path, payload) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def fail(message: str, code: int = 1):
    """Stop the stage with one clear message on stderr (DVC then stops `dvc repro`)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
