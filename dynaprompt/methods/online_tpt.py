"""Online TPT: TPT without the reset; sample n starts from the prompt sample n-1 left (and may collapse)."""
from __future__ import annotations

import torch

from ..objectives import TuningConfig, encode_for_prediction, make_grad_scaler
from ..records import Outcome
from ..text import PromptTextEncoder
from .tpt import tpt_step


class OnlineTPT:
    """One prompt carried along the stream; the optimiser state is still fresh for every sample."""

    order_independent = False

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig):
        self.text = text
        self.tuning = tuning
        self.scale = text.logit_scale().detach()
        self.scaler = make_grad_scaler(text.init_context.device, tuning)
        self.reset()

    def reset(self) -> None:
        """Back to v0, at the start of a stream."""
        self.context = self.text.init_context.clone()
        self.features = encode_for_prediction(self.text, self.context.unsqueeze(0), self.tuning.amp)[0]

    def __call__(self, view_features: torch.Tensor) -> Outcome:
        self.context, self.features, outcome = tpt_step(
            self.text, self.context, self.features, view_features, self.tuning, self.scaler, self.scale
        )
        return outcome
