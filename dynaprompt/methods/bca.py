"""BCA (Zhou et al., CVPR 2025, "Bayesian Test-Time Adaptation for Vision-Language Models", arXiv 2503.09248):
Bayesian Class Adaptation. Class embeddings (the likelihood) and a class-to-class prior matrix, both running
means with counts, updated by every confident enough sample.

Sources. The authors' repository (buerzlh/Bayesian-Test-Time-Adaptation-for-Vision-Language-Models, linked from
TTABC's bca.py docstring) could not be fetched or found in any index here. This module follows the readings of
it that could be read, and says where they differ:
- (a) walawalagoose/TTABC ttabc/model_selection/bca.py @ 65eae15: `BCAState` with `assign_label`, `bca_step`,
  `update_centers` and `update_prior`, counts in Python lists.
- (a') The same file @ c5fbdad, a rewrite (the version the index lists as TTABC's current one).
- (b) A federated-TTA baseline runner found in the code index (its repository is not named there). Its
  class `BCA` writes the same four functions, the same names and the literal `self.tem = 100.0`.

(a) and (b) agree line for line on the rule below, so it is followed. For one sample:

- Query (`assign_label`). Likelihood logits P = tem * x . mu^T over the current class embeddings mu [C, E].
  tem is 100 (`Config.logit_scale`: "authors"; "model" takes the model's scale).
  - With several views, TPT's `select_confident_samples(P, 0.1)` keeps the int(0.1 * n_views) views of lowest
    softmax entropy, ranked under the *current* mu. x is the unnormalised mean of their features and P the mean
    of their logits.
  - TTABC runs every dataset this way: its "bca" entry (ttabc/configs/algorithms.py @ 999b436) has tpt True,
    64 views, selection_p 0.1. `query: original` uses view 0 alone.
- Posterior: s = softmax(P), the posterior over the class embeddings. f = s @ Pi, where Pi [C, C] maps
  embedding m to the classes; it starts as the identity. The prediction is argmax f, taken BEFORE the updates
  below.
- Likelihood update (`update_centers`), if max f > threshold1 (strict), on the predicted class k:
  mu_k <- normalise((c1_k * mu_k + x) / (c1_k + 1)), then c1_k += 1. c1 starts at init_count1.
- Prior update (`update_prior`), if max f > threshold2 (strict): Pi_k <- (c2_k * Pi_k + f) / (c2_k + 1), then
  c2_k += 1. c2 starts at init_count2. Pi_k stays a distribution, since f and Pi_k are ones. Both updates use
  the f computed before either.
- Constants: TTABC's algorithms.py "bca" entry, the only one that could be read: threshold1 0.05,
  init_count1 20000, threshold2 0.65, init_count2 1, selection_p 0.1. Its header says its defaults are "from
  the paper or official repo". (b)'s own defaults differ (0.5, 1, 0.9, 1), but one of its comments names
  init_count1 = 20000 as the paper's value (mis-encoded Chinese: "original paper init_count1=20000").
  - With init_count1 = 20000 an embedding moves by 1/20001 per sample: the likelihood barely adapts.
  - With init_count2 = 1 the first confident sample of a class moves its prior row halfway to f. That is the
    memory a class-correlated stream shapes.

Where the readings differ, and what is followed:
- Scale. (b) writes `self.tem = 100.0`, (a') `BCAConfig.tem = 100.0` and (a) the default argument
  `BCAState(..., tem=100.0)`, though (a)'s caller passes the model's logit_scale.exp() (100 on CLIP). The literal
  is the default.
- Query feature. (a) and (b) average the confident views' features without renormalising, and their logits
  (the same numbers as the mean feature's logits). TTABC (a') renormalises the mean and recomputes its logits.
  The first is followed.
- Renormalisation. (a') renormalises Pi_k after its update and f before it: a no-op up to rounding. Not done
  here.
- Precision. fp32 here, as TTABC's Pi. (b) keeps Pi and the embeddings in float16.
- The ranking of views is a stable sort; TPT's argsort leaves ties unspecified. The number of views is
  `objectives.n_confident` = floor(0.1 * n_views), at least 1: int(0.1 * n_views) from 10 views on.
- The text embeddings are `zero_shot.classifier(text, templates)`. The authors' classifier could not be read.

Paper: only its abstract could be read here. It describes exactly these two updates: the likelihood through
the class embeddings, and the prior through the posteriors of incoming samples. tta-vlm has no BCA.

Records. The memory is two sets of running means that forget nothing:
- An entry is one sample's contribution to a class embedding, or to a prior row. Each gets the next integer id
  (a counter shared by both and reset by `reset()`), the embedding's first.
- `appended`: this sample's contributions (0, 1 or 2 ids). `deleted` is always empty.
- `buffer_size`: the number of contributions absorbed so far, i.e. the sum over classes of (c1 - init_count1)
  + (c2 - init_count2). `snapshot()` gives them per class, and the moved prior rows.
- `entropy_before`: the entropy of s, the likelihood-only posterior. `entropy_after`: the entropy of f, the
  prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..objectives import TuningConfig, entropy
from ..records import Outcome
from ..text import PromptTextEncoder
from .tda import confident_views
from .zero_shot import LOGIT_SCALES, chosen_logit_scale, classifier

QUERIES = ("confident", "original")
AUTHORS_LOGIT_SCALE = 100.0  # (b) `self.tem = 100.0`; TTABC bca.py @ 65eae15 BCAState(..., tem=100.0) default


@dataclass(frozen=True)
class Config:
    """BCA's constants: TTABC ttabc/configs/algorithms.py @ 999b436, entry "bca" (the authors' code unreadable)."""

    query: str = "confident"  # confident: mean of the sharpest views ("tpt": True, 64 views) | original: view 0
    confident_ratio: float = 0.1  # views kept ("selection_p": 0.1; select_confident_samples)
    threshold1: float = 0.05  # max f above it moves the class embedding ("threshold1")
    init_count1: float = 20000.0  # starting count of each class embedding ("init_count1")
    threshold2: float = 0.65  # max f above it moves the prior row ("threshold2")
    init_count2: float = 1.0  # starting count of each prior row ("init_count2")
    logit_scale: str = "authors"  # authors: tem = 100 (see AUTHORS_LOGIT_SCALE) | model: the model's logit_scale

    def __post_init__(self):
        if self.query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {self.query!r}")
        if self.logit_scale not in LOGIT_SCALES:
            raise ValueError(f"logit_scale must be one of {LOGIT_SCALES}, got {self.logit_scale!r}")
        if self.init_count1 < 0 or self.init_count2 < 0:
            raise ValueError("init_count1 and init_count2 must be >= 0")


class BCA:
    """Per sample: posterior s @ Pi from the class embeddings; predict; move the embedding and the prior row."""

    Config = Config
    order_independent = False
    uses_templates = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config, templates=None):
        self.config = config
        self.text_features = classifier(text, templates)[0].float()
        self.scale = chosen_logit_scale(text, config.logit_scale, AUTHORS_LOGIT_SCALE, self.text_features.device)
        self.reset()

    @property
    def n_classes(self) -> int:
        return self.text_features.shape[0]

    def reset(self) -> None:
        """Embeddings = text features, Pi = identity, counts at their initial values, a fresh id counter."""
        n_classes = self.n_classes
        self.centers = self.text_features.clone()
        self.prior = torch.eye(n_classes, device=self.text_features.device)
        self.center_counts = [self.config.init_count1] * n_classes
        self.prior_counts = [self.config.init_count2] * n_classes
        self.next_id = 0

    def state_dict(self) -> dict:
        return {"centers": self.centers.clone(), "prior": self.prior.clone(),
                "center_counts": list(self.center_counts), "prior_counts": list(self.prior_counts),
                "next_id": self.next_id}

    def load_state_dict(self, state: dict) -> None:
        self.centers.copy_(state["centers"])
        self.prior.copy_(state["prior"])
        self.center_counts = [float(c) for c in state["center_counts"]]
        self.prior_counts = [float(c) for c in state["prior_counts"]]
        self.next_id = int(state["next_id"])

    def query(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample's feature [E] and likelihood logits [C]: view 0, or the mean over the confident views."""
        logits = self.scale * views @ self.centers.t()
        if self.config.query == "original" or views.shape[0] == 1:
            return views[0], logits[0]
        keep = confident_views(logits, self.config.confident_ratio)
        return views[keep].mean(0), logits[keep].mean(0)  # not renormalised, as in (a) and (b)

    def move_center(self, label: int, feature: torch.Tensor) -> None:
        """update_centers: mu_k <- normalise((c1 mu_k + x) / (c1 + 1)); c1 += 1."""
        count = self.center_counts[label]
        center = (count * self.centers[label] + feature) / (count + 1)
        self.centers[label] = center / torch.norm(center)
        self.center_counts[label] = count + 1

    def move_prior(self, label: int, posterior: torch.Tensor) -> None:
        """update_prior: Pi_k <- (c2 Pi_k + f) / (c2 + 1); c2 += 1."""
        count = self.prior_counts[label]
        self.prior[label] = (count * self.prior[label] + posterior) / (count + 1)
        self.prior_counts[label] = count + 1

    def absorbed(self) -> int:
        """Contributions held: the counts above their starting values, summed over classes."""
        config = self.config
        return round(sum(c - config.init_count1 for c in self.center_counts)
                     + sum(c - config.init_count2 for c in self.prior_counts))

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        config = self.config
        feature, logits = self.query(view_features.float())
        posterior = logits.softmax(-1) @ self.prior
        confidence, label = float(posterior.max()), int(posterior.argmax())
        appended = []
        if confidence > config.threshold1:
            self.move_center(label, feature)
            appended.append(self.next_id)
            self.next_id += 1
        if confidence > config.threshold2:
            self.move_prior(label, posterior)
            appended.append(self.next_id)
            self.next_id += 1
        return Outcome(pred=label, entropy_before=float(entropy(logits)),
                       entropy_after=float(torch.special.entr(posterior).sum()), appended=appended,
                       buffer_size=self.absorbed())

    def snapshot(self) -> dict:
        """Contributions per class and the moved prior rows (for inspection and tests):
        {"centers": {class: n}, "priors": {class: n}, "prior_rows": {class: [C probabilities]}}."""
        config = self.config

        def held(counts, start):
            return {k: round(c - start) for k, c in enumerate(counts) if round(c - start) > 0}
        priors = held(self.prior_counts, config.init_count2)
        return {"centers": held(self.center_counts, config.init_count1), "priors": priors,
                "prior_rows": {k: self.prior[k].tolist() for k in priors}}
