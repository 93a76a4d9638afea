"""OGA on hand-made feature streams, the answers worked out by hand (plain `math`, numpy for the 4x4 inverses).

The text side is tests.test_peers's stub: classes 0, 1, 2 = e0, e1, e2 in R^4. Most tests take the stub's scale
10 (`logit_scale: model`) so that the zero-shot softmax is not one-hot.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from dynaprompt.methods import METHODS
from dynaprompt.methods.oga import OGA
from dynaprompt.objectives import TuningConfig

from .conftest import follow_memory, random_view_features, three_sample_stream
from .test_peers import BLURRY, StubText, basis_text, entropy_of, logits_of, run_order, softmax, towards, views

TUNING = TuningConfig()
TAU, DIM = 0.05, 4


def oga(**options) -> OGA:
    return OGA(basis_text(), TUNING, OGA.Config(logit_scale="model", **options))


def h9(degrees: float, a: int = 0, b: int = 1) -> float:
    """The authors' zero-shot entropy, -sum p log(p + 1e-9), at logit scale 10."""
    return entropy_of(softmax(logits_of(towards(degrees, a, b))), 1e-9)


def ids_of(method, label: int) -> list[int]:
    return [i for i, _ in method.snapshot()[label]]


def map_prediction(x, means, inverse) -> tuple[int, float]:
    """argmax and entropy of z = p * softmax(tau * (x S mu - mu S mu / 2 - x S x / 2)), renormalised."""
    x, means = np.asarray(x, dtype=float), np.asarray(means, dtype=float)
    log_likelihood = [x @ inverse @ mu - mu @ inverse @ mu / 2 - x @ inverse @ x / 2 for mu in means]
    z = [p * g for p, g in zip(softmax(logits_of(list(x))), softmax([TAU * v for v in log_likelihood]))]
    z = [v / sum(z) for v in z]
    return max(range(3), key=lambda k: z[k]), entropy_of(z)


def ridge(centred: np.ndarray) -> np.ndarray:
    """d * inv((n - 1) M + tr(M) I), M the unbiased covariance of the centred vectors (rows)."""
    n = centred.shape[0]
    scatter = np.cov(centred, rowvar=False)
    return DIM * np.linalg.inv((n - 1) * scatter + np.trace(scatter) * np.eye(DIM))


# ------------------------------------------------------------------------------------------------- the memory


def test_memory_keeps_the_lowest_entropies_and_replaces_the_highest():
    method = oga(shot_capacity=2)
    out = [method(views(towards(d))) for d in (30, 10)]
    assert [(o.appended, o.deleted, o.buffer_size) for o in out] == [([0], [], 1), ([1], [], 2)]
    assert method.snapshot() == {0: [(0, pytest.approx(h9(30), rel=1e-3)), (1, pytest.approx(h9(10), rel=1e-3))]}
    # full class 0: 20 degrees (H below the stored 30 degrees') takes the highest-entropy slot, slot 0 (id 0)
    assert h9(10) < h9(20) < h9(30)
    o = method(views(towards(20)))
    assert (o.appended, o.deleted, o.buffer_size) == ([2], [0], 2) and ids_of(method, 0) == [2, 1]
    # 25 degrees is above both stored entropies: rejected, no id
    o = method(views(towards(25)))
    assert (o.appended, o.deleted, o.buffer_size) == ([], [], 2) and ids_of(method, 0) == [2, 1]
    o = method(views(towards(80)))  # class 1 has its own slots
    assert (o.appended, o.deleted, o.buffer_size) == ([3], [], 3) and ids_of(method, 1) == [3]
    method.reset()
    assert method.snapshot() == {} and method.next_id == 0


def test_an_even_sample_is_never_stored_its_entropy_is_the_start_value():
    method = oga()
    o = method(views(BLURRY))  # H = ln 3 = the slots' starting entropy log K: not strictly lower
    assert (o.appended, o.buffer_size) == ([], 0)
    assert method.entropies.tolist() == [[np.float16(math.log(3))] * 8] * 3


def test_entropies_are_compared_and_stored_in_float16():
    first, second = 20.0, 20.0 - 1e-4  # lower entropy in float64, the same float16
    assert h9(second) < h9(first) and np.float16(h9(second)) == np.float16(h9(first))
    method = oga(shot_capacity=1)
    method(views(towards(first)))
    assert method(views(towards(second))).appended == []
    exact = oga(shot_capacity=1, memory_dtype="float32")
    exact(views(towards(first)))
    assert (lambda o: (o.appended, o.deleted))(exact(views(towards(second)))) == ([1], [0])


# ---------------------------------------------------------------------------- means, covariance and the MAP


def test_means_covariance_and_map_by_hand():
    method = oga(memory_dtype="float32")
    text = np.eye(4)[:3]
    a, b, c, d = towards(10), towards(20), towards(15, 0, 2), towards(75)
    # one sample: the text features and Sigma^-1 = d I stay
    o = method(views(a))
    assert np.allclose(method.means.numpy(), text) and np.allclose(method.inverse_covariance.numpy(), 4 * np.eye(4))
    pred, spread = map_prediction(a, text, 4 * np.eye(4))
    assert o.pred == pred and o.entropy_after == pytest.approx(spread, rel=1e-4)
    assert o.entropy_before == pytest.approx(entropy_of(softmax(logits_of(a))), rel=1e-5)
    # two samples: class 0's mean is their sum over 8 slots (the empty ones count as zeros); no covariance yet
    o = method(views(b))
    means = np.vstack([(np.add(a, b)) / 8, text[1:]])
    assert np.allclose(method.means.numpy(), means, atol=1e-7)
    assert np.allclose(method.inverse_covariance.numpy(), 4 * np.eye(4))
    pred, spread = map_prediction(b, means, 4 * np.eye(4))
    assert o.pred == pred and o.entropy_after == pytest.approx(spread, rel=1e-4)
    # three samples: the shared covariance, by the ridge (n = 3 <= 4 d)
    o = method(views(c))
    means[0] = np.add(np.add(a, b), c) / 8
    inverse = ridge(np.array([a, b, c]) - means[0])
    assert np.allclose(method.means.numpy(), means, atol=1e-7)
    assert np.allclose(method.inverse_covariance.numpy(), inverse, rtol=1e-4)
    pred, spread = map_prediction(c, means, inverse)
    assert o.pred == pred and o.entropy_after == pytest.approx(spread, rel=1e-3)
    # a single sample of class 1 keeps its text mean, and is centred on it in the covariance
    o = method(views(d))
    assert o.appended == [3] and np.allclose(method.means.numpy(), means, atol=1e-7)
    inverse = ridge(np.vstack([np.array([a, b, c]) - means[0], np.subtract(d, text[1])]))
    assert np.allclose(method.inverse_covariance.numpy(), inverse, rtol=1e-4)
    pred, spread = map_prediction(d, means, inverse)
    assert o.pred == pred and o.entropy_after == pytest.approx(spread, rel=1e-3)


def class_stream(per_class: int, seed: int = 0) -> tuple[list[list[float]], list[int]]:
    """Unit features near e0, e1, e2 in turn (class k's features argmax at k)."""
    rng = np.random.default_rng(seed)
    features, labels = [], []
    for i in range(3 * per_class):
        label = i % 3
        x = 3 * np.eye(4)[label] + 0.6 * rng.standard_normal(4)
        features.append(list(x / np.linalg.norm(x)))
        labels.append(label)
    assert all(int(np.argmax(f[:3])) == k for f, k in zip(features, labels))
    return features, labels


def centred_memory(features, labels) -> np.ndarray:
    """Each sample minus its class's mean over 8 slots (every class here holds >= 2)."""
    means = {k: np.sum([f for f, y in zip(features, labels) if y == k], axis=0) / 8 for k in set(labels)}
    return np.array([np.subtract(f, means[y]) for f, y in zip(features, labels)])


@pytest.mark.parametrize("sig_type", ["RidgeMoorePenrose", "Ridge", "MoorePenrose"])
def test_the_estimator_switches_to_pinv_past_4d_samples(sig_type):
    features, labels = class_stream(6)
    method = oga(memory_dtype="float32", sig_type=sig_type)
    for x in features[:16]:
        method(views(x))
    centred = centred_memory(features[:16], labels[:16])
    expected = np.linalg.pinv(np.cov(centred, rowvar=False)) if sig_type == "MoorePenrose" else ridge(centred)
    assert np.allclose(method.inverse_covariance.numpy(), expected, rtol=1e-3, atol=1e-3)
    method(views(features[16]))  # n = 17 > 4 d
    centred = centred_memory(features[:17], labels[:17])
    expected = ridge(centred) if sig_type == "Ridge" else np.linalg.pinv(np.cov(centred, rowvar=False))
    assert np.allclose(method.inverse_covariance.numpy(), expected, rtol=1e-3, atol=1e-3)


def test_normalize_mu_renormalises_the_means():
    method = oga(memory_dtype="float32", normalize_mu=True)
    a, b = towards(10), towards(30)
    method(views(a))
    method(views(b))
    assert method.means[0].tolist() == pytest.approx(towards(20), abs=1e-6)


def test_the_zero_shot_scale_is_the_authors_100_unless_model_is_asked():
    feature = towards(44)  # logits 69.5 and 71.9 at scale 100
    at_100 = entropy_of(softmax(logits_of(feature, 100.0)))
    authors = OGA(basis_text(10.0), TUNING, OGA.Config())
    assert authors(views(feature)).entropy_before == pytest.approx(at_100, rel=1e-4)
    at_10 = entropy_of(softmax(logits_of(feature, 10.0)))
    assert oga()(views(feature)).entropy_before == pytest.approx(at_10, rel=1e-5)
    with pytest.raises(ValueError, match="logit_scale"):
        OGA.Config(logit_scale="learned")


def test_only_view_zero_is_read():
    method = oga()
    o = method(views(towards(40), towards(85), towards(85)))
    assert o.entropy_before == pytest.approx(entropy_of(softmax(logits_of(towards(40)))), rel=1e-5)
    assert list(method.snapshot()) == [0]


def test_a_one_hot_sample_stores_entropy_minus_zero_and_fills_its_class_for_good():
    """p = 1: -1 * log(1 + 1e-9) = -1e-9, which float16 stores as -0.0; no later entropy is below it."""
    method = OGA(basis_text(100.0), TUNING, OGA.Config(shot_capacity=1, logit_scale="model"))
    method(views(towards(10)))
    assert method.snapshot() == {0: [(0, 0.0)]} and math.copysign(1, method.entropies[0, 0]) == -1
    assert method(views(towards(0))).appended == []  # exactly e0: as one-hot, not lower


# ---------------------------------------------------------------------------------- orderings, state, records


def soft_text(seed: int = 1) -> StubText:
    """3 random classes in R^8 at logit scale 5: softmaxes far from one-hot, so entries compete."""
    return StubText(torch.randn(3, 8, generator=torch.Generator().manual_seed(seed)), 5.0)


def soft_oga(**options) -> OGA:
    return OGA(soft_text(), TUNING, OGA.Config(logit_scale="model", **options))


def test_orderings_change_the_memory_and_repeats_do_not():
    samples = random_view_features(8, n_views=2, dim=8, seed=3)
    method = soft_oga(shot_capacity=2)
    forward, snaps_forward = run_order(method, samples, list(range(8)))
    backward, snaps_backward = run_order(method, samples, list(range(7, -1, -1)))
    assert snaps_forward[2] != snaps_backward[2] and snaps_forward[-1] != snaps_backward[-1]
    assert any(forward[i].entropy_after != backward[i].entropy_after for i in range(8))
    again, snaps_again = run_order(method, samples, list(range(8)))
    assert again == forward and snaps_again == snaps_forward
    fresh, snaps_fresh = run_order(soft_oga(shot_capacity=2), samples, list(range(8)))
    assert fresh == forward and snaps_fresh == snaps_forward


def test_state_dict_resumes_a_stream_bit_for_bit():
    samples = random_view_features(14, n_views=2, dim=8, seed=5)
    whole = soft_oga(shot_capacity=3)
    [whole(s) for s in samples[:7]]
    assert not torch.equal(whole.inverse_covariance, 8 * torch.eye(8))  # the covariance was refitted
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    resumed = soft_oga(shot_capacity=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rest = [whole(s) for s in samples[7:]]
    assert [resumed(s) for s in samples[7:]] == rest
    assert any(o.deleted or not o.appended for o in rest)  # classes were full: the state mattered


def test_records_follow_the_memory():
    outcomes = follow_memory(soft_oga(shot_capacity=2), random_view_features(15, n_views=2, dim=8, seed=7))
    assert sum(len(o.deleted) for o in outcomes) > 0


def test_oga_runs_on_the_tiny_clip(text):
    method = OGA(text, TUNING, OGA.Config(), ["a photo of a {}.", "a {}."])
    records = three_sample_stream(method)
    assert len(records) == 3 and records["pred"].between(0, 2).all() and records["buffer_size"].iloc[-1] >= 1
    assert METHODS["oga"] is OGA and OGA.uses_templates and not OGA.order_independent
