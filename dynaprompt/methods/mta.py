"""MTA (Zanella and Ben Ayed, CVPR 2024, MeanShift for Test-time Augmentation): a training-free mode of the views.

The paper: "On the Test-Time Zero-Shot Generalization of Vision-Language Models: Do We Really Need Prompt Learning?".

Read from the authors' code, MaxZanella/MTA @ cafafdf (2024-12-15): `mta.py:solve_mta` and `gaussian_kernel`,
`main.py`, `clip/custom_clip.py` and the README's commands. Nothing is tuned: the method seeks a mode of the
sample's view features, weighting each view by an inlierness score it optimises jointly, then classifies the
mode. Each sample stands alone.

- Text classifier: the prompt learner's "a photo of a {class}." (`main.py --ctx_init` default `a_photo_of_a`,
  `custom_clip.py:get_text_features`), a single prompt, not a template ensemble. Here that is v0, so
  `uses_templates` is False. The scale is the model's logit_scale (100 on CLIP).
- Features: the unit-norm image features of all 64 views (`batch_size` 64: the original + 63), view 0 the
  original (`solve_mta`, `model(inputs, features=True)`).
- Bandwidth, one per view (`solve_mta`):
  - k = int(0.3 * (n_views - 1)), 18 of 63;
  - h_j = sqrt(0.5 * mean of the k smallest squared distances from view j to the others). The sorted
    distances' column 0, the view itself, is skipped.
- Kernel (`gaussian_kernel`): density_j(m) = exp(-||x_j - m||^2 / (2 h_j^2)).
- Affinity (`solve_mta`): A = P P^T with P = softmax(logits / 1), the views' class probabilities (temperature 1,
  over the logit_scale-scaled logits).
- Initialisation: inlierness y = 1/n_views for every view; mode m = x_0, the original view.
- Outer loop: exactly `max_iter` = 5 rounds, with no convergence test. Each round:
  - Inlierness step. Take the density at the current mode. Then, up to 5 times, y <- softmax((1 / lambda_y) *
    (density + lambda_q * A y)). Stop early once ||y_old - y|| < 1e-6; the new y is kept.
  - Mode step. Up to 5 times: w = density(m) * y and m <- normalise(sum_j w_j x_j / sum_j w_j). Stop early once
    ||m_old - m|| < 1e-6.
  - y carries from round to round; it is not reset.
- Constants: lambda_y 0.2 and lambda_q 4 (`main.py --lambda_y`, `--lambda_q` defaults), the same on all 15
  datasets (the README runs them all with the defaults).
- Output: logits = logit_scale * m . T, and the prediction is their argmax.
- Views: `augmix=(len(set_id)>1 and args.tpt)`, which is False under `--mta`. So MTA sees random resized crops
  and flips on every dataset, AugMix on none (`views: {augmix: false}` in the configs snippet).

Here the early stops are computed without leaving the device. Every inner loop runs its 5 iterations, and a
flag freezes y (or m) from the iteration at which the authors' loop would have broken. The values are the same.
Distances use `torch.cdist` without its matrix-product shortcut (exact up to float rounding; the authors' call
takes the shortcut above 25 rows).

Paper, code and tta-vlm:
- The paper's text could not be read here, only its abstract: a MeanShift over the augmented views with a
  jointly optimised inlierness score, training- and hyperparameter-free. The rules and constants are the code's.
- Precision: the authors compute the features under fp16 autocast, and the solve then runs on those fp16
  tensors. Here it runs in fp32 on the cached features; a difference at fp16 rounding is the only one expected.
- Few views: the authors' k = int(0.3 * (n_views - 1)) is 0 below 5 views, which gives an empty mean (NaN
  bandwidths). Here k is at least 1, and a single view is its own mode.
- tta-vlm (TomSheng21/tta-vlm @ bcc735f, `instance_method/mta.py`) has the same solver and constants. Its
  loader (`instance_tta.py`, `augmix=len(dset)>1`) gives MTA AugMix views on the fine-grained sets, where the
  authors' `--mta` runs have none. The authors are followed.

Records: no prompt is selected (`selected` [], `buffer_size` 0). `entropy_before`: zero-shot, v0 on the original
view. `entropy_after`: the softmax of the mode's logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objectives import TuningConfig, entropy
from ..records import Outcome
from ..text import PromptTextEncoder
from .zero_shot import classifier


@dataclass(frozen=True)
class Config:
    """MTA's constants (MaxZanella/MTA main.py and mta.py), the same on every dataset."""

    lambda_y: float = 0.2  # main.py --lambda_y, the entropic weight of the inlierness step
    lambda_q: float = 4.0  # main.py --lambda_q, the weight of the affinity (quadratic) term
    max_iter: int = 5  # mta.py:solve_mta max_iter: outer rounds, and the cap of both inner loops
    tol: float = 1e-6  # mta.py:solve_mta th, the inner loops' early stop on ||old - new||
    bandwidth_ratio: float = 0.3  # mta.py:solve_mta, k = int(0.3 * (n_views - 1)) nearest views per bandwidth
    temperature: float = 1.0  # mta.py:solve_mta temperature of the affinity softmax

    def __post_init__(self):
        if self.lambda_y <= 0 or self.max_iter < 1 or self.temperature <= 0 or not 0 < self.bandwidth_ratio <= 1:
            raise ValueError("lambda_y and temperature must be > 0, max_iter >= 1, bandwidth_ratio in (0, 1]")


def bandwidths(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per view j: sqrt(0.5 * mean of the k smallest squared distances to the other views), k = int(ratio (V-1))."""
    k = max(1, int(ratio * (features.shape[0] - 1)))
    distances = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
    nearest = torch.sort(distances, dim=1).values[:, 1 : k + 1]  # column 0: the view itself
    return torch.sqrt(0.5 * (nearest**2).mean(1))


def gaussian_density(mode: torch.Tensor, features: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """exp(-||x_j - mode||^2 / (2 h_j^2)) per view j -> [V]."""
    squared = torch.linalg.vector_norm(features - mode, dim=-1) ** 2
    return torch.exp(-squared / (2 * bandwidth**2))


def inlierness(y: torch.Tensor, density: torch.Tensor, affinity: torch.Tensor, config: Config) -> torch.Tensor:
    """Up to `max_iter` updates y <- softmax((density + lambda_q A y) / lambda_y), frozen once it moves < tol."""
    done = torch.zeros((), dtype=torch.bool, device=y.device)
    for _ in range(config.max_iter):
        new = torch.softmax(1 / config.lambda_y * (density + config.lambda_q * (affinity @ y)), dim=-1)
        moved_little = torch.linalg.vector_norm(y - new) < config.tol
        y = torch.where(done, y, new)
        done = done | moved_little
    return y


def mode_step(mode: torch.Tensor, y: torch.Tensor, features: torch.Tensor, bandwidth: torch.Tensor,
              config: Config) -> torch.Tensor:
    """Up to `max_iter` weighted mean-shift updates of the unit-norm mode, frozen once it moves < tol."""
    done = torch.zeros((), dtype=torch.bool, device=mode.device)
    for _ in range(config.max_iter):
        weights = gaussian_density(mode, features, bandwidth) * y
        new = (weights.unsqueeze(1) * features).sum(0) / weights.sum()
        new = new / torch.linalg.vector_norm(new)
        moved_little = torch.linalg.vector_norm(mode - new) < config.tol
        mode = torch.where(done, mode, new)
        done = done | moved_little
    return mode


def solve_mode(features: torch.Tensor, logits: torch.Tensor, config: Config) -> torch.Tensor:
    """MTA's mode [E] of the view features [V, E] (view 0 the original), their logits [V, C] giving the affinity."""
    if features.shape[0] == 1:
        return features[0]
    bandwidth = bandwidths(features, config.bandwidth_ratio)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    affinity = probs @ probs.t()
    y = torch.full((features.shape[0],), 1.0 / features.shape[0], device=features.device)
    mode = features[0]
    for _ in range(config.max_iter):
        y = inlierness(y, gaussian_density(mode, features, bandwidth), affinity, config)
        mode = mode_step(mode, y, features, bandwidth, config)
    return mode


class MTA:
    """Per sample: the inlierness-weighted MeanShift mode of its view features, classified by v0's text features."""

    Config = Config
    order_independent = True
    uses_templates = False

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config | None = None, templates=None):
        self.config = config if config is not None else Config()
        self.text_features = classifier(text)[0].float()  # [C, E]: "a photo of a {class}.", v0
        self.scale = text.logit_scale().detach().float()

    def reset(self) -> None:
        """Training-free and episodic: nothing to reset."""

    def state_dict(self) -> dict:
        """Nothing carries between samples."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"MTA keeps no state between samples; got keys {sorted(state)}")

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        features = view_features.float()
        logits = self.scale * features @ self.text_features.t()  # [V, C]
        final = self.scale * solve_mode(features, logits, self.config) @ self.text_features.t()
        scalars = torch.stack([final.argmax().float(), entropy(logits[0]), entropy(final)]).tolist()  # one sync
        return Outcome(pred=int(scalars[0]), entropy_before=scalars[1], entropy_after=scalars[2])
