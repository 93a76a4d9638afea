"""OnZeta (Qian et al., ECCV 2024, "Online Zero-Shot Classification with CLIP"): online label and proxy learning.

Read from the authors' code, idstcv/OnZeta @ befef06 (Apache-2.0). The whole method is the inner loop of
`main_online.py:main`:

- Inputs: one view per sample (the original, row 0), fixed text classifier T [C, E].
  - T comes from `main_online.py:zeroshot_classifier`, the normalised mean of normalised template embeddings;
    here that is `zero_shot.classifier(text, templates)`.
  - The authors use the 7 Tip templates on ImageNet.
- State at the start of a stream: proxies w = T and duals rho = 0.
- Sample t (1-based), in the authors' order:
  1. eta_w = cw / sqrt(t), eta_rho = cr / sqrt(t), beta_t = beta * sqrt(t / N).
  2. Online label learning (OnLab): q = softmax(x.T / tau_t) * exp(rho), renormalised, with rho from before.
  3. rho <- max(0, rho - eta_rho * (q - alpha / C)).
  4. p = softmax(x.w / tau_i), with w from before.
  5. Output beta_t * p + (1 - beta_t) * q.
  6. w <- w - (eta_w / tau_i) * (p - q) x^T, then every class proxy is renormalised to unit norm.
  So the prediction uses rho_{t-1} and w_{t-1} (predict first, then update), and the proxy target is the same
  rho-adjusted q that is output.
- Constants (argparse of `main_online.py`): tau_t 0.01, tau_i 0.04, cw 0.5, cr 20, alpha 1, beta 0.8.
  - tau_t defaults to None here, meaning 1/logit_scale: that is 0.01 on CLIP, and x.T / tau_t are then
    CLIP's own zero-shot logits.
  - tta-vlm uses beta 0.4 on the fine-grained sets and alpha 0 on Caltech101 (not in the authors' code, which
    is ImageNet-only); set them per dataset if wanted.

The stream length N:
- The schedule beta_t needs N. The pipeline calls `start_stream(n_samples)`; `set_stream_length(n)` or
  `Config.stream_length` can also give it.
- With N = 0 (unknown), t/N is taken as 1, so beta_t = beta from the first sample.
- If a stream runs past N, t/N is capped at 1 so that beta_t never exceeds beta. The authors never go past N.
- C is the number of text classes, as in tta-vlm. The authors count the distinct ground-truth labels, which
  is the same on ImageNet.

The paper could not be read. The rho >= 0 projection and the column renormalisation of w are code facts.
tta-vlm's differences (fp16 autocast, a single prompt, one seeded order) are not followed; the authors' 5
random orders are the pipeline's orderings.

Records: OnZeta keeps no memory of entries. Its state is C duals and C proxies, updated at every sample. So
`appended`, `deleted` and `selected` are empty and `buffer_size` is 0.
- `entropy_before`: the entropy of softmax(x.T / tau_t), the plain zero-shot prediction.
- `entropy_after`: the entropy of the output probability vector, which already sums to 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..objectives import TuningConfig, entropy
from ..records import Outcome
from ..text import PromptTextEncoder
from .zero_shot import classifier


@dataclass(frozen=True)
class Config:
    """OnZeta's constants at the authors' (ImageNet) setting, idstcv/OnZeta main_online.py argparse."""

    tau_t: float | None = None  # text temperature; None = 1 / logit_scale (= 0.01 on CLIP, --tau_t 0.01)
    tau_i: float = 0.04  # vision-proxy temperature (--tau_i)
    cw: float = 0.5  # proxy step eta_w = cw / sqrt(t) (--cw)
    cr: float = 20.0  # dual step eta_rho = cr / sqrt(t) (--cr)
    alpha: float = 1.0  # label-proportion lower bound alpha / C (--alpha)
    beta: float = 0.8  # final proxy weight, beta_t = beta sqrt(t / N) (--beta)
    stream_length: int = 0  # N; 0 = unknown (t / N taken as 1); the pipeline sets it through start_stream

    def __post_init__(self):
        if (self.tau_t is not None and self.tau_t <= 0) or self.tau_i <= 0:
            raise ValueError("tau_t and tau_i must be > 0")
        if self.stream_length < 0:
            raise ValueError("stream_length must be >= 0")


def schedule_weight(beta: float, t: int, n: int) -> float:
    """beta * sqrt(t / N), with t / N taken as 1 when N is unknown (0) and capped at 1."""
    fraction = 1.0 if n <= 0 else min(t / n, 1.0)
    return beta * math.sqrt(fraction)


def adjusted_labels(text_logits: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """q = softmax(text_logits) * exp(rho), renormalised."""
    q = text_logits.softmax(-1) * torch.exp(rho)
    return q / q.sum()


def dual_step(rho: torch.Tensor, q: torch.Tensor, step: float, alpha: float) -> torch.Tensor:
    """rho - step (q - alpha / C), projected onto rho >= 0."""
    return torch.clamp(rho - step * (q - alpha / q.shape[-1]), min=0)


def proxy_step(proxies: torch.Tensor, x: torch.Tensor, p: torch.Tensor, q: torch.Tensor, step: float) -> torch.Tensor:
    """proxies [C, E] - step (p - q) x^T, each class proxy renormalised."""
    return F.normalize(proxies - step * torch.outer(p - q, x), dim=-1)


class OnZeta:
    """Per sample: output a mix of the proxy and the rho-adjusted text prediction, then update rho and w."""

    Config = Config
    order_independent = False
    uses_templates = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config, templates=None):
        self.config = config
        self.text_features = classifier(text, templates)[0].float()
        scale = text.logit_scale().detach().float()
        self.tau_t = float(config.tau_t) if config.tau_t is not None else float(1 / scale)
        self.stream_length = config.stream_length
        self.reset()

    def set_stream_length(self, n: int) -> None:
        """N for the beta_t schedule; 0 = unknown."""
        self.stream_length = int(n)

    def start_stream(self, n_samples: int) -> None:
        """A new stream of `n_samples`: store N and reset."""
        self.set_stream_length(n_samples)
        self.reset()

    def reset(self) -> None:
        """w = T, rho = 0, t = 0; a previously given N is kept."""
        self.proxies = self.text_features.clone()
        self.rho = torch.zeros(self.text_features.shape[0], device=self.text_features.device)
        self.t = 0

    def state_dict(self) -> dict:
        """Step count, duals rho [C], proxies w [C, E] and the stream length N."""
        return {"t": self.t, "rho": self.rho.clone(), "proxies": self.proxies.clone(),
                "stream_length": self.stream_length}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.stream_length = int(state["t"]), int(state["stream_length"])
        self.rho, self.proxies = state["rho"].to(self.rho), state["proxies"].to(self.proxies)

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        config = self.config
        self.t += 1
        t = self.t
        x = view_features[0].float()
        text_logits = x @ self.text_features.t() / self.tau_t
        q = adjusted_labels(text_logits, self.rho)
        self.rho = dual_step(self.rho, q, config.cr / math.sqrt(t), config.alpha)
        p = (x @ self.proxies.t() / config.tau_i).softmax(-1)
        weight = schedule_weight(config.beta, t, self.stream_length)
        output = weight * p + (1 - weight) * q
        self.proxies = proxy_step(self.proxies, x, p, q, config.cw / math.sqrt(t) / config.tau_i)
        return Outcome(
            pred=int(output.argmax()), entropy_before=float(entropy(text_logits)),
            entropy_after=float(-(torch.special.xlogy(output, output)).sum()),
        )

    def snapshot(self) -> dict:
        """The state: step count, duals rho [C] and proxies w [C, E], as lists."""
        return {"t": self.t, "rho": self.rho.tolist(), "proxies": self.proxies.tolist()}
