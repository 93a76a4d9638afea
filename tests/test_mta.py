"""MTA by hand: bandwidths, kernel, inlierness, the mode, the whole solve against a plain-Python MeanShift.

The text side is a stub: 3 classes whose text features are the first three basis vectors of R^4, and a chosen
logit scale. The reference solve below is MTA's procedure written with lists, `math` and `break`s, in the order
of the authors' `solve_mta`.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dynaprompt.methods.mta import MTA, Config, bandwidths, gaussian_density, inlierness, solve_mode
from dynaprompt.methods.zero_shot import ZeroShot
from dynaprompt.objectives import TuningConfig
from dynaprompt.runner import run_stream

from .conftest import random_view_features

TUNING = TuningConfig()
TEXT = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]


class StubText:
    """What MTA reads from a PromptTextEncoder: v0's text features and the logit scale."""

    def __init__(self, features, scale: float):
        self.features = F.normalize(torch.tensor(features, dtype=torch.float32), dim=-1)
        self.init_context = torch.zeros(4, 8)
        self.scale = scale

    def encode(self, contexts: torch.Tensor) -> torch.Tensor:
        return self.features.unsqueeze(0).expand(contexts.shape[0], -1, -1)

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


def unit(coords) -> list[float]:
    norm = math.sqrt(dot(coords, coords))
    return [c / norm for c in coords]


def at(degrees: float, a: int = 0, b: int = 1) -> list[float]:
    out = [0.0] * 4
    out[a], out[b] = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return out


def plain_mta(rows, scale, config: Config | None = None):
    """MTA's solve in plain Python: (logits of the mode, inner iterations run by each inlierness and mode loop)."""
    config = config or Config()
    n = len(rows)
    k = max(1, int(config.bandwidth_ratio * (n - 1)))
    h = [math.sqrt(0.5 * sum(d * d for d in sorted(math.dist(r, s) for s in rows)[1 : k + 1]) / k) for r in rows]
    probs = [softmax([scale * dot(r, t) / config.temperature for t in TEXT]) for r in rows]
    affinity = [[dot(p, q) for q in probs] for p in probs]

    def density(mode):
        return [math.exp(-math.dist(r, mode) ** 2 / (2 * h[j] ** 2)) for j, r in enumerate(rows)]

    y, mode, counts = [1 / n] * n, list(rows[0]), []
    for _ in range(config.max_iter):
        d = density(mode)
        runs = 0
        for _ in range(config.max_iter):
            runs += 1
            old = y
            y = softmax([1 / config.lambda_y * (d[a] + config.lambda_q * dot(affinity[a], old)) for a in range(n)])
            if math.dist(old, y) < config.tol:
                break
        counts.append(runs)
        runs = 0
        for _ in range(config.max_iter):
            runs += 1
            old = mode
            w = [dj * yj for dj, yj in zip(density(mode), y)]
            mode = unit([sum(w[j] * rows[j][e] for j in range(n)) / sum(w) for e in range(4)])
            if math.dist(old, mode) < config.tol:
                break
        counts.append(runs)
    return [scale * dot(mode, t) for t in TEXT], counts


def test_bandwidths_by_hand():
    rows = [at(0), at(10), at(30), at(70)]  # on a circle: squared distance 2 - 2 cos(angle between)
    got = bandwidths(torch.tensor(rows), ratio=0.7).tolist()  # k = int(0.7 * 3) = 2 nearest others

    def h(*angles):
        return math.sqrt(0.5 * sum(2 - 2 * math.cos(math.radians(a)) for a in angles) / len(angles))

    assert got == pytest.approx([h(10, 30), h(10, 20), h(20, 30), h(40, 60)], rel=1e-5)
    assert int(0.3 * 63) == 18  # the authors' k on 64 views
    assert bandwidths(torch.tensor(rows), ratio=0.3).tolist() == pytest.approx([h(10), h(10), h(20), h(40)],
                                                                               rel=1e-5)


def test_gaussian_density_by_hand():
    rows = torch.tensor([at(0), at(60)])
    got = gaussian_density(torch.tensor(at(0)), rows, torch.tensor([0.5, 2.0])).tolist()
    assert got == pytest.approx([1.0, math.exp(-(2 - 2 * math.cos(math.radians(60))) / (2 * 4.0))], rel=1e-6)


def test_inlierness_favours_the_dense_and_agreeing_views():
    # views 0-2 near the mode and agreeing (affinity 0.9); view 3 far and disagreeing
    density = torch.tensor([1.0, 0.9, 0.8, 0.05])
    affinity = torch.tensor([[0.9, 0.9, 0.9, 0.1], [0.9, 0.9, 0.9, 0.1], [0.9, 0.9, 0.9, 0.1], [0.1, 0.1, 0.1, 0.9]])
    config = Config(max_iter=1)
    y = inlierness(torch.full((4,), 0.25), density, affinity, config).tolist()
    ay = [0.25 * sum(row) for row in affinity.tolist()]
    assert y == pytest.approx(softmax([(d + 4 * a) / 0.2 for d, a in zip(density.tolist(), ay)]), rel=1e-5)
    assert y[3] < 1e-3 < y[2] < y[1] < y[0]


def test_symmetric_views_keep_the_mode_at_the_original_view():
    # pairs mirrored in e3, a direction no class uses: the same logits, the same weights, a mode along e0
    rows = [at(0, 0, 3)] + [at(s * d, 0, 3) for d in (10, 20, 35) for s in (1, -1)]
    mode = solve_mode(torch.tensor(rows), 10.0 * torch.tensor(rows) @ torch.tensor(TEXT).t(), Config())
    assert mode.tolist() == pytest.approx(at(0, 0, 3), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_solve_matches_a_plain_meanshift(seed):
    generator = torch.Generator().manual_seed(seed)
    base = torch.tensor(at(20)) + 0.3 * torch.randn(12, 4, generator=generator)
    rows = F.normalize(base, dim=-1).tolist()
    want, counts = plain_mta(rows, 10.0)
    method = MTA(StubText(TEXT, 10.0), TUNING, Config())
    outcome = method(torch.tensor(rows))
    assert outcome.pred == max(range(3), key=want.__getitem__)
    assert outcome.entropy_after == pytest.approx(entropy_of(softmax(want)), rel=1e-4, abs=1e-6)
    before = entropy_of(softmax([10.0 * x for x in rows[0][:3]]))
    assert outcome.entropy_before == pytest.approx(before, rel=1e-4, abs=1e-6)
    assert (outcome.selected, outcome.buffer_size) == ([], 0)
    assert min(counts) < 5  # some inner loop stopped early: the frozen updates are the authors' breaks
    logits = 10.0 * torch.tensor(rows) @ torch.tensor(TEXT).t()
    assert solve_mode(torch.tensor(rows), logits, Config()).tolist() != rows[0]


def test_one_view_is_its_own_mode():
    method = MTA(StubText(TEXT, 10.0), TUNING, Config())
    o = method(torch.tensor([unit([1.0, 0.5, 0.0, 0.0])]))
    assert o.entropy_after == pytest.approx(o.entropy_before)


def test_entropy_before_is_zero_shot_and_records_do_not_depend_on_the_order(text):
    samples = dict(zip("abcde", random_view_features(5, n_views=32, dim=128, seed=5)))
    labels = {key: i % 3 for i, key in enumerate(samples)}
    method = MTA(text, TUNING, Config())
    zero_shot = ZeroShot(text, TUNING, ZeroShot.Config())
    for features in samples.values():
        assert method(features).entropy_before == pytest.approx(zero_shot(features).entropy_before, abs=1e-6)
    forward = run_stream(method, list("abcde"), labels, samples.__getitem__)
    backward = run_stream(method, list("edcba"), labels, samples.__getitem__)

    def by_sample(records):
        return records.drop(columns=["position", "seconds"]).set_index("sample_id").sort_index()

    pd.testing.assert_frame_equal(by_sample(forward), by_sample(backward))
    assert (forward["entropy_after"] != forward["entropy_before"]).any()
    assert MTA.order_independent and not MTA.uses_templates


def test_state_dict_is_empty_and_round_trips():
    method = MTA(StubText(TEXT, 10.0), TUNING, Config())
    assert method.state_dict() == {}
    method.load_state_dict(method.state_dict())
    with pytest.raises(ValueError):
        method.load_state_dict({"scale": 1.0})
