"""Test-time prompt tuning of CLIP: zero-shot, TPT, Online TPT, DynaPrompt, ZERO and the online peers, over open_clip.

Depends on torch and open_clip only; orchestration (Prefect, MLflow, DVC) lives in tasks/ and flows/.
"""
import os

# OpenMP threads that spin while waiting starve a second torch process on the same cores (measured: two runs on
# two cores, pretraining ~10x slower); libgomp reads this when torch loads, so before the first `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import PromptConfig, Settings, load_settings, resolve_run, settings_from_params
from .model import LoadedClip, ModelSpec, WeightsNotFoundError, load_clip
from .objectives import TuningConfig
from .results import ResultsLayout, RunKey, RunSummary
from .runner import RunResult, execute, run_stream, store_run
from .schema import ParamsError
from .text import PromptTextEncoder
from .views import ViewConfig, ViewGenerator

__version__ = "0.2.0"
__all__ = [
    "LoadedClip", "ModelSpec", "ParamsError", "PromptConfig", "PromptTextEncoder", "ResultsLayout", "RunKey",
    "RunResult", "RunSummary", "Settings", "TuningConfig", "ViewConfig", "ViewGenerator", "WeightsNotFoundError",
    "execute", "load_clip", "load_settings", "resolve_run", "run_stream", "settings_from_params", "store_run",
]
