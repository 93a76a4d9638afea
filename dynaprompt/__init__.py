"""Test-time prompt tuning of CLIP: zero-shot, TPT, Online TPT, DynaPrompt, ZERO and the online peers, over open_clip.

Depends on torch and open_clip only; orchestration (Prefect, MLflow, DVC) lives in tasks/ and flows/. The names
below load on first use, so that `import dynaprompt.datasets` (the prepare and validate stages) does not pay for
open_clip.
"""
import importlib
import os

# OpenMP threads that spin while waiting starve a second torch process on the same cores (measured: two runs on
# two cores, pretraining ~10x slower); libgomp reads this when torch loads, so before the first `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The CPU kernels that order float operations, pinned for bit-identical numbers on every x86-64 CPU with AVX2
# (dynaprompt/determinism.py; DYNAPROMPT_CPU_KERNELS=native lifts them).
from .determinism import pin_cpu_kernels  # noqa: E402  (no torch import)

pin_cpu_kernels()

__version__ = "0.2.0"
_EXPORTS = {
    "PromptConfig": "specs", "Settings": "specs", "load_settings": "config", "resolve_run": "resolve",
    "resolve": "resolve", "ResolvedRun": "resolve", "settings_from_params": "config", "ModelSpec": "specs",
    "LoadedClip": "model", "WeightsNotFoundError": "model",
    "load_clip": "model", "TuningConfig": "objectives", "ResultsLayout": "results", "RunKey": "results",
    "RunSummary": "results", "RunResult": "runner", "execute": "runner", "run_stream": "runner",
    "store_run": "runner", "ParamsError": "schema", "PromptTextEncoder": "text", "ViewConfig": "views",
    "ViewGenerator": "views",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dynaprompt' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
