"""R-TPT (Sheng et al., CVPR 2025, robust test-time prompt tuning): pointwise entropy, reliability-weighted views.

The paper: "R-TPT: Improving Adversarial Robustness of Vision-Language Models through Test-Time Prompt Tuning".

Read from the authors' code, TomSheng21/R-TPT @ e085f13 (2025-04-23): `rtpt.py`, `clip/custom_clip.py`,
`clip/clip.py`, `clip/model.py` and the README's commands. Episodic, like TPT: every sample starts from v0 with a
fresh optimiser, so a prediction ignores the samples before it.

- Prompt: the 4 tokens of "a photo of a" (README: `--ctx_init a_photo_of_a`), reset to v0 before every sample
  (`test_time_adapt_eval`: `model.reset()`, `optimizer.load_state_dict(optim_state)`).
- Optimiser: `torch.optim.AdamW(prompt_learner.parameters(), args.lr)`, torch's defaults otherwise (weight decay
  0.01). lr 5e-3 is the argparse default, which no README command overrides: 5e-3 on every dataset. One step
  (`--tta_steps` default 1).
- Precision: none mixed. The model is fp32 (`clip/model.py:build_model`, `convert_weights` commented out), there is
  no autocast, `scaler = None`, and the step is a plain `loss.backward(); optimizer.step()` (`test_time_tuning`).
  Here the step follows `objectives.autocast` and `make_grad_scaler` like TPT's, so the authors' fp32 step is
  the run's `tuning: {amp: false}` (in the configs snippet). With `amp` on, the GradScaler carries across samples
  as TPT's does.
- Confident views (`select_confident_samples`): the int(0.1 * 64) = 6 views with the lowest entropy of their own
  softmax. They are chosen at the first step and reused at later ones (`selected_idx`).
- Loss (`entropy_avg`): the MEAN over those views of each view's own entropy, the "pointwise entropy". This is not
  TPT's entropy of the mean softmax: the paper drops the marginal term that adversarial views set against it.
- Prediction, reliability-based weighted ensembling (`test_time_adapt_eval`, `get_top_sim`):
  - S = F F^T is the cosine similarity of the unit-norm image features of all views (`forward_features`,
    `rtpt.py:251`, a bmm in fp32: the model is fp32 and nothing runs under autocast).
  - Entries S >= 1.0 are set to -inf, so they never count as neighbours (`rtpt.py:39`,
    `sim_matrix[sim_matrix>=1.0] = float('-inf')`). That is the only rule: there is no diagonal mask. A view's
    similarity to itself is its squared norm as rounded in that precision, which lands just below, at or just above
    1.0. So the authors drop it for some views and keep it (as the view's own top neighbour) for others: in fp32,
    22-32 of 64 views keep it.
  - A view's score is the mean of its k = 20 largest remaining similarities (`rtpt.py:40-41`).
  - The view weights are w = softmax(score / 0.01).
  - The output is sum_v w_v * logits_v, where logits_v are the tuned prompt's logits on view v; the prediction
    is its argmax.
  - The weights depend only on the image features, so they are computed from the cached view features.
- Views: `augmix=len(dset)>1`, AugMix on the fine-grained sets only, TPT's rule and configs/paper.yaml's
  default. The attack branch (`--eps > 0`, PGD on the original image) is not part of this pipeline: eps 0 is
  the README's clean setting.

Paper, code and tta-vlm:
- The paper's text could not be read here, only its abstract: pointwise entropy minimisation and a
  "reliability-based weighted ensembling" of the augmented views. The rules and constants above are the code's.
- Self-similarity, `Config.self_similarity`:
  - "authors" (the default) is `rtpt.py:39` as it computes: drop every entry >= 1.0, the diagonal included only
    where it reaches 1.0. S is computed here in fp32 from the run's view features, as the authors compute it from
    theirs. The cached features are unit vectors rounded to the cache's storage dtype (fp16 by default), so which
    views keep themselves follows that rounding, as it follows fp32's in the authors' run.
  - "always_drop" reads the rule as meant to say "a view is no neighbour of itself": the diagonal is always
    dropped, together with any other entry >= 1.0 (an exact duplicate view).
  - The two differ only in the weights, never in the step. Against the authors' code (issue 27's differential
    check: ViT-B/16, random weights) "always_drop" differed on 6 of 6 images and the authors' rule agreed on 6 of
    6. Here, on the bundled model's cached features, the weights equal those of `get_top_sim` run as written, bit
    for bit (600 of 600 samples); the two rules change 2-11 of 300 predictions per stream (shuffle-0).
- Fewer than 21 views: the authors' `topk(20)` needs 20 columns. Here k is min(20, n_views - 1). A single view
  has weight 1. A view with fewer than k neighbours left after the >= 1.0 rule scores -inf (weight 0), as it
  would in the authors' code.
- tta-vlm (TomSheng21/tta-vlm @ bcc735f, `instance_method/rtpt.py`) runs the step under fp16 autocast with a
  GradScaler(init_scale=1000), and the similarities under autocast too. The authors' fp32 is followed (the
  `amp: false` of the snippet); the rule is otherwise the same.

Records: `selected` [0] and `buffer_size` 1, as TPT has them. `entropy_before`: v0 on the original view.
`entropy_after`: the softmax of the weighted logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objectives import (
    TuningConfig,
    autocast,
    check_finite,
    confident_view_indices,
    encode_for_prediction,
    entropy,
    fresh_parameters,
    make_grad_scaler,
    make_optimizer,
    original_view_logits,
    view_logits,
)
from ..records import Outcome
from ..text import PromptTextEncoder

SELF_SIMILARITIES = ("authors", "always_drop")
NO_NEIGHBOUR = 1.0  # rtpt.py:39 (get_top_sim) `sim_matrix[sim_matrix>=1.0] = float('-inf')`


@dataclass(frozen=True)
class Config:
    """R-TPT's ensembling constants (the same on every dataset); the step itself is the run's `tuning:`."""

    neighbours: int = 20  # rtpt.py:get_top_sim, `k = 20 # use 20 neighbor`
    temperature: float = 0.01  # rtpt.py:test_time_adapt_eval, softmax(score / 0.01)
    self_similarity: str = "authors"  # authors: rtpt.py:39, only entries >= 1.0 go | always_drop: the diagonal too

    def __post_init__(self):
        if self.neighbours < 1 or self.temperature <= 0:
            raise ValueError("neighbours must be >= 1 and temperature > 0")
        if self.self_similarity not in SELF_SIMILARITIES:
            raise ValueError(f"self_similarity must be one of {SELF_SIMILARITIES}, got {self.self_similarity!r}")


def pointwise_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per prompt, the mean over views of each view's own entropy; logits [V, P, C] -> [P]."""
    return entropy(logits).mean(0)


def reliability_weights(view_features: torch.Tensor, neighbours: int, temperature: float,
                        self_similarity: str = "authors") -> torch.Tensor:
    """softmax(mean of each view's top-k similarities / temperature) -> [V], over the entries below 1.0 in fp32
    ("authors": a view's own entry counts where it rounds below 1.0) or over the other views ("always_drop")."""
    features = view_features.float()
    n_views = features.shape[0]
    k = min(neighbours, n_views - 1)
    if k < 1:
        return features.new_ones(n_views)
    similarity = features @ features.t()
    dropped = similarity >= NO_NEIGHBOUR
    if self_similarity == "always_drop":
        dropped |= torch.eye(n_views, dtype=torch.bool, device=features.device)
    similarity = similarity.masked_fill(dropped, float("-inf"))
    score = similarity.topk(k, dim=-1).values.mean(-1)
    return torch.softmax(score / temperature, dim=-1)


class RTPT:
    """Every sample starts from v0: one pointwise-entropy step, then the reliability-weighted logits of all views."""

    Config = Config
    order_independent = True
    uses_templates = False

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config | None = None, templates=None):
        self.text = text
        self.tuning = tuning
        self.config = config if config is not None else Config()
        self.scale = text.logit_scale().detach()
        self.scaler = make_grad_scaler(text.init_context.device, tuning)
        self.v0_features = encode_for_prediction(text, text.init_context.unsqueeze(0), tuning)  # [1, C, E]

    def reset(self) -> None:
        """Episodic: nothing carries between samples (but a GradScaler's scale, when mixed precision is on)."""

    def state_dict(self) -> dict:
        """What carries between samples: the GradScaler's state ({} when mixed precision is off)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)

    def tune(self, view_features: torch.Tensor) -> torch.Tensor:
        """`tuning.steps` AdamW steps on the pointwise entropy from v0, fresh optimiser state; the tuned context.

        The confident views are chosen at the first step and kept for the later ones, as the authors' code does.
        """
        params = fresh_parameters(self.text.init_context.unsqueeze(0))
        optimizer = make_optimizer([params], self.tuning)
        scale = self.text.logit_scale()
        keep, losses = None, []
        for _ in range(self.tuning.steps):
            with autocast(view_features.device, self.tuning):
                logits = view_logits(view_features, self.text.encode(params), scale)  # [V, 1, C]
                if keep is None:
                    keep = confident_view_indices(logits.detach(), self.tuning.confident_ratio)
                loss = pointwise_entropy(logits[keep])[0]
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
            losses.append(loss.detach())
        losses, tuned = torch.stack(losses) if losses else params.new_zeros(0), params.detach()
        if not bool(torch.isfinite(losses).all() & torch.isfinite(tuned).all()):  # one sync per sample
            check_finite(losses, "loss")
            check_finite(tuned, "tuned contexts")
        return tuned

    def ensemble_logits(self, view_features: torch.Tensor, tuned_features: torch.Tensor) -> torch.Tensor:
        """sum_v w_v * logits_v [C]: the tuned prompt's logits on every view, weighted by the views' reliability."""
        config = self.config
        logits = view_logits(view_features, tuned_features, self.scale)[:, 0].float()  # [V, C]
        weights = reliability_weights(view_features, config.neighbours, config.temperature, config.self_similarity)
        return weights @ logits

    def __call__(self, view_features: torch.Tensor) -> Outcome:
        before = original_view_logits(view_features, self.v0_features, self.scale)
        tuned = self.tune(view_features)
        final = self.ensemble_logits(view_features, encode_for_prediction(self.text, tuned, self.tuning))
        scalars = torch.stack([final.argmax().float(), entropy(before), entropy(final)]).tolist()  # one sync
        return Outcome(pred=int(scalars[0]), entropy_before=scalars[1], entropy_after=scalars[2], selected=[0],
                       buffer_size=1)
