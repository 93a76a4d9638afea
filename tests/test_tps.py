"""TPS on hand-made samples: one AdamW step on per-class prototype shifts, worked out with plain `math`.

The text side is test_peers' stub (classes = e0, e1, e2 of R^4, logit scale 10). A first AdamW step from zero moves
each coordinate by -lr * g / (|g| + eps), about -lr * sign(g), and weight decay does nothing to a zero parameter; the
gradient g of the marginal entropy of the confident views is taken here by central differences of a plain-Python
loss, in double precision.
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from dynaprompt.methods import METHODS, build_method
from dynaprompt.methods.tps import TPS, Config
from dynaprompt.objectives import TuningConfig
from dynaprompt.runner import run_stream

from .conftest import random_view_features, three_sample_stream
from .test_peers import BLURRY, basis_text, dot, entropy_of, random_text, softmax, towards, views

SCALE = 10.0
TUNING = TuningConfig(lr=0.1, confident_ratio=0.3)  # 3 of 10 views
TEXT = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]
# view 0 says class 0 mildly; three sharp class-1 views are the confident ones; the rest are blurry
SAMPLE = [towards(40), towards(80), BLURRY, towards(85), BLURRY, towards(70), BLURRY, BLURRY, BLURRY, BLURRY]


def normalise(u) -> list[float]:
    norm = math.sqrt(dot(u, u))
    return [x / norm for x in u]


def shifted(shift) -> list[list[float]]:
    """normalise(e_c + shift_c) per class; `shift` is a list of 3 rows (per class) or one row (shared)."""
    rows = shift if isinstance(shift[0], list) else [shift] * 3
    return [normalise([t + s for t, s in zip(TEXT[c], rows[c])]) for c in range(3)]


def logits(view, prototypes) -> list[float]:
    return [SCALE * dot(view, p) for p in prototypes]


def confident(rows, k: int) -> list[list[float]]:
    """The k views of lowest entropy against the unshifted prototypes."""
    return sorted(rows, key=lambda v: entropy_of(softmax(logits(v, TEXT))))[:k]


def marginal_entropy(rows, shift) -> float:
    probs = [softmax(logits(v, shifted(shift))) for v in rows]
    return entropy_of([sum(p[c] for p in probs) / len(probs) for c in range(3)])


def first_adamw_step(rows, shared: bool = False, lr: float = 0.1) -> list:
    """-lr * g / (|g| + 1e-8) per coordinate, g by central differences of the marginal entropy."""
    chosen, h = confident(rows, 3), 1e-6
    zero = [0.0] * 4 if shared else [[0.0] * 4 for _ in range(3)]

    def bumped(c, j, delta):
        out = list(zero) if shared else [list(row) for row in zero]
        (out if shared else out[c])[j] += delta
        return out

    def step(c, j):
        g = (marginal_entropy(chosen, bumped(c, j, h)) - marginal_entropy(chosen, bumped(c, j, -h))) / (2 * h)
        return 0.0 if abs(g) < 1e-9 else -lr * math.copysign(1.0, g)

    if shared:
        return [step(None, j) for j in range(4)]
    return [[step(c, j) for j in range(4)] for c in range(3)]


def test_one_step_on_per_class_shifts_by_hand():
    method = TPS(basis_text(SCALE), TUNING, Config())
    expected = first_adamw_step(SAMPLE)
    # a prototype does not move along itself, nor along a direction no view has (coordinate 3)
    assert [row[c] for c, row in enumerate(expected)] == [0.0] * 3 and all(row[3] == 0.0 for row in expected)
    assert method.tune_shift(views(*SAMPLE)).tolist() == [pytest.approx(row, abs=1e-5) for row in expected]
    o = method(views(*SAMPLE))
    before, after = logits(SAMPLE[0], TEXT), logits(SAMPLE[0], shifted(expected))
    assert max(range(3), key=lambda c: before[c]) == 0  # zero-shot says class 0 ...
    assert o.pred == max(range(3), key=lambda c: after[c]) == 1  # ... the shifted prototypes say class 1
    assert o.entropy_before == pytest.approx(entropy_of(softmax(before)), rel=1e-5)
    assert o.entropy_after == pytest.approx(entropy_of(softmax(after)), rel=1e-4)
    assert (o.selected, o.appended, o.deleted, o.buffer_size) == ([], [], [], 0)


def test_one_shared_shift_by_hand():
    method = TPS(basis_text(SCALE), TUNING, Config(per_class=False))
    shift = method.tune_shift(views(*SAMPLE))
    assert shift.shape == (4,)
    assert shift.tolist() == pytest.approx(first_adamw_step(SAMPLE, shared=True), abs=1e-5)


def test_only_the_confident_views_reach_the_loss():
    method = TPS(basis_text(SCALE), TUNING, Config())
    base = method.tune_shift(views(*SAMPLE))
    other = list(SAMPLE)
    other[2] = towards(50)  # less sharp than the three class-1 views: still not among the confident ones
    assert torch.equal(method.tune_shift(views(*other)), base)
    other[2] = towards(88)  # sharper than towards(70): it takes that view's place
    assert not torch.equal(method.tune_shift(views(*other)), base)


def test_the_lr_and_steps_are_the_runs_tuning():
    small = TPS(basis_text(SCALE), TuningConfig(lr=0.01, confident_ratio=0.3), Config())
    assert small.tune_shift(views(*SAMPLE)).tolist() == [pytest.approx(row, abs=1e-6)
                                                         for row in first_adamw_step(SAMPLE, lr=0.01)]
    two = TPS(basis_text(SCALE), TuningConfig(lr=0.01, confident_ratio=0.3, steps=2), Config())
    assert not torch.equal(two.tune_shift(views(*SAMPLE)), small.tune_shift(views(*SAMPLE)))


def stream_records(method, samples, order):
    ids = [f"s{i}" for i in order]
    source = {f"s{i}": samples[i] for i in order}
    return run_stream(method, ids, {i: 0 for i in ids}, source.__getitem__).drop(columns=["seconds", "position"])


def test_episodic_the_order_changes_nothing():
    samples = random_view_features(5, n_views=10, dim=8, seed=3)
    method = TPS(random_text(), TUNING, Config())
    forward = stream_records(method, samples, [0, 1, 2, 3, 4]).set_index("sample_id")
    backward = stream_records(method, samples, [4, 3, 2, 1, 0]).set_index("sample_id").loc[forward.index]
    assert forward.equals(backward)
    assert METHODS["tps"].order_independent


@pytest.mark.parametrize("amp_on_cpu", [False, True])
def test_state_dict_resumes_a_stream_bit_for_bit(amp_on_cpu):
    tuning = TuningConfig(lr=0.05, amp_on_cpu=amp_on_cpu)
    samples = random_view_features(6, n_views=10, dim=8, seed=5)
    whole = TPS(random_text(), tuning, Config())
    [whole(s) for s in samples[:3]]
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    resumed = TPS(random_text(), tuning, Config())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [resumed(s) for s in samples[3:]] == [whole(s) for s in samples[3:]]
    assert bool(whole.state_dict()["scaler"]) == amp_on_cpu  # the mixed-precision path carries its scaler


def test_runs_a_stream_on_the_tiny_clip(text):
    method = build_method("tps", text, TuningConfig(lr=5e-3), templates=["a photo of a {}.", "a {}."])
    assert METHODS["tps"].uses_templates
    records = three_sample_stream(method)
    assert len(records) == 3 and records["pred"].between(0, 2).all()
    assert (records["entropy_after"] != records["entropy_before"]).all()  # the shifts moved every prediction
    assert (records["buffer_size"] == 0).all()
