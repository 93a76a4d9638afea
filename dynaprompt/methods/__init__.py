"""The test-time methods, one per file, built by kind from a params mapping."""
from __future__ import annotations

from ..config import dataclass_from, with_overrides
from ..objectives import TuningConfig
from ..text import PromptTextEncoder
from .dynaprompt import DynaPrompt, DynaPromptConfig
from .online_tpt import OnlineTPT
from .tpt import TPT
from .zero import Zero
from .zero_shot import ZeroShot

METHOD_CLASSES = {"zero_shot": ZeroShot, "tpt": TPT, "online_tpt": OnlineTPT, "dynaprompt": DynaPrompt, "zero": Zero}
METHOD_KINDS = tuple(METHOD_CLASSES)


def is_order_independent(spec: dict) -> bool:
    """True for methods whose prediction of a sample does not depend on the samples before it."""
    return METHOD_CLASSES[spec["kind"]].order_independent


def build_method(spec: dict, text: PromptTextEncoder, tuning: TuningConfig):
    """A method from its params entry, e.g. {kind: dynaprompt, selection: official, buffer_size: 10}."""
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in METHOD_KINDS:
        raise ValueError(f"method kind {kind!r} is not one of {METHOD_KINDS}")
    tuning = with_overrides(tuning, options.pop("tuning", None) or {}, f"method {kind!r} tuning")
    if kind == "zero_shot":
        templates = _templates(options.pop("templates", None))
        method = ZeroShot(text, templates=templates)
    elif kind == "tpt":
        method = TPT(text, tuning)
    elif kind == "online_tpt":
        method = OnlineTPT(text, tuning)
    elif kind == "zero":
        method = Zero(text, confident_ratio=options.pop("confident_ratio", tuning.confident_ratio))
    else:
        method = DynaPrompt(text, tuning, dataclass_from(DynaPromptConfig, options, "method kind 'dynaprompt'"))
        options = {}
    if options:
        raise ValueError(f"unknown parameters for method kind {kind!r}: {sorted(options)}")
    return method


def _templates(name):
    """None (single prompt v0), 'openai_imagenet' (OpenAI's 80 templates), or an explicit list."""
    if name in (None, "", "none"):
        return None
    if name == "openai_imagenet":
        from open_clip import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    if isinstance(name, (list, tuple)) and all(isinstance(t, str) and "{}" in t for t in name):
        return list(name)
    raise ValueError(
        f"templates must be null, 'openai_imagenet' or a list of strings with '{{}}', got {name!r}"
    )


__all__ = [
    "METHOD_KINDS", "build_method", "is_order_independent",
    "DynaPrompt", "DynaPromptConfig", "OnlineTPT", "TPT", "Zero", "ZeroShot",
]
