"""CLIP zero-shot: predict with the initial prompt v0 (or a template ensemble), no update."""
from __future__ import annotations

import torch

from ..objectives import entropy, original_view_logits
from ..records import Outcome
from ..text import PromptTextEncoder


class ZeroShot:
    """Zero-shot CLIP on the original view; `templates` switches to the averaged-template classifier."""

    order_independent = True

    def __init__(self, text: PromptTextEncoder, templates=None):
        self.text = text
        if templates:
            self.text_features = text.encode_templates(templates)
        else:
            with torch.no_grad():
                self.text_features = text.encode(text.init_context.unsqueeze(0))
        self.scale = text.logit_scale().detach()

    def reset(self) -> None:
        """Nothing is learned, so nothing to reset."""

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        logits = original_view_logits(view_features, self.text_features, self.scale)
        uncertainty = float(entropy(logits))
        return Outcome(pred=int(logits.argmax()), entropy_before=uncertainty, entropy_after=uncertainty)
