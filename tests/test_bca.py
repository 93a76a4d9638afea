"""BCA on hand-made feature streams, the answers worked out by hand (plain `math`).

The text side is tests.test_peers's stub: classes 0, 1, 2 = e0, e1, e2 in R^4. The hand tests take the stub's
scale 10 (`logit_scale: model`) and init_count1 = 1, so that one sample visibly moves a class embedding.
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from dynaprompt.methods import METHODS
from dynaprompt.methods.bca import BCA
from dynaprompt.objectives import TuningConfig

from .conftest import random_view_features, three_sample_stream
from .test_peers import BLURRY, StubText, basis_text, dot, entropy_of, run_order, softmax, towards, views

TUNING = TuningConfig()
EYE = [[float(i == j) for j in range(3)] for i in range(3)]
TEXT = [[float(i == j) for j in range(4)] for i in range(3)]  # the stub's e0, e1, e2


def bca(scale: float = 10.0, **options) -> BCA:
    options = {"logit_scale": "model", "query": "original", "init_count1": 1.0, **options}
    return BCA(basis_text(scale), TUNING, BCA.Config(**options))


def normalise(v) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def posterior(x, centers, prior, scale: float = 10.0) -> tuple[list[float], list[float]]:
    """s = softmax(scale * x . mu_k) and f = s @ prior."""
    s = softmax([scale * dot(x, mu) for mu in centers])
    return s, [sum(s[m] * prior[m][j] for m in range(3)) for j in range(3)]


def rows(tensor) -> list[list[float]]:
    return [list(r) for r in tensor.tolist()]


def counts(method) -> dict:
    """The snapshot's contributions per class, without the prior rows."""
    snapshot = method.snapshot()
    return {"centers": snapshot["centers"], "priors": snapshot["priors"]}


def test_embeddings_and_prior_rows_move_as_running_means_by_hand():
    method = bca()
    centers, prior = [row[:] for row in TEXT], [row[:] for row in EYE]
    # 20 degrees: f = s (prior = I), max f = 0.9975 > 0.65: class 0's embedding and its prior row both move
    x = towards(20)
    s, f = posterior(x, centers, prior)
    assert f[0] > 0.65
    o = method(views(x))
    assert (o.pred, o.appended, o.deleted, o.buffer_size) == (0, [0, 1], [], 2)
    assert o.entropy_before == pytest.approx(entropy_of(s), rel=1e-4)
    assert o.entropy_after == pytest.approx(entropy_of(f), rel=1e-4)
    centers[0] = towards(10)  # normalise((1 * e0 + x) / 2): the bisector
    prior[0] = [(1 * e + v) / 2 for e, v in zip(EYE[0], f)]
    assert rows(method.centers)[0] == pytest.approx(centers[0], abs=1e-6)
    assert rows(method.prior) == [pytest.approx(r, abs=1e-6) for r in prior]
    assert counts(method) == {"centers": {0: 1}, "priors": {0: 1}}
    # 60 degrees, read against the moved embedding 0 (50 degrees away) and prior row 0
    x = towards(60)
    s, f = posterior(x, centers, prior)
    assert max(range(3), key=lambda k: f[k]) == 1 and f[1] > 0.65
    o = method(views(x))
    assert (o.pred, o.appended, o.buffer_size) == (1, [2, 3], 4)
    assert o.entropy_before == pytest.approx(entropy_of(s), rel=1e-4)
    assert o.entropy_after == pytest.approx(entropy_of(f), rel=1e-4)
    centers[1] = towards(75)
    prior[1] = [(1 * e + v) / 2 for e, v in zip(EYE[1], f)]
    assert rows(method.centers)[1] == pytest.approx(centers[1], abs=1e-6)
    assert rows(method.prior) == [pytest.approx(r, abs=1e-6) for r in prior]
    # an even sample: max f < 0.65, so only the embedding of argmax f moves, with its count now 2
    s, f = posterior(BLURRY, centers, prior)
    label = max(range(3), key=lambda k: f[k])
    assert 0.05 < f[label] < 0.65
    o = method(views(BLURRY))
    assert (o.pred, o.appended, o.buffer_size) == (label, [4], 5)
    count = 2 if label < 2 else 1
    moved = normalise([(count * c + b) / (count + 1) for c, b in zip(centers[label], BLURRY)])
    assert rows(method.centers)[label] == pytest.approx(moved, abs=1e-6)
    assert rows(method.prior) == [pytest.approx(r, abs=1e-6) for r in prior]
    method.reset()
    assert method.snapshot() == {"centers": {}, "priors": {}, "prior_rows": {}} and method.next_id == 0
    assert torch.equal(method.prior, torch.eye(3))


def test_below_threshold1_nothing_moves():
    method = bca(threshold1=0.5)
    o = method(views(BLURRY))  # max f = 1/3
    assert (o.pred, o.appended, o.buffer_size) == (0, [], 0)
    assert torch.equal(method.centers, method.text_features) and torch.equal(method.prior, torch.eye(3))


def test_the_authors_counts_barely_move_an_embedding():
    method = bca(init_count1=20000.0)
    x = towards(20)
    method(views(x))
    expected = normalise([(20000 * e + v) / 20001 for e, v in zip(TEXT[0], x)])
    assert rows(method.centers)[0] == pytest.approx(expected, abs=1e-6)
    assert method.center_counts[0] == 20001.0


def test_confident_query_is_the_unnormalised_mean_of_the_sharpest_views():
    method = bca(scale=5.0, query="confident")  # 20 views -> the 2 sharpest, ranked under the current embeddings
    angles = [40, 30, 10, 44, 5, 35] + [38] * 14
    o = method(views(*[towards(d) for d in angles]))
    mean = [(a + b) / 2 for a, b in zip(towards(5), towards(10))]
    mean_logits = [5.0 * v for v in mean[:3]]
    assert o.entropy_before == pytest.approx(entropy_of(softmax(mean_logits)), rel=1e-5)
    # the embedding moves with the mean feature (norm cos 2.5 degrees, not renormalised): e0 + mean, normalised
    assert rows(method.centers)[0] == pytest.approx(normalise([e + m for e, m in zip(TEXT[0], mean)]), abs=1e-6)
    with pytest.raises(ValueError, match="query"):
        BCA.Config(query="mean")


def test_the_scale_is_the_authors_100_unless_model_is_asked():
    feature = towards(44)
    authors = BCA(basis_text(10.0), TUNING, BCA.Config(query="original"))
    at_100 = entropy_of(softmax([100 * v for v in feature[:3]]))
    assert authors(views(feature)).entropy_before == pytest.approx(at_100, rel=1e-4)
    assert bca()(views(feature)).entropy_before == pytest.approx(entropy_of(softmax([10 * v for v in feature[:3]])),
                                                                 rel=1e-5)


def test_a_class_blocked_stream_moves_only_its_class_and_its_counts_grow():
    """Ten confident class-0 samples in a row: the running means of row 0 and embedding 0, counts 1 -> 11."""
    method = bca()
    centers, prior, count1, count2 = [row[:] for row in TEXT], [row[:] for row in EYE], 1.0, 1.0
    for degrees in (20, 25, 15, 30, 20, 10, 35, 20, 25, 15):
        x = towards(degrees)
        s, f = posterior(x, centers, prior)
        assert f.index(max(f)) == 0 and max(f) > 0.65
        o = method(views(x))
        assert o.pred == 0 and o.entropy_after == pytest.approx(entropy_of(f), rel=1e-4)
        centers[0] = normalise([(count1 * c + v) / (count1 + 1) for c, v in zip(centers[0], x)])
        prior[0] = [(count2 * p + v) / (count2 + 1) for p, v in zip(prior[0], f)]
        count1, count2 = count1 + 1, count2 + 1
    assert counts(method) == {"centers": {0: 10}, "priors": {0: 10}}
    assert rows(method.centers)[0] == pytest.approx(centers[0], abs=1e-5)
    assert rows(method.prior) == [pytest.approx(prior[0], abs=1e-6), EYE[1], EYE[2]]
    assert sum(prior[0]) == pytest.approx(1.0) and prior[0][0] < 1.0  # row 0 has leaked mass to class 1

# ---------------------------------------------------------------------------------- orderings, state, records


def soft_text(seed: int = 1) -> StubText:
    """3 random classes in R^8 at logit scale 2: posteriors far from one-hot, so both thresholds matter."""
    return StubText(torch.randn(3, 8, generator=torch.Generator().manual_seed(seed)), 2.0)


def soft_bca(**options) -> BCA:
    return BCA(soft_text(), TUNING, BCA.Config(logit_scale="model", init_count1=2.0, **options))


def test_orderings_change_the_memory_and_repeats_do_not():
    samples = random_view_features(8, n_views=10, dim=8, seed=3)
    method = soft_bca()
    forward, snaps_forward = run_order(method, samples, list(range(8)))
    backward, snaps_backward = run_order(method, samples, list(range(7, -1, -1)))
    assert snaps_forward[2] != snaps_backward[2]
    assert any(forward[i].entropy_after != backward[i].entropy_after for i in range(8))
    again, snaps_again = run_order(method, samples, list(range(8)))
    assert again == forward and snaps_again == snaps_forward
    fresh, snaps_fresh = run_order(soft_bca(), samples, list(range(8)))
    assert fresh == forward and snaps_fresh == snaps_forward


def test_state_dict_resumes_a_stream_bit_for_bit():
    samples = random_view_features(14, n_views=10, dim=8, seed=5)
    whole = soft_bca()
    [whole(s) for s in samples[:7]]
    assert whole.snapshot()["priors"]  # some prior row has moved
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    resumed = soft_bca()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rest = [whole(s) for s in samples[7:]]
    assert [resumed(s) for s in samples[7:]] == rest
    assert rest != [soft_bca()(s) for s in samples[7:]]  # the state mattered


def test_records_count_the_contributions():
    method = soft_bca()
    seen: list[int] = []
    for sample in random_view_features(15, n_views=10, dim=8, seed=7):
        o = method(sample)
        assert o.deleted == [] and o.appended == list(range(len(seen), len(seen) + len(o.appended)))
        seen += o.appended
        snapshot = method.snapshot()
        assert o.buffer_size == len(seen) == sum(snapshot["centers"].values()) + sum(snapshot["priors"].values())
    assert 15 < len(seen) < 30  # some samples moved both, some only an embedding


def test_bca_runs_on_the_tiny_clip(text):
    method = BCA(text, TUNING, BCA.Config(), ["a photo of a {}.", "a {}."])
    records = three_sample_stream(method)
    assert len(records) == 3 and records["pred"].between(0, 2).all() and records["buffer_size"].iloc[-1] >= 1
    assert METHODS["bca"] is BCA and BCA.uses_templates and not BCA.order_independent
