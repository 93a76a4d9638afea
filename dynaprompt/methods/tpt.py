"""TPT (Shu et al., NeurIPS 2022), episodic: reset to v0, one entropy step on the confident views, predict."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objectives import (
    TuningConfig,
    TuningRequest,
    encode_for_prediction,
    entropy,
    make_grad_scaler,
    original_view_logits,
    tune_and_finish,
)
from ..records import Outcome
from ..text import PromptTextEncoder


def tpt_request(context, features, view_features, scale) -> TuningRequest:
    """Ask to tune one context (whose text features are `features` [C, E]) on one sample."""
    before = original_view_logits(view_features, features.unsqueeze(0), scale)
    return TuningRequest(context.unsqueeze(0), view_features, state=before)


def tpt_outcome(request: TuningRequest, tuned_features: torch.Tensor, scale) -> Outcome:
    """Predict with the tuned context, whose text features are `tuned_features` [1, C, E]."""
    after = original_view_logits(request.view_features, tuned_features, scale)
    return Outcome(
        pred=int(after.argmax()), entropy_before=float(entropy(request.state)), entropy_after=float(entropy(after)),
        selected=[0], buffer_size=1,
    )


@dataclass(frozen=True)
class Config:
    """No options of its own: the step is the run's `tuning:`."""


class TPT:
    """Every sample starts from v0: predictions do not depend on the order of the stream."""

    Config = Config
    order_independent = True
    uses_templates = False

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config | None = None, templates=None):
        self.text = text
        self.tuning = tuning
        self.scale = text.logit_scale().detach()
        self.scaler = make_grad_scaler(text.init_context.device, tuning)
        self.v0_features = encode_for_prediction(text, text.init_context.unsqueeze(0), tuning)[0]

    def reset(self) -> None:
        """Episodic: no prompt state between samples (only the gradient scaler's scale carries, on GPU)."""

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def begin(self, view_features: torch.Tensor) -> TuningRequest:
        return tpt_request(self.text.init_context, self.v0_features, view_features, self.scale)

    def finish(self, request: TuningRequest, tuned: torch.Tensor, tuned_features: torch.Tensor) -> Outcome:
        return tpt_outcome(request, tuned_features, self.scale)

    def __call__(self, view_features: torch.Tensor) -> Outcome:
        return tune_and_finish(self, view_features)
