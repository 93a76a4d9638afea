"""TDA (Karmanov et al., CVPR 2024): a training-free dynamic adapter with a positive and a negative feature cache.

Read from the authors' code, kdiAAA/TDA @ e697fb0 (MIT); the method is unchanged since d4b04d3:

- Text classifier: `utils.py:clip_classifier`, the normalised mean of each class's normalised template
  embeddings. Here that is `zero_shot.classifier(text, templates)`.
- Logit scale: the authors write the literal 100 (`utils.py:74` in `get_clip_logits`,
  `clip_logits = 100. * image_features @ clip_weights`), not the model's `logit_scale`. `Config.logit_scale`
  "authors" (the default) uses that literal, "model" the model's own scale. They are equal on OpenAI CLIP; on a
  model with another scale the literal changes every entropy (the confident views, the cache ranking, the
  negative gate) and the balance of clip_logits against the cache read-outs.
- Query (`utils.py:get_clip_logits`), chosen by `Config.query`:
  - "confident", the authors' ImageNet-A/V/R/S branch. Take the int(0.1*n_views) lowest-entropy views; the
    original view competes like any other. Their query feature is the *unnormalised* mean of their features,
    their logits the mean of their logits. The entropy is that of the mean of their softmaxes
    (`utils.py:avg_entropy`), the probability vector is the mean softmax, and the pseudo-label is the argmax of
    the mean logits.
  - "original", the single-view branch used on ImageNet and the fine-grained sets. Everything comes from
    view 0.
- Normalised entropy, which gates the negative cache: H_nats / log2(C) (`utils.py:get_entropy`). Nats over
  bits is the authors' normalisation, kept on purpose.
- Cache update (`tda_runner.py:update_cache`). Append while the pseudo-class holds fewer than `capacity`
  entries. When it is full, the newcomer replaces the last (highest-entropy) entry only if its entropy is
  strictly lower; a tie is rejected. Each class list is kept sorted by ascending entropy.
- Positive cache: capacity 3 (configs/*.yaml). Every sample is offered under its pseudo-label. Its entries
  are (query feature, entropy).
- Negative cache: capacity 2 (configs/*.yaml). A sample is offered only if 0.2 < H/log2(C) < 0.5
  (`tda_runner.py:run_test_tda`; both bounds strict). Its entries are (query feature, entropy, probabilities).
- Read-out (`tda_runner.py:compute_cache_logits`): alpha * exp(-(beta - beta * q.k)) @ values.
  - The keys are the stored features, concatenated in sorted class order; q.k is a plain dot product.
  - Positive values: one-hot of the class. alpha/beta are per dataset; the defaults here are
    configs/imagenet_a.yaml's 2.0/5.0.
  - Negative values: the mask 0.03 < p < 1.0 of the stored probabilities (strict bounds), with alpha 0.117
    and beta 1.0.
- Order (`tda_runner.py:run_test_tda`): both caches are updated BEFORE the sample is predicted, so a sample
  can read itself. final = clip_logits + positive - negative, and the prediction is argmax(final).

Paper, code and tta-vlm:
- The paper, as far as it could be checked (from memory only; its text was not available), describes the
  negative pseudo-label as the classes whose probability is *below* a threshold. The code masks the classes
  with 0.03 < p < 1 and subtracts them. The code is followed (tta-vlm does the same).
- The paper speaks of a normalised entropy; the code's nats/log2(C) is kept (the gate in true H/ln C is
  (0.289, 0.721)).
- tta-vlm (TomSheng21/tta-vlm, online_method/tda.py) uses view 0 on every set and the entropy
  -sum p log(p + 1e-5). Here the exact log-softmax entropy of the authors is used, and `query` picks the view
  rule ("original" is also tta-vlm's rule). Its logits use the model's `logit_scale` (L85-86), not the authors'
  literal 100: that is `logit_scale: model`.
- The number of confident views is `objectives.n_confident` = floor(0.1 * n_views), at least 1. With at
  least 10 views this equals the authors' int(0.1 * n_views); with fewer views the authors' own code would
  average an empty selection.
- fp32 throughout. The authors run fp16 CLIP and fp16 cache values; a difference at that rounding level is
  the only one expected.
- Storage (`ClassCache`): the entries live on the device in per-class slots, [C, capacity, E], each class's
  entries first and in the list order above; only ids and entropies are mirrored on the host, for the records.
  A read-out sums each class's entries in slot order, so no cache is re-stacked, and no one-hot matrix built,
  per sample.

Records:
- Every entry put into either cache gets the next integer id; the counter is shared by both caches and
  reset by `reset()`.
- `appended` lists the ids inserted at this sample, `deleted` the ids replaced at this sample.
- `buffer_size` is the number of positive plus negative entries.
- A rejected newcomer gets no id.
- `entropy_before` is the entropy of softmax(clip_logits), the query logits the caches are added to. With
  "confident" that is the softmax of the mean logits, not the mean softmax that ranks the cache.
  `entropy_after` is the entropy of softmax(final).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from ..objectives import TuningConfig, entropy, marginal_entropy, n_confident
from ..records import Outcome
from ..text import PromptTextEncoder
from .zero_shot import LOGIT_SCALES, chosen_logit_scale, classifier

QUERIES = ("confident", "original")
AUTHORS_LOGIT_SCALE = 100.0  # utils.py:74 (get_clip_logits) `clip_logits = 100. * image_features @ clip_weights`


@dataclass(frozen=True)
class Config:
    """TDA's constants at the authors' ImageNet-A setting (kdiAAA/TDA configs/imagenet_a.yaml)."""

    query: str = "confident"  # confident: mean of the sharpest views (A/V/R/S) | original: view 0 (I, fine-grained)
    confident_ratio: float = 0.1  # utils.py:get_clip_logits, int(n_views * 0.1) views
    positive: bool = True  # configs/*.yaml positive.enabled
    shot_capacity: int = 3  # positive cache, per class (configs/*.yaml positive.shot_capacity)
    alpha: float = 2.0  # positive cache weight (configs/imagenet_a.yaml positive.alpha)
    beta: float = 5.0  # positive cache sharpness (configs/imagenet_a.yaml positive.beta)
    negative: bool = True  # configs/*.yaml negative.enabled
    neg_shot_capacity: int = 2  # negative cache, per class (configs/*.yaml negative.shot_capacity)
    neg_alpha: float = 0.117  # negative cache weight (configs/*.yaml negative.alpha)
    neg_beta: float = 1.0  # negative cache sharpness (configs/*.yaml negative.beta)
    neg_entropy_lower: float = 0.2  # band on H_nats / log2(C), strict (configs/*.yaml entropy_threshold.lower)
    neg_entropy_upper: float = 0.5  # (configs/*.yaml entropy_threshold.upper)
    neg_mask_lower: float = 0.03  # a class is negative if lower < p < upper (configs/*.yaml mask_threshold.lower)
    neg_mask_upper: float = 1.0  # (configs/*.yaml mask_threshold.upper)
    logit_scale: str = "authors"  # authors: utils.py:74's literal 100 (AUTHORS_LOGIT_SCALE) | model: the model's own

    def __post_init__(self):
        if self.query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {self.query!r}")
        if self.logit_scale not in LOGIT_SCALES:
            raise ValueError(f"logit_scale must be one of {LOGIT_SCALES}, got {self.logit_scale!r}")
        if self.shot_capacity < 1 or self.neg_shot_capacity < 1:
            raise ValueError("cache capacities must be >= 1")


@dataclass(frozen=True, eq=False)
class Query:
    """What a sample is represented by: feature [E], logits [C], entropy, probabilities [C], pseudo-label."""

    feature: torch.Tensor
    logits: torch.Tensor
    entropy: float
    probs: torch.Tensor
    label: int


def class_logits(view_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Logits [V, C] of every view against the class text features [C, E]."""
    return scale * view_features.float() @ text_features.t()


def confident_views(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the n_confident(V, ratio) lowest-entropy views, most confident first."""
    return torch.argsort(entropy(logits), stable=True)[: n_confident(logits.shape[0], ratio)]


def represent(view_features: torch.Tensor, logits: torch.Tensor, query: str, ratio: float) -> Query:
    """The sample's query: view 0 ("original"), or the mean over its confident views ("confident")."""
    if query == "original":
        probs = logits[0].softmax(-1)
        return Query(view_features[0].float().clone(), logits[0], float(entropy(logits[0])), probs,
                     int(logits[0].argmax()))
    keep = confident_views(logits, ratio)
    mean_logits = logits[keep].mean(0)
    return Query(
        feature=view_features[keep].float().mean(0),  # not renormalised, as in the authors' code
        logits=mean_logits,
        entropy=float(marginal_entropy(logits[keep].unsqueeze(1))[0]),  # of the mean softmax
        probs=logits[keep].softmax(-1).mean(0),
        label=int(mean_logits.argmax()),
    )


def normalised_entropy(value: float, n_classes: int) -> float:
    """H_nats / log2(C), the authors' normalisation (utils.py:get_entropy)."""
    return value / math.log2(n_classes)


def negative_mask(probs: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """1 where lower < p < upper (strict), the classes a negative entry speaks against."""
    return ((probs > lower) & (probs < upper)).float()


class ClassCache:
    """Up to `capacity` entries per class, kept on the device: features [C, K, E], ids [C, K] (-1: empty) and,
    for negative caches, class masks [C, K, C]. A class's entries fill its first slots in list order; the host
    mirrors only (id, entropy) per class, which the update rules and the records read.

    `offer` keeps the lowest entropies (TDA's rule: append while there is room, else replace the worst only if
    strictly better; the list stays sorted, ties keeping the older entry first); `push` is first in, first out.
    """

    def __init__(self, n_classes: int, capacity: int, dim: int, device, masks: bool = False):
        self.capacity = capacity
        self.features = torch.zeros(n_classes, capacity, dim, device=device)
        self.ids = torch.full((n_classes, capacity), -1, dtype=torch.long, device=device)
        self.masks = torch.zeros(n_classes, capacity, n_classes, device=device) if masks else None
        self.entries: dict[int, list[tuple[int, float]]] = {}  # class -> [(id, entropy)], slot order

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.entries.values())

    def __bool__(self) -> bool:
        return bool(self.entries)

    def offer(self, label: int, new_id: int, feature: torch.Tensor, value: float, mask=None) -> tuple[bool, list]:
        """Insert by entropy rank; (kept, ids removed). A full class drops its last entry for a lower entropy."""
        entries = self.entries.setdefault(label, [])
        removed = []
        if len(entries) == self.capacity:
            if not value < entries[-1][1]:
                return False, []
            removed = [entries.pop()[0]]
        position = bisect.bisect_right([e for _, e in entries], value)
        self._shift_right(label, position, len(entries))
        entries.insert(position, (new_id, value))
        self._write(label, position, new_id, feature, mask)
        return True, removed

    def push(self, label: int, new_id: int, feature: torch.Tensor, value: float, mask=None) -> tuple[bool, list]:
        """Append; past capacity the oldest entry leaves; (kept, ids removed)."""
        entries = self.entries.setdefault(label, [])
        removed = []
        if len(entries) == self.capacity:
            removed = [entries.pop(0)[0]]
            for tensor in self._rows():
                tensor[label, :-1] = tensor[label, 1:].clone()
        entries.append((new_id, value))
        self._write(label, len(entries) - 1, new_id, feature, mask)
        return True, removed

    def _rows(self):
        return [t for t in (self.features, self.ids, self.masks) if t is not None]

    def _shift_right(self, label: int, position: int, count: int) -> None:
        """Slots position..count-1 of `label` move one up (the last one falls off a full row)."""
        end = min(count + 1, self.capacity)
        if position < end - 1:
            for tensor in self._rows():
                tensor[label, position + 1:end] = tensor[label, position:end - 1].clone()

    def _write(self, label: int, slot: int, new_id: int, feature: torch.Tensor, mask) -> None:
        self.features[label, slot] = feature
        self.ids[label, slot] = new_id
        if self.masks is not None:
            self.masks[label, slot] = mask

    def affinity(self, query: torch.Tensor, beta: float) -> torch.Tensor:
        """exp(-(beta - beta * q.k)) per slot [C, K], 0 on empty slots."""
        weights = torch.exp(-(beta - beta * (self.features @ query)))
        return weights * (self.ids >= 0)

    def positive_logits(self, query: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        """alpha * sum over each class's entries of exp(-beta (1 - q.k)) -> [C]."""
        return alpha * self.affinity(query, beta).sum(1)

    def negative_logits(self, query: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        """alpha * sum_j exp(-beta (1 - q.k_j)) mask_j -> [C], to be subtracted."""
        return alpha * torch.einsum("ck,ckd->d", self.affinity(query, beta), self.masks)

    def snapshot(self) -> dict:
        """{class: [(id, entropy), ...]} over the non-empty classes."""
        return {label: list(entries) for label, entries in sorted(self.entries.items()) if entries}

    def state_dict(self) -> dict:
        state = {"features": self.features.clone(), "ids": self.ids.clone(),
                 "entries": {int(k): [list(e) for e in v] for k, v in self.entries.items()}}
        if self.masks is not None:
            state["masks"] = self.masks.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.features.copy_(state["features"])
        self.ids.copy_(state["ids"])
        if self.masks is not None:
            self.masks.copy_(state["masks"])
        self.entries = {int(k): [(int(i), float(e)) for i, e in v] for k, v in state["entries"].items()}


class TDA:
    """Per sample: represent it, offer it to the positive (and, if uncertain, the negative) cache, then read both."""

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
        """Empty caches and a fresh id counter, at the start of a stream."""
        n_classes, dim = self.text_features.shape
        device = self.text_features.device
        self.positive = ClassCache(n_classes, self.config.shot_capacity, dim, device)
        self.negative = ClassCache(n_classes, self.config.neg_shot_capacity, dim, device, masks=True)
        self.next_id = 0

    def in_negative_band(self, query: Query) -> bool:
        """0.2 < H / log2(C) < 0.5, both strict."""
        value = normalised_entropy(query.entropy, self.n_classes)
        return self.config.neg_entropy_lower < value < self.config.neg_entropy_upper

    def offer(self, cache: ClassCache, query: Query, appended: list[int], deleted: list[int], mask=None) -> None:
        """Offer the sample under its pseudo-label; it takes an id only if it is kept."""
        kept, removed = cache.offer(query.label, self.next_id, query.feature, query.entropy, mask)
        if kept:
            appended.append(self.next_id)
            self.next_id += 1
        deleted.extend(removed)

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        config = self.config
        logits = class_logits(view_features, self.text_features, self.scale)
        query = represent(view_features, logits, config.query, config.confident_ratio)
        appended, deleted = [], []
        if config.positive:
            self.offer(self.positive, query, appended, deleted)
        if config.negative and self.in_negative_band(query):
            mask = negative_mask(query.probs, config.neg_mask_lower, config.neg_mask_upper)
            self.offer(self.negative, query, appended, deleted, mask)
        final = self.final_logits(query)
        return Outcome(
            pred=int(final.argmax()), entropy_before=float(entropy(query.logits)), entropy_after=float(entropy(final)),
            appended=appended, deleted=deleted, buffer_size=len(self.positive) + len(self.negative),
        )

    def final_logits(self, query: Query) -> torch.Tensor:
        """clip_logits + positive read-out - negative read-out (each only when its cache holds something)."""
        config = self.config
        final = query.logits.clone()
        if self.positive:
            final += self.positive.positive_logits(query.feature, config.alpha, config.beta)
        if self.negative:
            final -= self.negative.negative_logits(query.feature, config.neg_alpha, config.neg_beta)
        return final

    def snapshot(self) -> dict:
        """The caches as {"positive"|"negative": {class: [(id, entropy), ...]}}, for inspection and tests."""
        return {"positive": self.positive.snapshot(), "negative": self.negative.snapshot()}

    def state_dict(self) -> dict:
        return {"positive": self.positive.state_dict(), "negative": self.negative.state_dict(),
                "next_id": self.next_id}

    def load_state_dict(self, state: dict) -> None:
        self.positive.load_state_dict(state["positive"])
        self.negative.load_state_dict(state["negative"])
        self.next_id = int(state["next_id"])
