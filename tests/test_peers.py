"""TDA, DMN, OnZeta and BoostAdapter on hand-made feature streams, with the answers worked out by hand.

The text side is a stub: 3 classes whose text features are the first three basis vectors of R^4 (or random
vectors for the ordering tests), and a chosen logit scale. Expected values are computed here with plain
`math` from the definitions, not with the methods' helpers.
"""
from __future__ import annotations

import math

import pytest
import torch

from dynaprompt.methods import METHODS, build_method
from dynaprompt.methods.boostadapter import BoostAdapter
from dynaprompt.methods.dmn import DMN
from dynaprompt.methods.onzeta import OnZeta
from dynaprompt.methods.tda import TDA
from dynaprompt.objectives import TuningConfig

from .conftest import random_view_features, three_sample_stream

TUNING = TuningConfig()
PEERS = ["tda", "dmn", "onzeta", "boostadapter"]


class StubText:
    """What the methods read from a PromptTextEncoder: the zero-shot classifier and the logit scale."""

    def __init__(self, features: torch.Tensor, scale: float):
        self.features = torch.nn.functional.normalize(features.float(), dim=-1)
        self.init_context = torch.zeros(4, 8)
        self.scale = scale

    def encode(self, contexts: torch.Tensor) -> torch.Tensor:
        return self.features.unsqueeze(0).expand(contexts.shape[0], -1, -1)

    def encode_templates(self, templates) -> torch.Tensor:
        return self.features.unsqueeze(0)

    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(self.scale)


def basis_text(scale: float = 10.0) -> StubText:
    """Classes 0, 1, 2 = e0, e1, e2 in R^4."""
    return StubText(torch.eye(4)[:3], scale)


def vec(*coords) -> list[float]:
    return [float(c) for c in coords] + [0.0] * (4 - len(coords))


def towards(degrees: float, a: int = 0, b: int = 1) -> list[float]:
    """Unit vector cos(d) e_a + sin(d) e_b."""
    out = [0.0] * 4
    out[a], out[b] = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return out


BLURRY = [0.5, 0.5, 0.5, 0.5]  # equal logits on the three classes: entropy ln 3


def views(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def dot(u, v) -> float:
    return sum(a * b for a, b in zip(u, v))


def softmax(logits) -> list[float]:
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return [x / sum(e) for x in e]


def entropy_of(probs, eps: float = 0.0) -> float:
    return -sum(p * math.log(p + eps) for p in probs if p > 0)


def logits_of(feature, scale: float = 10.0) -> list[float]:
    """Against the basis text features e0, e1, e2."""
    return [scale * feature[k] for k in range(3)]


def h(degrees: float, a: int = 0, b: int = 1, scale: float = 10.0) -> float:
    return entropy_of(softmax(logits_of(towards(degrees, a, b), scale)))


# ----------------------------------------------------------------------------------------------------------- TDA


def test_tda_positive_cache_keeps_the_lowest_entropy_per_class():
    method = TDA(basis_text(), TUNING, TDA.Config(query="original", logit_scale="model"))
    # all out of the negative band (H / log2 3 < 0.18): only the positive cache moves
    out = [method(views(towards(d))) for d in (30, 10, 20)]
    assert [o.appended for o in out] == [[0], [1], [2]] and all(o.deleted == [] for o in out)
    assert [i for i, _ in method.snapshot()["positive"][0]] == [1, 2, 0]  # sorted by entropy: 10, 20, 30 degrees
    # full class 0: 15 degrees (H 0.0075 < H(30) 0.119) replaces the worst entry, id 0
    assert h(15) < h(30)
    o = method(views(towards(15)))
    assert (o.appended, o.deleted, o.buffer_size) == ([3], [0], 3)
    assert [i for i, _ in method.snapshot()["positive"][0]] == [1, 3, 2]
    # 25 degrees (H 0.047 > worst H(20) 0.0185) is rejected; so is an exact tie with the worst entry
    assert h(25) > h(20)
    for degrees in (25, 20):
        o = method(views(towards(degrees)))
        assert (o.appended, o.deleted, o.buffer_size) == ([], [], 3)
    assert [i for i, _ in method.snapshot()["positive"][0]] == [1, 3, 2]
    # another pseudo-class has its own three slots
    o = method(views(towards(80)))
    assert (o.appended, o.deleted, o.buffer_size) == ([4], [], 4)
    assert [i for i, _ in method.snapshot()["positive"][1]] == [4]
    method.reset()
    assert method.snapshot() == {"positive": {}, "negative": {}} and method.next_id == 0


def test_tda_negative_band_and_final_logits_by_hand():
    method = TDA(basis_text(), TUNING, TDA.Config(query="original", logit_scale="model"))
    log2c = math.log2(3)
    # sample a, 40 degrees: H / log2 3 = 0.339, inside (0.2, 0.5): positive id 0 and negative id 1
    assert 0.2 < h(40) / log2c < 0.5
    a = towards(40)
    o = method(views(a))
    assert (o.appended, o.deleted, o.buffer_size) == ([0, 1], [], 2)
    # it reads itself: affinity 1, so +alpha on class 0 and -0.117 on the classes with 0.03 < p < 1 (0 and 1)
    probs = softmax(logits_of(a))
    assert probs[0] > 0.03 and probs[1] > 0.03 and probs[2] < 0.03
    expected = [x + pos - neg for x, pos, neg in zip(logits_of(a), [2.0, 0, 0], [0.117, 0.117, 0])]
    assert o.pred == 0
    assert o.entropy_before == pytest.approx(h(40), rel=1e-5)
    assert o.entropy_after == pytest.approx(entropy_of(softmax(expected)), rel=1e-5)
    assert method.final_logits(method_query(method, a)).tolist() == pytest.approx(expected, rel=1e-5)

    # sample b, 35 degrees: H / log2 3 = 0.176, below the band: positive only (id 2)
    assert h(35) / log2c < 0.2
    b = towards(35)
    o = method(views(b))
    assert (o.appended, o.buffer_size) == ([2], 3)
    assert [i for i, _ in method.snapshot()["negative"][0]] == [1]
    # final = logits + 2 (exp(-5 (1 - a.b)) + exp(0)) e0 - 0.117 exp(-(1 - a.b)) (e0 + e1)
    cos5 = dot(a, b)
    pos = 2.0 * (math.exp(-5 * (1 - cos5)) + 1.0)
    neg = 0.117 * math.exp(-(1 - cos5))
    expected = [logits_of(b)[0] + pos - neg, logits_of(b)[1] - neg, logits_of(b)[2]]
    assert o.entropy_after == pytest.approx(entropy_of(softmax(expected)), rel=1e-5)

    # above the band: an even three-way sample (H = ln 3, normalised 0.69) stays out of the negative cache
    o = method(views(BLURRY))
    assert o.appended == [3]  # positive only, under class 0 (argmax tie -> first class)
    assert [i for i, _ in method.snapshot()["negative"][0]] == [1]
    # 44 degrees, in band: replaces the even sample in the full positive class 0 (id 3) and fills the negative one
    o = method(views(towards(44)))
    assert (o.appended, o.deleted) == ([4, 5], [3])
    assert [i for i, _ in method.snapshot()["negative"][0]] == [1, 5]
    # 42 degrees, H(40) < H(42) < H(44): replaces the 44-degree entry in both caches
    assert h(40) < h(42) < h(44)
    o = method(views(towards(42)))
    assert (o.appended, o.deleted, o.buffer_size) == ([6, 7], [4, 5], 5)
    assert [i for i, _ in method.snapshot()["positive"][0]] == [2, 0, 6]
    assert [i for i, _ in method.snapshot()["negative"][0]] == [1, 7]


def method_query(method, feature):
    """The query TDA builds for a single-view sample (to re-read the caches)."""
    from dynaprompt.methods.tda import class_logits, represent

    vf = views(feature)
    return represent(vf, class_logits(vf, method.text_features, method.scale), "original", 0.1)


def test_tda_confident_query_is_the_unnormalised_mean_of_the_sharpest_views():
    # query "confident", 20 views -> the 2 sharpest
    method = TDA(basis_text(5.0), TUNING, TDA.Config(logit_scale="model"))
    angles = [40, 30, 10, 44, 5, 35] + [38] * 14
    o = method(views(*[towards(d) for d in angles]))
    stored, [(_, stored_entropy)] = method.positive.features[0, 0], method.positive.entries[0]
    mean = [(x + y) / 2 for x, y in zip(towards(5), towards(10))]
    assert stored.tolist() == pytest.approx(mean, abs=1e-6)
    assert float(stored.norm()) == pytest.approx(math.cos(math.radians(2.5)), abs=1e-6)  # not renormalised
    probs5, probs10 = softmax(logits_of(towards(5), 5.0)), softmax(logits_of(towards(10), 5.0))
    assert stored_entropy == pytest.approx(entropy_of([(p + q) / 2 for p, q in zip(probs5, probs10)]), rel=1e-5)
    mean_logits = [(p + q) / 2 for p, q in zip(logits_of(towards(5), 5.0), logits_of(towards(10), 5.0))]
    assert o.entropy_before == pytest.approx(entropy_of(softmax(mean_logits)), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------- DMN


def test_dmn_stores_view_zero_under_the_confident_views_label_and_reads_out_by_hand():
    method = DMN(basis_text(5.0), TUNING, DMN.Config())  # logit scale 5
    f0 = towards(40)  # view 0 says class 0, mildly
    sharp = towards(85)  # view 3 says class 1, sharply: it is the 1 confident view of 10
    o = method(views(f0, BLURRY, BLURRY, sharp, *[BLURRY] * 6))
    assert (o.appended, o.deleted, o.buffer_size) == ([0], [], 1)
    q = softmax(logits_of(sharp, 5.0))
    assert method.snapshot() == {1: [(0, pytest.approx(entropy_of(q, 1e-8), rel=1e-5))]}
    assert method.memory[1, 0].tolist() == pytest.approx(f0)  # the stored feature is view 0's
    # read-out: class 1 = normalise(1 * f0 + exp(-5.5 (1 - f0.e1)) e1); classes 0 and 2 = their text features
    w = math.exp(-5.5 * (1 - f0[1]))
    proto1 = [f0[0], f0[1] + w, 0.0, 0.0]
    norm = math.sqrt(dot(proto1, proto1))
    p_mem = softmax([5 * f0[0], 5 * dot(f0, proto1) / norm, 0.0])
    p_zs = softmax(logits_of(f0, 5.0))
    final = [z + 3.0 * m for z, m in zip(p_zs, p_mem)]
    assert o.pred == max(range(3), key=lambda k: final[k])
    assert o.entropy_before == pytest.approx(entropy_of(p_zs), rel=1e-5)
    assert o.entropy_after == pytest.approx(entropy_of([x / 4 for x in final]), rel=1e-5)


def test_dmn_full_class_replaces_its_highest_entropy_slot_only_for_a_lower_entropy():
    method = DMN(basis_text(), TUNING, DMN.Config(memory_length=2))
    sample = lambda degrees: views(*[towards(degrees)] * 10)  # noqa: E731

    out = [method(sample(d)) for d in (30, 10)]
    assert [o.appended for o in out] == [[0], [1]]
    # 20 degrees: lower than the stored H(30) -> replaces that slot (id 0), in place
    o = method(sample(20))
    assert (o.appended, o.deleted, o.buffer_size) == ([2], [0], 2)
    assert [i for i, _ in method.snapshot()[0]] == [2, 1]
    # 25 degrees: higher than both stored entropies -> dropped
    assert h(25) > h(20) > h(10)
    o = method(sample(25))
    assert (o.appended, o.deleted, o.buffer_size) == ([], [], 2)
    # 15 degrees: lower than H(20) -> replaces id 2, the highest-entropy slot
    o = method(sample(15))
    assert (o.appended, o.deleted) == ([3], [2])
    assert [i for i, _ in method.snapshot()[0]] == [3, 1]
    assert method.memory[0, 0].tolist() == pytest.approx(towards(15))


def test_dmn_uses_only_the_first_n_views():
    method = DMN(basis_text(), TUNING, DMN.Config(n_views=2))
    # the sharp class-1 view sits at row 3, outside the first two rows: the label comes from rows 0-1
    method(views(towards(40), BLURRY, BLURRY, towards(85), *[BLURRY] * 6))
    assert list(method.snapshot()) == [0]


# -------------------------------------------------------------------------------------------------------- OnZeta


def test_onzeta_two_updates_by_hand():
    config = OnZeta.Config(tau_t=1.0, tau_i=0.5, cw=0.5, cr=2.0, alpha=1.0, beta=0.8)
    method = OnZeta(basis_text(), TUNING, config)
    method.start_stream(2)
    x1, x2 = towards(0), towards(45)
    texts = [vec(1), vec(0, 1), vec(0, 0, 1)]

    def step(t, x, rho, w):
        q = softmax([dot(x, c) / 1.0 for c in texts])
        q = [a * math.exp(r) for a, r in zip(q, rho)]
        q = [a / sum(q) for a in q]
        new_rho = [max(0.0, r - 2.0 / math.sqrt(t) * (a - 1 / 3)) for r, a in zip(rho, q)]
        p = softmax([dot(x, row) / 0.5 for row in w])
        beta_t = 0.8 * math.sqrt(t / 2)
        out = [beta_t * a + (1 - beta_t) * b for a, b in zip(p, q)]
        eta = 0.5 / math.sqrt(t) / 0.5
        rows = [[wk - eta * (pk - qk) * xk for wk, xk in zip(row, x)] for row, pk, qk in zip(w, p, q)]
        new_w = [[v / math.sqrt(dot(r, r)) for v in r] for r in rows]
        return out, new_rho, new_w, q

    out1, rho1, w1, q1 = step(1, x1, [0.0] * 3, texts)
    # by hand: q1 = (e, 1, 1) / (e + 2); rho1 = (0, 2 (1/3 - q1[1]), same)
    assert q1[1] == pytest.approx(1 / (math.e + 2))
    r = 2 * (1 / 3 - 1 / (math.e + 2))
    assert rho1 == pytest.approx([0.0, r, r])
    o1 = method(views(x1))
    assert method.rho.tolist() == pytest.approx(rho1, rel=1e-5)
    assert method.proxies.flatten().tolist() == pytest.approx(sum(w1, []), rel=1e-5, abs=1e-6)
    assert o1.entropy_after == pytest.approx(entropy_of(out1), rel=1e-5)
    assert o1.entropy_before == pytest.approx(entropy_of(softmax([1.0, 0.0, 0.0])), rel=1e-5)

    out2, rho2, w2, _ = step(2, x2, rho1, w1)
    o2 = method(views(x2))
    assert method.rho.tolist() == pytest.approx(rho2, rel=1e-5, abs=1e-6)
    assert method.proxies.flatten().tolist() == pytest.approx(sum(w2, []), rel=1e-5, abs=1e-6)
    assert o2.pred == max(range(3), key=lambda k: out2[k])
    assert o2.entropy_after == pytest.approx(entropy_of(out2), rel=1e-5)
    assert (o2.appended, o2.deleted, o2.buffer_size) == ([], [], 0)

    # reset keeps N; tau_t defaults to 1 / logit_scale
    method.reset()
    assert method.stream_length == 2 and method.t == 0 and method.rho.abs().sum() == 0
    assert OnZeta(basis_text(scale=100.0), TUNING, OnZeta.Config()).tau_t == pytest.approx(0.01)


def test_onzeta_unknown_stream_length_uses_the_full_weight():
    config = OnZeta.Config(tau_t=1.0, tau_i=0.5, beta=0.8)
    method = OnZeta(basis_text(), TUNING, config)
    method.reset()
    x = towards(30)
    o = method(views(x))
    q = softmax([x[0], x[1], 0.0])
    p = softmax([x[0] / 0.5, x[1] / 0.5, 0.0])
    assert o.entropy_after == pytest.approx(entropy_of([0.8 * a + 0.2 * b for a, b in zip(p, q)]), rel=1e-5)


# -------------------------------------------------------------------------------------------------- BoostAdapter


def test_boostadapter_boosts_with_the_sharpest_views_for_one_sample_only():
    method = BoostAdapter(basis_text(5.0), TUNING, BoostAdapter.Config(query="original", logit_scale="model"))
    f0 = towards(10)  # class 0, H 0.128 (normalised 0.08: out of the negative band)
    sharp2 = towards(5, 2, 1)  # class 2, H 0.098: the sharpest view
    rows = [f0] + [BLURRY] * 19  # BLURRY: H ln 3
    rows[3] = towards(15)  # class 0, H 0.173: third, not boosted
    rows[7] = sharp2
    assert h(5, scale=5.0) < h(10, scale=5.0) < h(15, scale=5.0)
    o = method(views(*rows))
    assert o.selected == [7, 0]  # the int(0.1 * 20) = 2 lowest-entropy views, view 0 included
    assert (o.appended, o.deleted, o.buffer_size) == ([0], [], 1)
    # final = logits(f0) + 2 (exp(0) [history] + exp(0) [view 0 boost]) e0 + 2 exp(-5 (1 - f0.v7)) e2
    base = logits_of(f0, 5.0)
    boost2 = 2.0 * math.exp(-5 * (1 - dot(f0, sharp2)))
    expected = [base[0] + 4.0, base[1], base[2] + boost2]
    assert o.entropy_after == pytest.approx(entropy_of(softmax(expected)), rel=1e-4)  # H ~ 4e-3 in fp32
    # the boosting entries did not persist
    assert method.snapshot() == {"historical": {0: [(0, pytest.approx(h(10, scale=5.0), rel=1e-5))]}, "negative": {}}
    # the same image again: history now holds two entries; only this sample's two boosts are added
    o = method(views(*rows))
    assert (o.appended, o.buffer_size, o.selected) == ([1], 2, [7, 0])
    expected = [base[0] + 6.0, base[1], base[2] + boost2]
    assert o.entropy_after == pytest.approx(entropy_of(softmax(expected)), rel=1e-4)  # H ~ 4e-3 in fp32


def test_boostadapter_boosting_views_compete_with_history_in_the_copy_only():
    config = BoostAdapter.Config(query="original", shot_capacity=1, delta=0, logit_scale="model")
    method = BoostAdapter(basis_text(), TUNING, config)
    f0 = towards(30)
    rows = [f0] + [BLURRY] * 19
    rows[4], rows[9] = towards(5), towards(10)
    o = method(views(*rows))
    # cap 1 + 0: view 4 (5 degrees) evicts the history entry in the copy; view 9 (10 degrees) does not get in
    assert o.selected == [4]
    expected = [logits_of(f0)[0] + 2.0 * math.exp(-5 * (1 - math.cos(math.radians(25)))), *logits_of(f0)[1:]]
    assert o.entropy_after == pytest.approx(entropy_of(softmax(expected)), rel=1e-5)
    assert method.snapshot()["historical"] == {0: [(0, pytest.approx(h(30), rel=1e-5))]}


def test_boostadapter_negative_cache_is_first_in_first_out():
    method = BoostAdapter(basis_text(), TUNING, BoostAdapter.Config(query="original", logit_scale="model"))
    out = [method(views(towards(d))) for d in (40, 44, 42)]  # all in the band; one view: no boosting
    assert [o.appended for o in out] == [[0, 1], [2, 3], [4, 5]]
    assert out[2].deleted == [1]  # the oldest goes, although it had the lowest entropy (TDA would drop id 3)
    assert [i for i, _ in method.snapshot()["negative"][0]] == [3, 5]
    assert all(o.selected == [] for o in out)


# ------------------------------------------------------------------------------ TDA, BoostAdapter: logit scale


@pytest.mark.parametrize("kind", ["tda", "boostadapter"])
def test_authors_literal_logit_scale_by_hand(kind):
    """utils.py's 100 (TDA L74, BoostAdapter L84) against the model's scale (the stub's 5) on one sample at 40
    degrees: the entropy, the negative cache's gate and the read-out all follow the scale."""
    x = towards(40)
    gated = {}
    for option, scale in (("authors", 100.0), ("model", 5.0)):
        config = METHODS[kind].Config(query="original", logit_scale=option)
        o = build_method(kind, basis_text(5.0), TUNING, config)(views(x))  # one view: nothing to boost
        logits = logits_of(x, scale)
        probs = softmax(logits)
        gated[option] = 0.2 < entropy_of(probs) / math.log2(3) < 0.5
        negative = [0.117 * (0.03 < p < 1.0) * gated[option] for p in probs]  # it reads itself: exp(0) = 1
        final = [v + (2.0 if c == 0 else 0.0) - n for c, (v, n) in enumerate(zip(logits, negative))]
        assert o.appended == ([0, 1] if gated[option] else [0])
        assert o.entropy_before == pytest.approx(entropy_of(probs), rel=1e-4, abs=1e-6)
        assert o.entropy_after == pytest.approx(entropy_of(softmax(final)), rel=1e-4, abs=1e-6)
    assert gated == {"authors": False, "model": True}  # sharp at 100, uncertain enough for the negative cache at 5
    with pytest.raises(ValueError):
        METHODS[kind].Config(logit_scale="clip")


# ------------------------------------------------------------------------------------------ all four: orderings


def random_text(seed: int = 1) -> StubText:
    generator = torch.Generator().manual_seed(seed)
    return StubText(torch.randn(3, 8, generator=generator), 100.0)


def run_order(method, samples, order):
    if hasattr(method, "start_stream"):
        method.start_stream(len(order))
    else:
        method.reset()
    outcomes, snapshots = {}, []
    for index in order:
        outcomes[index] = method(samples[index])
        snapshots.append(method.snapshot())
    return outcomes, snapshots


@pytest.mark.parametrize("kind", PEERS)
def test_orderings_change_the_memory_and_repeats_do_not(kind):
    samples = random_view_features(6, n_views=10, dim=8, seed=3)
    method = build_method(kind, random_text(), TUNING)
    forward, snaps_forward = run_order(method, samples, [0, 1, 2, 3, 4, 5])
    backward, snaps_backward = run_order(method, samples, [5, 4, 3, 2, 1, 0])
    assert snaps_forward[2] != snaps_backward[2]  # memory after three samples: {0,1,2} vs {5,4,3}
    assert any(forward[i].entropy_after != backward[i].entropy_after for i in range(6))
    again, snaps_again = run_order(method, samples, [0, 1, 2, 3, 4, 5])
    assert again == forward and snaps_again == snaps_forward
    fresh, snaps_fresh = run_order(build_method(kind, random_text(), TUNING), samples, [0, 1, 2, 3, 4, 5])
    assert fresh == forward and snaps_fresh == snaps_forward


@pytest.mark.parametrize("kind", PEERS)
def test_peer_runs_a_stream_on_the_tiny_clip(kind, text):
    method = build_method(kind, text, TUNING, templates=["a photo of a {}.", "a {}."])
    assert METHODS[kind].uses_templates and not METHODS[kind].order_independent
    records = three_sample_stream(method)
    assert len(records) == 3 and records["pred"].between(0, 2).all()
    if kind == "onzeta":
        assert method.stream_length == 3
    else:
        assert records["buffer_size"].iloc[-1] >= 1
