"""CLIP zero-shot: predict with the initial prompt v0 (or a template ensemble), no update."""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..objectives import TuningConfig, entropy, original_view_logits
from ..records import Outcome
from ..text import PromptTextEncoder


@dataclass(frozen=True)
class Config:
    """Zero-shot has no options; `templates` (in params) switches to the averaged-template classifier."""


class ZeroShot:
    """Zero-shot CLIP on the original view."""

    Config = Config
    order_independent = True
    uses_templates = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config, templates=None):
        self.text_features = classifier(text, templates)
        self.scale = text.logit_scale().detach()

    def reset(self) -> None:
        """Nothing is learned, so nothing to reset."""

    def state_dict(self) -> dict:
        """Nothing carries from sample to sample."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        logits = original_view_logits(view_features, self.text_features, self.scale)
        uncertainty = float(entropy(logits))
        return Outcome(pred=int(logits.argmax()), entropy_before=uncertainty, entropy_after=uncertainty)


LOGIT_SCALES = ("authors", "model")  # a method's `logit_scale` option, where its authors write a literal


def chosen_logit_scale(text: PromptTextEncoder, choice: str, authors_value: float, device) -> torch.Tensor:
    """The authors' literal logit scale ("authors") or the model's own ("model"), as a float32 scalar.

    The two agree on OpenAI CLIP (100); on a model with another learnt scale (the bundled one) they do not.
    """
    if choice not in LOGIT_SCALES:
        raise ValueError(f"logit_scale must be one of {LOGIT_SCALES}, got {choice!r}")
    if choice == "model":
        return text.logit_scale().detach().float().to(device)
    return torch.tensor(authors_value, dtype=torch.float32, device=device)


_TEMPLATE_CLASSIFIERS = weakref.WeakKeyDictionary()  # model -> {(class names, templates): features}


@torch.no_grad()
def classifier(text: PromptTextEncoder, templates=None) -> torch.Tensor:
    """Text features [1, C, E]: v0 (templates None) or the normalised mean over `templates`.

    A template ensemble is computed once per model, class list and template set in a process and shared by every
    run there (80 templates x 1000 classes is a 16 GFLOP text pass at ViT-B/16; the sweep's runs of one dataset
    ask for the same one)."""
    if not templates:
        return text.encode(text.init_context.unsqueeze(0))
    model = getattr(text, "model", None)
    if model is None:  # a stand-in encoder (tests): nothing to share
        return text.encode_templates(templates)
    memo = _TEMPLATE_CLASSIFIERS.setdefault(model, {})
    key = (tuple(text.classnames), tuple(templates))
    if key not in memo:
        memo[key] = text.encode_templates(templates)
    return memo[key].clone()  # a method may evolve its copy (DPE's prototypes)
