"""TDA (Karmanov et al., CVPR 2024): a training-free dynamic adapter with a positive and a negative feature cache.

Read from the authors' code, kdiAAA/TDA @ e697fb0 (MIT); the method is unchanged since d4b04d3:

- Text classifier: `utils.py:clip_classifier`, the normalised mean of each class's normalised template
  embeddings. Here that is `zero_shot.classifier(text, templates)`. The scale is the model's own
  `logit_scale` (the authors hard-code 100, which is the same on OpenAI CLIP).
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
  rule ("original" is also tta-vlm's rule).
- The number of confident views is `objectives.n_confident` = floor(0.1 * n_views), at least 1. With at
  least 10 views this equals the authors' int(0.1 * n_views); with fewer views the authors' own code would
  average an empty selection.
- fp32 throughout. The authors run fp16 CLIP and fp16 cache values; a difference at that rounding level is
  the only one expected.

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

import math
from dataclasses import dataclass

import torch

from ..objectives import TuningConfig, entropy, marginal_entropy, n_confident
from ..records import Outcome
from ..text import PromptTextEncoder
from .zero_shot import classifier

QUERIES = ("confident", "original")


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

    def __post_init__(self):
        if self.query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {self.query!r}")
        if self.shot_capacity < 1 or self.neg_shot_capacity < 1:
            raise ValueError("cache capacities must be >= 1")


@dataclass(frozen=True, eq=False)
class Entry:
    """One cached sample: its id, feature [E], entropy (nats), probabilities [C] (negative caches only).

    `view` is the view index of a BoostAdapter boosting entry; it is None for every persistent entry.
    """

    id: int | None
    feature: torch.Tensor
    entropy: float
    probs: torch.Tensor | None = None
    view: int | None = None


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


def keep_lowest_entropy(entries: list[Entry], new: Entry, capacity: int) -> tuple[list[Entry], list[Entry]]:
    """TDA's update of one class list: (kept, sorted by entropy; removed, a rejected newcomer included)."""
    if len(entries) < capacity:
        kept, removed = entries + [new], []
    elif new.entropy < entries[-1].entropy:
        kept, removed = entries[:-1] + [new], [entries[-1]]
    else:
        kept, removed = list(entries), [new]
    return sorted(kept, key=lambda entry: entry.entropy), removed


def flatten(cache: dict[int, list[Entry]]) -> list[tuple[int, Entry]]:
    """(class, entry) pairs in sorted class order, then list order, as the authors concatenate the keys."""
    return [(label, entry) for label in sorted(cache) for entry in cache[label]]


def affinity_weights(query: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-(beta - beta * q.k)) per key; keys [N, E]."""
    return torch.exp(-(beta - beta * (keys @ query)))


def positive_logits(query: torch.Tensor, cache: dict[int, list[Entry]], n_classes: int, alpha: float,
                    beta: float) -> torch.Tensor:
    """alpha * sum_j exp(-beta (1 - q.k_j)) onehot(class_j) -> [C]."""
    pairs = flatten(cache)
    keys = torch.stack([entry.feature for _, entry in pairs])
    values = torch.nn.functional.one_hot(torch.tensor([label for label, _ in pairs]), n_classes).to(keys)
    return alpha * affinity_weights(query, keys, beta) @ values


def negative_mask(probs: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """1 where lower < p < upper (strict), the classes a negative entry speaks against."""
    return ((probs > lower) & (probs < upper)).float()


def negative_logits(query: torch.Tensor, cache: dict[int, list[Entry]], alpha: float, beta: float,
                    lower: float, upper: float) -> torch.Tensor:
    """alpha * sum_j exp(-beta (1 - q.k_j)) mask_j -> [C], to be subtracted."""
    entries = [entry for _, entry in flatten(cache)]
    keys = torch.stack([entry.feature for entry in entries])
    values = torch.stack([negative_mask(entry.probs, lower, upper) for entry in entries]).to(keys)
    return alpha * affinity_weights(query, keys, beta) @ values


def cache_size(cache: dict[int, list[Entry]]) -> int:
    return sum(len(entries) for entries in cache.values())


class TDA:
    """Per sample: represent it, offer it to the positive (and, if uncertain, the negative) cache, then read both."""

    Config = Config
    order_independent = False
    uses_templates = True

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config, templates=None):
        self.config = config
        self.text_features = classifier(text, templates)[0].float()
        self.scale = text.logit_scale().detach().float()
        self.reset()

    @property
    def n_classes(self) -> int:
        return self.text_features.shape[0]

    def reset(self) -> None:
        """Empty caches and a fresh id counter, at the start of a stream."""
        self.positive: dict[int, list[Entry]] = {}
        self.negative: dict[int, list[Entry]] = {}
        self.next_id = 0

    def in_negative_band(self, query: Query) -> bool:
        """0.2 < H / log2(C) < 0.5, both strict."""
        value = normalised_entropy(query.entropy, self.n_classes)
        return self.config.neg_entropy_lower < value < self.config.neg_entropy_upper

    def offer(self, cache: dict[int, list[Entry]], query: Query, capacity: int, with_probs: bool,
              appended: list[int], deleted: list[int]) -> None:
        """Offer the sample under its pseudo-label; it takes an id only if it is kept."""
        new = Entry(self.next_id, query.feature, query.entropy, query.probs if with_probs else None)
        kept, removed = keep_lowest_entropy(cache.get(query.label, []), new, capacity)
        cache[query.label] = kept
        if new in kept:
            self.next_id += 1
            appended.append(new.id)
        deleted.extend(entry.id for entry in removed if entry is not new)

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        config = self.config
        logits = class_logits(view_features, self.text_features, self.scale)
        query = represent(view_features, logits, config.query, config.confident_ratio)
        appended, deleted = [], []
        if config.positive:
            self.offer(self.positive, query, config.shot_capacity, False, appended, deleted)
        if config.negative and self.in_negative_band(query):
            self.offer(self.negative, query, config.neg_shot_capacity, True, appended, deleted)
        final = self.final_logits(query)
        return Outcome(
            pred=int(final.argmax()), entropy_before=float(entropy(query.logits)), entropy_after=float(entropy(final)),
            appended=appended, deleted=deleted, buffer_size=cache_size(self.positive) + cache_size(self.negative),
        )

    def final_logits(self, query: Query) -> torch.Tensor:
        """clip_logits + positive read-out - negative read-out (each only when its cache holds something)."""
        config = self.config
        final = query.logits.clone()
        if self.positive:
            final += positive_logits(query.feature, self.positive, self.n_classes, config.alpha, config.beta)
        if self.negative:
            final -= negative_logits(query.feature, self.negative, config.neg_alpha, config.neg_beta,
                                     config.neg_mask_lower, config.neg_mask_upper)
        return final

    def snapshot(self) -> dict:
        """The caches as {"positive"|"negative": {class: [(id, entropy), ...]}}, for inspection and tests."""
        return {name: {label: [(entry.id, entry.entropy) for entry in entries] for label, entries in cache.items()}
                for name, cache in (("positive", self.positive), ("negative", self.negative))}
