"""DOTA (Han et al., NeurIPS 2025, "Distributional Test-Time Adaptation of Vision-Language Models", arXiv
2409.19375): per-class Gaussian means and covariances estimated online from every test sample, weighted by the
zero-shot probabilities, read as a Gaussian discriminant and added to the zero-shot logits with a weight that grows
with the samples seen. Nothing is ever dropped: the memory is unbounded.

Read from the authors' code, skylineeeeen/DOTA @ bc67d44 (MIT; a fork of TDA's code). `dota.py` is
`dota_gda_em_aug.py` renamed at 10386ec, unchanged since 2a6a6b2. Everything below is `dota.py:run_test_dota` and
what it calls in `dota.py:DOTA` and `utils.py`, in the order it runs for one sample:

- Text classifier (`utils.py:clip_classifier`): the normalised mean of each class's normalised template embeddings
  (TDA's `datasets/*.py` templates, line for line). Here it is `zero_shot.classifier(text, templates)`.
- 1. Query (`utils.py:get_clip_logits_aug`, L93-120), by `Config.query`. clip_logits = 100 * f . T (L103):
  - "confident": the authors' A/V/R/S loader gives 64 views (63 AugMix + the original, `utils.py:get_ood_preprocess`).
    The int(0.1 * n_views) views of lowest softmax entropy are kept (L106-107; view 0 competes like any other).
    Their features x [k, E] are all kept (not averaged), clip_logits is the mean of their logits (L110) and the
    soft labels y [k, C] are each view's own softmax (L113, not their mean).
  - "original": ImageNet and the fine-grained sets, whose loaders give the one CLIP-preprocessed image: k = 1,
    everything from view 0.
- 2. Read-out (`DOTA.predict`, L70-78), BEFORE this sample is fitted: a linear discriminant with the shared
  precision Lambda and the class means mu: with W = Lambda mu^T, dota_logits = q . W - 0.5 * sum(mu^T * W) per
  class, q the unnormalised mean of the k query features (L102).
- 3. Fusion (L105-107): weight = min(rho * mean_c(n_c) / k, eta), n_c the per-class soft counts (which start at 1,
  L36, so the first sample already has weight rho / k). final = clip_logits + weight * dota_logits;
  pred = argmax(final). With k views per sample the mean count grows by k / C per sample, so the weight grows
  linearly to eta: at ImageNet-A's rho 0.02, eta 0.5, k 6, C 200 it reaches eta after ~5,000 samples.
- 4. Fit (`DOTA.fit`, L42-61), a soft-assignment online update with s_c = sum_b y_bc:
  - mu_c <- (sum_b y_bc x_b + n_c mu_c) / (s_c + n_c); n_c <- n_c + s_c.
  - Sigma_c <- (n_c Sigma_c + sum_b y_bc (x_b - mu_c)(x_b - mu_c)^T) / (n_c + s_c), with the OLD mu_c and n_c
    (`streaming_update_Sigma=True`, the default).
  - The shared covariance is the plain mean of the C class covariances (L59), not weighted by the counts.
- 5. Precision (`DOTA.update`, L64-67): Lambda = inverse((1 - eps) * Sigma_shared + eps * I), once per sample.
- Initial state (`main`, L158-159, and `DOTA.__init__`, L35-39): every mean is the constant 0.001 (`tensor_matrix`;
  the comment on L35 says "initialize mu with clip_weights", but the matrix passed is the constant, so the
  constant is followed: `init_mean: constant`); counts 1; Sigma_c = sigma * I; Lambda = pinverse(sigma * I) =
  I / sigma, without the epsilon that every later Lambda has.
- Constants, configs/vit/<name>.yaml (file names as TDA's): epsilon L3, sigma L4, eta L5, rho L6. The defaults here
  are imagenet_a.yaml's: epsilon 1e-4, sigma 0.002, eta 0.5, rho 0.02.
- Logit scale: the authors write 100 (`utils.py:103`, and L74 in `get_clip_logits`). `logit_scale: authors` (the
  default) uses that literal; `model` uses the model's own `logit_scale`. It changes both the fusion's balance
  (dota_logits are not scaled) and the soft labels' sharpness. On OpenAI CLIP the two are the same.

Paper, code and other implementations:
- The paper's text beyond its abstract was not available here. Its abstract (class-conditional distributions of
  the test embeddings estimated online, posteriors by Bayes' theorem) matches the code.
- TTABC (walawalagoose/TTABC @ 18dc51a, `ttabc/model_selection/dota.py`) ports the authors' class verbatim and
  differs in three places; the authors are followed in each:
  1. It calls `update()` once before the stream, so its first Lambda has the epsilon: 1 / ((1 - eps) sigma + eps).
  2. Its `init_mu: clip_text` passes the [C, E] text features where the class expects [E, C]; its default
     ("constant", 1e-3) is the authors'. Here `init_mean: text` starts the means at the class text features.
  3. It takes the model's logit scale (TTABC's model returns scaled logits): `logit_scale: model` here.
  Another stored version of that file, c5fbdad, builds the state inside the sample loop, so nothing carries from
  one sample to the next.
- tta-vlm (TomSheng21/tta-vlm @ bcc735f) has no DOTA.
- The number of confident views is `objectives.n_confident` = floor(0.1 * n_views), at least 1: the authors'
  int(0.1 * n_views) from 10 views on. The ranking is a stable sort (the authors' argsort leaves ties unspecified).
- fp32 throughout. The authors run an fp16 CLIP (features, logits and soft labels in fp16) and their read-out casts
  Lambda and the means to fp16 (L67, L74); their statistics are fp32. A difference at fp16 rounding is the only one
  expected.
- Storage: the C class covariances [C, E, E] are kept, as the authors keep them (the shared one is their plain mean
  and each class's is rescaled by its own count, so the mean cannot be updated without them): at ImageNet scale
  (1000 classes, E 512) that is 1 GiB in fp32, in the device memory and in every checkpoint.

Records:
- An entry is one test sample absorbed into the class statistics. Every sample is absorbed and none leaves.
- `appended` is the sample's id (a counter reset by `reset()`); `deleted` is always empty; `buffer_size` is the
  number of samples absorbed so far. The per-class soft counts and the current fusion weight are in `snapshot()`.
- `selected` is empty.
- `entropy_before`: H(softmax(clip_logits)), the query logits (for "confident" the mean logits).
  `entropy_after`: H(softmax(final)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objectives import TuningConfig, entropy
from ..records import Outcome
from ..text import PromptTextEncoder
from .dpe import query_views
from .tda import class_logits
from .zero_shot import classifier

QUERIES = ("confident", "original")
INIT_MEANS = ("constant", "text")
LOGIT_SCALES = ("authors", "model")


@dataclass(frozen=True)
class Config:
    """DOTA's constants at the authors' ImageNet-A setting (skylineeeeen/DOTA configs/vit/imagenet_a.yaml, dota.py)."""

    query: str = "confident"  # confident: the sharpest views (A/V/R/S loader) | original: view 0 (I, fine-grained)
    confident_ratio: float = 0.1  # utils.py:107, int(n_views * 0.1) views
    epsilon: float = 1e-4  # covariance shrinkage toward I before the inverse (imagenet_a.yaml:3, dota.py:66)
    sigma: float = 0.002  # initial covariance sigma * I (imagenet_a.yaml:4, dota.py:37)
    eta: float = 0.5  # the fusion weight's cap (imagenet_a.yaml:5, dota.py:105)
    rho: float = 0.02  # the fusion weight's growth per unit of mean count (imagenet_a.yaml:6, dota.py:105)
    init_mean: str = "constant"  # constant: every mean init_mean_value (dota.py:158) | text: the class text features
    init_mean_value: float = 0.001  # dota.py:158 torch.full(..., 0.001)
    logit_scale: str = "authors"  # authors: the literal below (utils.py:103) | model: the model's logit_scale
    authors_logit_scale: float = 100.0  # utils.py:103 clip_logits = 100. * image_features @ clip_weights

    def __post_init__(self):
        for name, allowed in (("query", QUERIES), ("init_mean", INIT_MEANS), ("logit_scale", LOGIT_SCALES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.sigma <= 0 or not 0 <= self.epsilon < 1:
            raise ValueError("sigma must be > 0 and epsilon in [0, 1)")


def logit_scale(config, text: PromptTextEncoder) -> torch.Tensor:
    """The authors' literal scale, or the model's own (`logit_scale: model`)."""
    model_scale = text.logit_scale().detach().float()
    if config.logit_scale == "model":
        return model_scale
    return torch.tensor(config.authors_logit_scale, device=model_scale.device)


def discriminant_logits(query: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """q . W - 0.5 * sum(mu^T * W) per class, W = Lambda mu^T (dota.py:predict) -> [C]."""
    weights = precision @ means.t()
    bias = 0.5 * (means.t() * weights).sum(0)
    return query @ weights - bias


class DOTA:
    """Per sample: query, read the class Gaussians, fuse with the zero-shot logits, then fit the sample into them."""

    Config = Config
    order_independent = False
    uses_templates = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config, templates=None):
        self.config = config
        self.text_features = classifier(text, templates)[0].float()
        self.scale = logit_scale(config, text)
        self.reset()

    def reset(self) -> None:
        """Means at their initial value, counts 1, covariances sigma * I, Lambda = pinv(sigma * I), no samples."""
        config = self.config
        n_classes, dim = self.text_features.shape
        device = self.text_features.device
        if config.init_mean == "text":
            self.means = self.text_features.clone()
        else:
            self.means = torch.full((n_classes, dim), config.init_mean_value, device=device)
        self.counts = torch.ones(n_classes, device=device)
        self.covariances = config.sigma * torch.eye(dim, device=device).repeat(n_classes, 1, 1)
        self.precision = torch.linalg.pinv(self.covariances.mean(0).double()).float()  # dota.py:39, no epsilon
        self.absorbed = 0

    def state_dict(self) -> dict:
        return {"means": self.means.clone(), "counts": self.counts.clone(), "covariances": self.covariances.clone(),
                "precision": self.precision.clone(), "absorbed": self.absorbed}

    def load_state_dict(self, state: dict) -> None:
        for name in ("means", "counts", "covariances", "precision"):
            getattr(self, name).copy_(state[name])
        self.absorbed = int(state["absorbed"])

    def fusion_weight(self, n_query: int) -> torch.Tensor:
        """min(rho * mean count / k, eta) (dota.py:105)."""
        return torch.clamp(self.config.rho * self.counts.mean() / n_query, max=self.config.eta)

    def fit(self, features: torch.Tensor, soft_labels: torch.Tensor) -> None:
        """Absorb the query views `features` [k, E] with their soft labels [k, C] (dota.py:fit), then refresh Lambda."""
        counts, totals = self.counts.unsqueeze(1), soft_labels.sum(0).unsqueeze(1)
        means = (soft_labels.t() @ features + counts * self.means) / (totals + counts)
        centred = features.unsqueeze(1) - self.means.unsqueeze(0)  # [k, C, E], from the old means
        scatter = torch.einsum("bji,bjk->jik", soft_labels.unsqueeze(2) * centred, centred)
        # (n_c Sigma_c + scatter_c) / (n_c + s_c), in place: at ImageNet scale each [C, E, E] temporary is 1 GiB
        self.covariances.mul_(counts.unsqueeze(2)).add_(scatter).div_((counts + totals).unsqueeze(2))
        self.means, self.counts = means, self.counts + totals[:, 0]
        self.update_precision()

    def update_precision(self) -> None:
        """Lambda = inverse((1 - eps) * mean_c Sigma_c + eps * I) (dota.py:update)."""
        eps, shared = self.config.epsilon, self.covariances.mean(0)
        identity = torch.eye(shared.shape[0], device=shared.device)
        self.precision = torch.linalg.inv((1 - eps) * shared + eps * identity)

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        config = self.config
        views = view_features.float()
        logits = class_logits(views, self.text_features, self.scale)
        keep = query_views(logits, config.query, config.confident_ratio)
        query_features, query_logits = views[keep], logits[keep].mean(0)
        dota_logits = discriminant_logits(query_features.mean(0), self.means, self.precision)
        final = query_logits + self.fusion_weight(len(keep)) * dota_logits
        self.fit(query_features, logits[keep].softmax(-1))
        sample_id = self.absorbed
        self.absorbed += 1
        pred, before, after = torch.stack([final.argmax().double(), entropy(query_logits).double(),
                                           entropy(final).double()]).tolist()
        return Outcome(pred=int(pred), entropy_before=before, entropy_after=after, appended=[sample_id],
                       buffer_size=self.absorbed)

    def snapshot(self) -> dict:
        """{"counts": per-class soft counts, "absorbed": samples seen}, read from the device (inspection, tests)."""
        return {"counts": self.counts.tolist(), "absorbed": self.absorbed}
