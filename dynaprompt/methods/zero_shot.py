"""CLIP zero-shot: predict with the initial prompt v0 (or a template ensemble), no update."""
from __future__ import annotations

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


@torch.no_grad()
def classifier(text: PromptTextEncoder, templates=None) -> torch.Tensor:
    """Text features [1, C, E]: v0 (templates None) or the normalised mean over `templates`."""
    if templates:
        return text.encode_templates(templates)
    return text.encode(text.init_context.unsqueeze(0))
