"""R-TPT by hand: the pointwise entropy, the reliability weights, AdamW's first step, the weighted logits, records.

The text side is a stub whose "text features" are the normalised rows of the context itself (3 classes in R^4).
Expected values come from plain `math`, or from the loss written out again with plain torch ops and autograd.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dynaprompt.methods.rtpt import RTPT, Config, pointwise_entropy, reliability_weights
from dynaprompt.objectives import TuningConfig, marginal_entropy
from dynaprompt.runner import run_stream

from .conftest import random_view_features

INIT = torch.tensor([[1.0, 0.2, 0.0, 0.1], [0.0, 1.0, 0.3, 0.0], [0.1, 0.0, 1.0, 0.2]])
SCALE = 5.0


class ContextText:
    """Text features = the context's rows, normalised: C = n_ctx = 3 classes in R^4, differentiable in the context."""

    def __init__(self, init: torch.Tensor = INIT, scale: float = SCALE):
        self.init_context = init.clone()
        self.scale = scale

    def encode(self, contexts: torch.Tensor) -> torch.Tensor:
        return F.normalize(contexts, dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(self.scale)


def softmax(logits) -> list[float]:
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return [x / sum(e) for x in e]


def entropy_of(probs) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def dot(u, v) -> float:
    return sum(a * b for a, b in zip(u, v))


def unit(*coords) -> list[float]:
    norm = math.sqrt(sum(c * c for c in coords))
    return [c / norm for c in coords]


def hand_weights(rows, k: int, temperature: float, skip=(), keep_self=()) -> list[float]:
    """softmax over views of (mean of the k largest dot products with the other views, minus `skip` pairs, plus the
    view's own for the views in `keep_self`) / T."""
    scores = []
    for v, row in enumerate(rows):
        neighbours = [dot(row, other) for u, other in enumerate(rows)
                      if (u != v or v in keep_self) and {u, v} not in skip]
        scores.append(sum(sorted(neighbours, reverse=True)[:k]) / k)
    return softmax([s / temperature for s in scores])


ROWS = [unit(1, 0, 0), unit(1, 0.3, 0), unit(1, 0, 0.5), unit(0.2, 1, 0), unit(1, 0.4, 0.4)]


def test_pointwise_entropy_is_the_mean_of_the_views_own_entropies():
    # two confident views that disagree: each is sharp, their mean is not
    logits = torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]]])
    sharp = entropy_of(softmax([3.0, 0.0, 0.0]))
    assert float(pointwise_entropy(logits)[0]) == pytest.approx(sharp, rel=1e-6)
    mean = [(a + b) / 2 for a, b in zip(softmax([3.0, 0.0, 0.0]), softmax([0.0, 3.0, 0.0]))]
    assert float(marginal_entropy(logits)[0]) == pytest.approx(entropy_of(mean), rel=1e-6)
    assert entropy_of(mean) > sharp + 0.4  # TPT's objective would call this pair uncertain


def test_reliability_weights_by_hand():
    features = torch.tensor(ROWS)
    got = reliability_weights(features, neighbours=2, temperature=0.1, self_similarity="always_drop").tolist()
    assert got == pytest.approx(hand_weights(ROWS, 2, 0.1), rel=1e-5)
    assert sum(got) == pytest.approx(1.0)
    # the outlier (view 3, mostly e1) has the lowest weight; more neighbours than views: all the others count
    assert min(range(5), key=got.__getitem__) == 3
    assert reliability_weights(features, 20, 0.1, "always_drop").tolist() == pytest.approx(
        hand_weights(ROWS, 4, 0.1), rel=1e-5)
    assert reliability_weights(features[:1], 20, 0.01).tolist() == [1.0]


def test_always_drop_never_counts_a_view_as_its_own_neighbour_and_both_rules_drop_duplicates():
    # features just short of unit norm: the self-similarity 0.998 < 1.0 is dropped all the same
    shrunk = [[0.999 * c for c in row] for row in ROWS]
    got = reliability_weights(torch.tensor(shrunk), neighbours=2, temperature=0.1, self_similarity="always_drop")
    assert got.tolist() == pytest.approx(hand_weights(shrunk, 2, 0.1), rel=1e-5)
    # the authors' rule keeps every 0.998 as the view's own top neighbour
    got = reliability_weights(torch.tensor(shrunk), neighbours=2, temperature=0.1, self_similarity="authors")
    assert got.tolist() == pytest.approx(hand_weights(shrunk, 2, 0.1, keep_self=range(5)), rel=1e-5)
    # an exact duplicate (similarity 1.0 >= 1.0): no neighbour of its twin either (the authors' rule: below)
    rows = [ROWS[0], ROWS[0], *ROWS[2:]]
    got = reliability_weights(torch.tensor(rows), neighbours=2, temperature=0.1, self_similarity="always_drop")
    assert got.tolist() == pytest.approx(hand_weights(rows, 2, 0.1, skip=[{0, 1}]), rel=1e-5)


def test_authors_rule_keeps_a_self_similarity_that_rounds_below_one():
    """rtpt.py:39 drops only entries >= 1.0: a unit vector whose squared norm rounds below 1.0 in fp32 stays its own
    top neighbour; one that rounds to 1.0 does not, nor does its exact duplicate. "always_drop" drops every self."""
    raw = [(1, 2, 3, 0), (0.2, 1, 0, 0), (1, 0, 0, 0), (1, 0.3, 0, 0), (1, 0.4, 0.4, 0), (1, 0, 0, 0)]
    features = F.normalize(torch.tensor(raw, dtype=torch.float32), dim=-1)
    # in fp32, |(1,2,3)/sqrt 14|^2 = 1 - 1.2e-7 and |(1,0.3)/|.||^2 = 1 - 6e-8 (any summation order); the others 1.0
    assert (features @ features.t()).diagonal().tolist() == [1 - 2 ** -23, 1.0, 1.0, 1 - 2 ** -24, 1.0, 1.0]
    rows = [unit(*r) for r in raw]
    authors = reliability_weights(features, neighbours=2, temperature=0.1, self_similarity="authors").tolist()
    assert authors == pytest.approx(hand_weights(rows, 2, 0.1, skip=[{2, 5}], keep_self=[0, 3]), rel=1e-5)
    always = reliability_weights(features, neighbours=2, temperature=0.1, self_similarity="always_drop").tolist()
    assert always == pytest.approx(hand_weights(rows, 2, 0.1, skip=[{2, 5}]), rel=1e-5)
    assert authors[0] > always[0] and authors[3] > always[3]  # a view that counts itself scores higher
    with pytest.raises(ValueError):
        Config(self_similarity="never")


def hand_loss(context: torch.Tensor, views: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Mean over the kept views of each view's entropy, with plain torch ops."""
    t = context / context.norm(dim=-1, keepdim=True)
    p = (SCALE * views[keep] @ t.T).softmax(-1)
    return -(p * p.log()).sum(-1).mean()


def test_one_step_and_the_weighted_prediction_by_hand():
    views = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(3)), dim=-1)
    config = Config(neighbours=3, temperature=0.05, self_similarity="always_drop")  # the rule tested above
    method = RTPT(ContextText(), TuningConfig(lr=0.1, confident_ratio=0.34), config)  # 2 confident views
    rows0 = F.normalize(INIT, dim=-1).tolist()
    h = [entropy_of(softmax([SCALE * dot(v, r) for r in rows0])) for v in views.tolist()]
    keep = sorted(range(6), key=h.__getitem__)[:2]
    context = INIT.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(hand_loss(context, views, keep), context)
    want = INIT * (1 - 0.1 * 0.01) - 0.1 * grad / (grad.abs() + 1e-8)  # AdamW's first step
    assert method.tune(views)[0].flatten().tolist() == pytest.approx(want.flatten().tolist(), abs=1e-6)

    outcome = method(views)
    rows = F.normalize(want, dim=-1).tolist()
    w = hand_weights(views.tolist(), 3, 0.05)
    final = [sum(w[v] * SCALE * dot(views[v].tolist(), rows[c]) for v in range(6)) for c in range(3)]
    assert outcome.pred == max(range(3), key=final.__getitem__)
    assert outcome.entropy_after == pytest.approx(entropy_of(softmax(final)), rel=1e-5)
    assert outcome.entropy_before == pytest.approx(entropy_of(softmax([SCALE * dot(views[0], r) for r in rows0])),
                                                   rel=1e-5)
    assert (outcome.selected, outcome.buffer_size) == ([0], 1)


def by_sample(records: pd.DataFrame) -> pd.DataFrame:
    return records.drop(columns=["position", "seconds"]).set_index("sample_id").sort_index()


@pytest.mark.parametrize("tuning", [TuningConfig(lr=0.05), TuningConfig(lr=0.05, amp_on_cpu=True)],
                         ids=["fp32", "bf16-scaler"])
def test_records_do_not_depend_on_the_order(text, tuning):
    samples = dict(zip("abcde", random_view_features(5, n_views=24, dim=128, seed=2)))
    labels = {key: i % 3 for i, key in enumerate(samples)}
    method = RTPT(text, tuning, Config())
    forward = run_stream(method, list("abcde"), labels, samples.__getitem__)
    backward = run_stream(method, list("edcba"), labels, samples.__getitem__)
    assert not (forward["sample_id"] == backward["sample_id"]).all()
    pd.testing.assert_frame_equal(by_sample(forward), by_sample(backward))
    assert RTPT.order_independent and not RTPT.uses_templates


def test_state_dict_round_trips(text):
    tuning = TuningConfig(lr=0.05, amp_on_cpu=True)  # the GradScaler is on
    method = RTPT(text, tuning, Config())
    state = method.state_dict()
    assert state["scale"] == 1000.0
    other = RTPT(text, tuning, Config())
    other.load_state_dict({**state, "scale": 4.0})
    assert other.state_dict()["scale"] == 4.0
    other.load_state_dict(state)
    assert other.state_dict() == state
    features = random_view_features(1, n_views=24, dim=128, seed=4)[0]
    assert other(features) == method(features)
    plain = RTPT(text, TuningConfig(lr=0.05, amp=False), Config())  # the authors' fp32 step: nothing to carry
    assert plain.state_dict() == {}
    plain.load_state_dict({})
