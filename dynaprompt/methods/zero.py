"""ZERO (Farina et al., NeurIPS 2024): zero-temperature vote of the confident views, no training."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objectives import TuningConfig, entropy, n_confident, original_view_logits, view_logits
from ..records import Outcome
from ..text import PromptTextEncoder


@dataclass(frozen=True)
class Config:
    """ZERO's one parameter, at its authors' setting (FarinaMatteo/zero: gamma = 0.3, 19 of 64 views)."""

    confident_ratio: float = 0.3


def zero_vote(logits: torch.Tensor, confident_ratio: float) -> int:
    """Majority vote of the argmax over the lowest-entropy views; ties go to the next most confident view.

    logits [V, C]. As in the authors' code, a tie between classes is broken by walking the remaining views in
    order of increasing entropy and taking the first whose argmax is one of the tied classes.
    """
    order = torch.argsort(entropy(logits), stable=True)
    k = n_confident(logits.shape[0], confident_ratio)
    votes = torch.bincount(logits[order[:k]].argmax(-1), minlength=logits.shape[-1])
    tied = (votes == votes.max()).nonzero().flatten().tolist()
    if len(tied) == 1:
        return tied[0]
    for view in order[k:].tolist():
        guess = int(logits[view].argmax())
        if guess in tied:
            return guess
    restricted = logits[order[k] if k < len(order) else order[0]].clone()
    mask = torch.ones_like(restricted, dtype=torch.bool)
    mask[tied] = False
    return int(restricted.masked_fill(mask, float("-inf")).argmax())


class Zero:
    """Augment, keep the confident views, vote with the temperature set to zero; v0 is never updated.

    Its authors draw crop + flip views on every dataset, never AugMix: params give `zero` `views: {augmix: false}`.
    """

    Config = Config
    order_independent = True
    uses_templates = False

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config, templates=None):
        self.confident_ratio = config.confident_ratio
        with torch.no_grad():
            self.text_features = text.encode(text.init_context.unsqueeze(0))
        self.scale = text.logit_scale().detach()

    def reset(self) -> None:
        """Training-free: nothing to reset."""

    def state_dict(self) -> dict:
        """Nothing carries from sample to sample."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        logits = view_logits(view_features, self.text_features, self.scale)[:, 0]
        original = original_view_logits(view_features, self.text_features, self.scale)
        pred = zero_vote(logits, self.confident_ratio)
        uncertainty = float(entropy(original))
        return Outcome(pred=pred, entropy_before=uncertainty, entropy_after=uncertainty)
