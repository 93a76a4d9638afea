"""Test-time prompt tuning of CLIP: zero-shot, TPT, Online TPT, DynaPrompt and ZERO over open_clip.

Depends on torch and open_clip only; orchestration (Prefect, MLflow, DVC) lives in tasks/ and flows/.
"""
from .config import PromptConfig, Settings, load_settings, settings_from_params
from .model import LoadedClip, ModelSpec, WeightsNotFoundError, load_clip
from .objectives import TuningConfig
from .runner import RunResult, run_one, run_stream
from .text import PromptTextEncoder
from .views import ViewConfig, ViewGenerator

__version__ = "0.1.0"
__all__ = [
    "LoadedClip", "ModelSpec", "PromptConfig", "PromptTextEncoder", "RunResult", "Settings", "TuningConfig",
    "ViewConfig", "ViewGenerator", "WeightsNotFoundError", "load_clip", "load_settings", "run_one",
    "run_stream", "settings_from_params",
]
