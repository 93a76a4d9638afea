"""TPT (Shu et al., NeurIPS 2022), episodic: reset to v0, one entropy step on the confident views, predict."""
from __future__ import annotations

import torch

from ..objectives import (
    TuningConfig,
    encode_for_prediction,
    entropy,
    make_grad_scaler,
    original_view_logits,
    tune_contexts,
)
from ..records import Outcome
from ..text import PromptTextEncoder


def tpt_step(text, context, features, view_features, tuning, scaler, scale):
    """Tune one context (whose text features are `features` [C, E]) on one sample and predict with it.

    Returns the tuned context, its text features (reused by the next sample of Online TPT) and the outcome.
    """
    before = original_view_logits(view_features, features.unsqueeze(0), scale)
    tuned = tune_contexts(text, context.unsqueeze(0), view_features, tuning, scaler)
    tuned_features = encode_for_prediction(text, tuned, tuning.amp)
    after = original_view_logits(view_features, tuned_features, scale)
    outcome = Outcome(
        pred=int(after.argmax()), entropy_before=float(entropy(before)), entropy_after=float(entropy(after)),
        selected=[0], buffer_size=1,
    )
    return tuned[0], tuned_features[0], outcome


class TPT:
    """Every sample starts from v0: predictions do not depend on the order of the stream."""

    order_independent = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig):
        self.text = text
        self.tuning = tuning
        self.scale = text.logit_scale().detach()
        self.scaler = make_grad_scaler(text.init_context.device, tuning)
        self.v0_features = encode_for_prediction(text, text.init_context.unsqueeze(0), tuning.amp)[0]

    def reset(self) -> None:
        """Episodic: there is no state between samples."""

    def __call__(self, view_features: torch.Tensor) -> Outcome:
        _, _, outcome = tpt_step(
            self.text, self.text.init_context, self.v0_features, view_features, self.tuning, self.scaler, self.scale
        )
        return outcome
