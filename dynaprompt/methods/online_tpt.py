"""Online TPT: TPT without the reset; sample n starts from the prompt sample n-1 left (and may collapse)."""
from __future__ import annotations

import torch

from ..objectives import TuningConfig, TuningRequest, encode_for_prediction, make_grad_scaler, tune_and_finish
from ..records import Outcome
from ..text import PromptTextEncoder
from .tpt import Config, tpt_outcome, tpt_request


class OnlineTPT:
    """One prompt carried along the stream; the optimiser state is still fresh for every sample."""

    Config = Config
    order_independent = False
    uses_templates = False

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config | None = None, templates=None):
        self.text = text
        self.tuning = tuning
        self.scale = text.logit_scale().detach()
        self.scaler = make_grad_scaler(text.init_context.device, tuning)
        self.reset()

    def reset(self) -> None:
        """Back to v0, at the start of a stream."""
        self.context = self.text.init_context.clone()
        self.features = encode_for_prediction(self.text, self.context.unsqueeze(0), self.tuning)[0]

    def state_dict(self) -> dict:
        """The carried prompt, its text features and the gradient scaler's state."""
        return {"context": self.context.clone(), "features": self.features.clone(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.context, self.features = state["context"].to(self.context), state["features"].to(self.features)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def begin(self, view_features: torch.Tensor) -> TuningRequest:
        return tpt_request(self.context, self.features, view_features, self.scale)

    def finish(self, request: TuningRequest, tuned: torch.Tensor, tuned_features: torch.Tensor) -> Outcome:
        """Carry the tuned context and its text features (reused by the next sample) along the stream."""
        self.context, self.features = tuned[0], tuned_features[0]
        return tpt_outcome(request, tuned_features, self.scale)

    def __call__(self, view_features: torch.Tensor) -> Outcome:
        return tune_and_finish(self, view_features)
