"""DOTA on hand-made feature streams, with the answers worked out by hand (numpy float64 on the written-out formulas
of skylineeeeen/DOTA dota.py, not the method's helpers).

The text side is tests.test_peers's stub: classes 0, 1, 2 = e0, e1, e2 in R^4 with logit scale 10.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from dynaprompt.methods import build_method
from dynaprompt.methods.dota import DOTA
from dynaprompt.objectives import TuningConfig

from .conftest import random_view_features, three_sample_stream
from .test_peers import basis_text, entropy_of, logits_of, random_text, run_order, softmax, towards, views

TUNING = TuningConfig()
SIGMA, EPS = 0.002, 1e-4


def model_scale(**options) -> DOTA.Config:
    """View 0 and the stub's own scale (10), so that logits_of() gives the zero-shot logits."""
    return DOTA.Config(**{"query": "original", "logit_scale": "model", **options})


class HandDOTA:
    """The authors' state, written out: means 0.001, counts 1, Sigma_c = sigma I, Lambda = I / sigma."""

    def __init__(self, n_classes=3, dim=4):
        self.mu = np.full((n_classes, dim), 0.001)
        self.n = np.ones(n_classes)
        self.sigma = np.stack([SIGMA * np.eye(dim)] * n_classes)
        self.precision = np.eye(dim) / SIGMA

    def read(self, q):
        """q . Lambda mu_c - 0.5 mu_c . Lambda mu_c per class."""
        return np.array([q @ self.precision @ m - 0.5 * m @ self.precision @ m for m in self.mu])

    def fit(self, xs, ps):
        """xs [k, E] and their soft labels [k, C]; Sigma from the old means and counts."""
        xs, ps = np.asarray(xs, float), np.asarray(ps, float)
        s = ps.sum(0)
        for c in range(len(self.n)):
            scatter = sum(p[c] * np.outer(x - self.mu[c], x - self.mu[c]) for x, p in zip(xs, ps))
            self.sigma[c] = (self.n[c] * self.sigma[c] + scatter) / (self.n[c] + s[c])
        self.mu = ((ps.T @ xs) + self.n[:, None] * self.mu) / (s[:, None] + self.n[:, None])
        self.n = self.n + s
        self.precision = np.linalg.inv((1 - EPS) * self.sigma.mean(0) + EPS * np.eye(xs.shape[1]))


def test_dota_reads_before_it_fits_and_the_weight_grows_with_the_counts():
    method = DOTA(basis_text(), TUNING, model_scale(rho=0.5, eta=10.0))
    hand = HandDOTA()
    a, b = towards(10), towards(60)
    # sample a: every mean is the same constant, so the discriminant is the same for every class and changes nothing
    o = method(views(a))
    assert (o.pred, o.appended, o.deleted, o.buffer_size, o.selected) == (0, [0], [], 1, [])
    assert np.ptp(hand.read(np.array(a))) == 0
    assert o.entropy_before == pytest.approx(entropy_of(softmax(logits_of(a))), rel=1e-5)
    assert o.entropy_after == pytest.approx(o.entropy_before, rel=1e-4)
    hand.fit([a], [softmax(logits_of(a))])
    assert method.counts.tolist() == pytest.approx(hand.n.tolist(), rel=1e-6)
    assert method.means.flatten().tolist() == pytest.approx(hand.mu.flatten().tolist(), abs=1e-7)
    assert method.covariances.flatten().tolist() == pytest.approx(hand.sigma.flatten().tolist(), rel=1e-6, abs=1e-8)
    # sample b is read with a's statistics; weight = rho * mean count / 1 = 0.5 * (1 + 1/3)
    weight = 0.5 * (1 + 1 / 3)
    assert hand.n.mean() == pytest.approx(1 + 1 / 3)
    final = np.array(logits_of(b)) + weight * hand.read(np.array(b))
    o = method(views(b))
    assert (o.pred, o.appended, o.buffer_size) == (int(final.argmax()), [1], 2)
    assert o.entropy_after == pytest.approx(entropy_of(softmax(final.tolist())), rel=1e-3)
    hand.fit([b], [softmax(logits_of(b))])
    assert method.means.flatten().tolist() == pytest.approx(hand.mu.flatten().tolist(), abs=1e-6)
    assert method.precision.flatten().tolist() == pytest.approx(hand.precision.flatten().tolist(), rel=1e-3, abs=1e-2)
    assert method.snapshot() == {"counts": pytest.approx(hand.n.tolist(), rel=1e-6), "absorbed": 2}


def test_dota_weight_is_capped_at_eta():
    method = DOTA(basis_text(), TUNING, model_scale(rho=0.5, eta=0.6))
    for degrees in (10, 50, 80):
        method(views(towards(degrees)))
    assert float(method.fusion_weight(1)) == pytest.approx(0.6)  # 0.5 * (1 + 3/3) = 1.0, capped
    assert float(method.fusion_weight(4)) == pytest.approx(0.5 * 2 / 4)


def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def test_dota_memory_overturns_a_zero_shot_prediction():
    """Class 0 seen along +e3 and class 1 along -e3: a query that zero-shot calls 0 but that lies on class 1's side."""
    config = model_scale(rho=1.0, eta=50.0)
    method = DOTA(basis_text(), TUNING, config)
    for _ in range(6):
        method(views(unit([1, 0, 0, 0.8])))
        method(views(unit([0, 1, 0, -0.8])))
    query = unit([0.5, 0.45, 0, -0.8])
    assert max(range(3), key=lambda c: logits_of(query)[c]) == 0
    assert method(views(query)).pred == 1
    assert DOTA(basis_text(), TUNING, config)(views(query)).pred == 0  # without the memory: zero-shot's answer


def test_dota_confident_query_fits_every_kept_view_and_divides_the_weight_by_their_number():
    angles = [40, 30, 10, 44, 5, 35] + [38] * 14  # 20 views: the 2 sharpest are 5 and 10 degrees
    sample = [towards(d) for d in angles]
    method = DOTA(basis_text(), TUNING, model_scale(query="confident", rho=0.5, eta=10.0))
    hand = HandDOTA()
    kept = [towards(5), towards(10)]
    probs = [softmax(logits_of(x)) for x in kept]
    method(views(*sample))
    hand.fit(kept, probs)  # each view with its own softmax, not their mean
    assert sum(method.counts.tolist()) == pytest.approx(3 + 2)
    assert method.means.flatten().tolist() == pytest.approx(hand.mu.flatten().tolist(), abs=1e-7)
    # the next sample reads the unnormalised mean of its kept views; weight = 0.5 * (1 + 2/3) / 2
    second = [towards(d) for d in [50, 60, 80, 55, 85, 62] + [58] * 14]  # the sharpest: 85 and 80 degrees
    kept2 = [towards(85), towards(80)]
    query = (np.array(kept2[0]) + np.array(kept2[1])) / 2
    mean_logits = [(x + y) / 2 for x, y in zip(logits_of(kept2[0]), logits_of(kept2[1]))]
    final = np.array(mean_logits) + 0.5 * (1 + 2 / 3) / 2 * hand.read(query)
    o = method(views(*second))
    assert o.entropy_before == pytest.approx(entropy_of(softmax(mean_logits)), rel=1e-4)
    assert o.entropy_after == pytest.approx(entropy_of(softmax(final.tolist())), rel=1e-3)


def test_dota_authors_scale_is_the_literal_100():
    a = towards(30)
    for option, scale in (("authors", 100.0), ("model", 10.0)):
        o = DOTA(basis_text(), TUNING, DOTA.Config(query="original", logit_scale=option))(views(a))
        assert o.entropy_before == pytest.approx(entropy_of(softmax(logits_of(a, scale))), rel=1e-4, abs=1e-12)


def test_dota_initial_means_constant_or_text_and_config_checks():
    assert DOTA(basis_text(), TUNING, DOTA.Config()).means.unique().tolist() == pytest.approx([0.001])
    text_init = DOTA(basis_text(), TUNING, DOTA.Config(init_mean="text"))
    assert text_init.means.tolist() == torch.eye(4)[:3].tolist()
    assert DOTA(basis_text(), TUNING, DOTA.Config()).precision.diagonal().tolist() == pytest.approx([1 / SIGMA] * 4)
    for bad in ({"query": "mean"}, {"init_mean": "zeros"}, {"logit_scale": "clip"}, {"sigma": 0.0}, {"epsilon": 1.0}):
        with pytest.raises(ValueError):
            DOTA.Config(**bad)


# ---------------------------------------------------------------------------------- orderings, state, records


def test_dota_orderings_change_the_memory_and_repeats_do_not():
    samples = random_view_features(6, n_views=10, dim=8, seed=3)
    method = build_method("dota", random_text(), TUNING)
    forward, snaps_forward = run_order(method, samples, [0, 1, 2, 3, 4, 5])
    backward, snaps_backward = run_order(method, samples, [5, 4, 3, 2, 1, 0])
    assert snaps_forward[2] != snaps_backward[2]  # counts after {0,1,2} vs {5,4,3}
    assert any(forward[i].entropy_after != backward[i].entropy_after for i in range(6))
    again, snaps_again = run_order(method, samples, [0, 1, 2, 3, 4, 5])
    assert again == forward and snaps_again == snaps_forward
    fresh, snaps_fresh = run_order(build_method("dota", random_text(), TUNING), samples, [0, 1, 2, 3, 4, 5])
    assert fresh == forward and snaps_fresh == snaps_forward


def test_dota_state_dict_resumes_a_stream_bit_for_bit():
    samples = random_view_features(8, n_views=20, dim=8, seed=5)
    config = DOTA.Config(rho=1.0, eta=5.0)
    whole = DOTA(random_text(), TUNING, config)
    [whole(s) for s in samples[:4]]
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    resumed = DOTA(random_text(), TUNING, config)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rest = [whole(s) for s in samples[4:]]
    assert [resumed(s) for s in samples[4:]] == rest
    assert torch.equal(resumed.covariances, whole.covariances) and torch.equal(resumed.precision, whole.precision)


def test_dota_runs_on_the_tiny_clip(text):
    method = DOTA(text, TUNING, DOTA.Config(), ["a photo of a {}.", "a {}."])
    records = three_sample_stream(method)
    assert records["buffer_size"].tolist() == [1, 2, 3] and records["deleted"].map(len).sum() == 0
    assert records["pred"].between(0, 2).all() and DOTA.uses_templates and not DOTA.order_independent
