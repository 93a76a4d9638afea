"""C-TPT by hand: the dispersion, the loss, AdamW's first step on it, the views kept across steps, the records.

The text side is mostly a stub whose "text features" are the normalised rows of the context itself (3 classes in
R^4), so that a step moves them in a way the test can follow. Expected values come from plain `math` or from the
loss written out again here with plain torch ops and differentiated with autograd.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dynaprompt.methods.ctpt import CTPT, Config, ctpt_loss, text_feature_dispersion
from dynaprompt.methods.tpt import TPT
from dynaprompt.objectives import TuningConfig
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


def sharpest(views: torch.Tensor, context: torch.Tensor, k: int) -> list[int]:
    """The k views of lowest entropy against the context's normalised rows, by plain math."""
    rows = F.normalize(context, dim=-1).tolist()
    h = [entropy_of(softmax([SCALE * sum(a * b for a, b in zip(v, r)) for r in rows])) for v in views.tolist()]
    return sorted(range(len(h)), key=h.__getitem__)[:k]


def hand_loss(context: torch.Tensor, views: torch.Tensor, keep: list[int], lam: float) -> torch.Tensor:
    """H(mean softmax of the kept views) - lam * mean ||t_c - centroid||, written out with plain torch ops."""
    t = context / context.norm(dim=-1, keepdim=True)
    p = (SCALE * views[keep] @ t.T).softmax(-1).mean(0)
    centroid = t.mean(0)
    return -(p * p.log()).sum() - lam * ((t - centroid) ** 2).sum(-1).sqrt().mean()


def views_of(seed: int, n: int = 6) -> torch.Tensor:
    return F.normalize(torch.randn(n, 4, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_dispersion_by_hand():
    # e0, e1, e2: centroid (1/3, 1/3, 1/3, 0); each is sqrt((2/3)^2 + 2 (1/3)^2) = sqrt(2/3) away
    assert float(text_feature_dispersion(torch.eye(4)[:3])) == pytest.approx(math.sqrt(2 / 3), rel=1e-6)
    # two antipodal features: centroid 0, each at distance 1; one class alone: no dispersion
    assert float(text_feature_dispersion(torch.tensor([[0.6, 0.8], [-0.6, -0.8]]))) == pytest.approx(1.0)
    assert float(text_feature_dispersion(torch.tensor([[0.6, 0.8]]))) == 0.0


def test_loss_is_the_marginal_entropy_minus_lambda_dispersion_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0]], [[0.5, 1.5, 0.0]]])  # 2 confident views, 1 prompt, 3 classes
    features = torch.eye(4)[:3].unsqueeze(0)
    mean = [(a + b) / 2 for a, b in zip(softmax([2.0, 0.0, -1.0]), softmax([0.5, 1.5, 0.0]))]
    for lam in (0.0, 20.0, 50.0):
        want = entropy_of(mean) - lam * math.sqrt(2 / 3)
        assert float(ctpt_loss(logits, features, lam)) == pytest.approx(want, rel=1e-6)


def test_one_step_is_adamw_first_step_on_the_hand_written_loss():
    views = views_of(3)
    tuning = TuningConfig(lr=0.1, confident_ratio=0.34)  # floor(0.34 * 6) = 2 views
    method = CTPT(ContextText(), tuning, Config(lambda_term=0.5))
    keep = sharpest(views, INIT, 2)
    context = INIT.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(hand_loss(context, views, keep, 0.5), context)
    # AdamW's first step from fresh state: decay, then lr * g / (|g| + eps) (the bias corrections cancel)
    want = INIT * (1 - 0.1 * 0.01) - 0.1 * grad / (grad.abs() + 1e-8)
    tuned = method.tune(views)
    assert tuned.shape == (1, 3, 4)
    assert tuned[0].flatten().tolist() == pytest.approx(want.flatten().tolist(), abs=1e-6)

    outcome = method(views)
    before = [SCALE * float(x) for x in F.normalize(INIT, dim=-1) @ views[0]]
    after = [SCALE * float(x) for x in F.normalize(want, dim=-1) @ views[0]]
    assert outcome.pred == max(range(3), key=after.__getitem__)
    assert outcome.entropy_before == pytest.approx(entropy_of(softmax(before)), rel=1e-5)
    assert outcome.entropy_after == pytest.approx(entropy_of(softmax(after)), rel=1e-5)
    assert (outcome.selected, outcome.buffer_size, outcome.appended, outcome.deleted) == ([0], 1, [], [])


def test_two_steps_keep_the_views_chosen_at_the_first():
    views = views_of(3)  # seed 3: the two sharpest views after the first step are not the two before it
    tuning = TuningConfig(lr=0.3, confident_ratio=0.34, steps=2)
    lam = 1.0
    first = sharpest(views, INIT, 2)

    def two_steps(reselect: bool) -> torch.Tensor:
        context = INIT.clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([context], lr=0.3)
        for step in range(2):
            keep = sharpest(views, context.detach(), 2) if (reselect and step) else first
            optimizer.zero_grad()
            hand_loss(context, views, keep, lam).backward()
            optimizer.step()
            if step == 0:
                assert sharpest(views, context.detach(), 2) != first  # the ranking did move
        return context.detach()

    tuned = CTPT(ContextText(), tuning, Config(lambda_term=lam)).tune(views)[0]
    assert tuned.flatten().tolist() == pytest.approx(two_steps(reselect=False).flatten().tolist(), abs=1e-5)
    assert not torch.allclose(tuned, two_steps(reselect=True), atol=1e-3)


def test_lambda_zero_is_tpt(text):
    """Without the dispersion, C-TPT's one step is TPT's: the same records on the tiny CLIP (up to float rounding)."""
    tuning = TuningConfig(lr=0.05)
    ctpt, tpt = CTPT(text, tuning, Config(lambda_term=0.0)), TPT(text, tuning)
    for features in random_view_features(3, n_views=16, dim=128, seed=1):
        got, want = ctpt(features), tpt(features)
        assert (got.pred, got.selected, got.buffer_size) == (want.pred, want.selected, want.buffer_size)
        assert got.entropy_before == want.entropy_before
        assert got.entropy_after == pytest.approx(want.entropy_after, abs=1e-6)


def by_sample(records: pd.DataFrame) -> pd.DataFrame:
    return records.drop(columns=["position", "seconds"]).set_index("sample_id").sort_index()


@pytest.mark.parametrize("tuning", [TuningConfig(lr=0.05), TuningConfig(lr=0.05, amp_on_cpu=True)],
                         ids=["fp32", "bf16-scaler"])
def test_records_do_not_depend_on_the_order(text, tuning):
    samples = dict(zip("abcde", random_view_features(5, n_views=16, dim=128, seed=2)))
    labels = {key: i % 3 for i, key in enumerate(samples)}
    method = CTPT(text, tuning, Config())
    forward = run_stream(method, list("abcde"), labels, samples.__getitem__)
    backward = run_stream(method, list("edcba"), labels, samples.__getitem__)
    assert not (forward["sample_id"] == backward["sample_id"]).all()
    pd.testing.assert_frame_equal(by_sample(forward), by_sample(backward))
    assert (forward["entropy_after"] != forward["entropy_before"]).all()
    assert CTPT.order_independent and not CTPT.uses_templates


def test_state_dict_round_trips(text):
    tuning = TuningConfig(lr=0.05, amp_on_cpu=True)  # the GradScaler is on
    method = CTPT(text, tuning, Config())
    state = method.state_dict()
    assert state["scale"] == 1000.0
    other = CTPT(text, tuning, Config())
    other.load_state_dict({**state, "scale": 8.0})
    assert other.state_dict() == {**state, "scale": 8.0}
    other.load_state_dict(state)
    assert other.state_dict() == state
    features = random_view_features(1, n_views=16, dim=128, seed=4)[0]
    assert other(features) == method(features)
    plain = CTPT(text, TuningConfig(lr=0.05), Config())  # fp32 on CPU: no scaler, nothing to carry
    assert plain.state_dict() == {}
    plain.load_state_dict({})
    assert plain.state_dict() == {}
