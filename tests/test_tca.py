"""TCA's reservoir on hand-made feature streams, with the answers worked out by hand (plain `math`).

The text side is tests.test_peers's stub: classes 0, 1, 2 = e0, e1, e2 in R^4, logit scale 10.
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from dynaprompt.methods.tca import TCA
from dynaprompt.objectives import TuningConfig
from dynaprompt.runner import run_stream

from .conftest import follow_memory, random_view_features, three_sample_stream
from .test_peers import basis_text, dot, entropy_of, h, logits_of, random_text, softmax, towards, views

TUNING = TuningConfig()


def h_of(feature) -> float:
    return entropy_of(softmax(logits_of(feature)))


def read_out(feature, entries, lambd=3.0, beta=5.0) -> list[float]:
    """clip logits + lambd * sum_j exp(-(beta - beta * cos(f, k_j))) on each entry's class; entries: (class, key)."""
    final = logits_of(feature)
    for label, key in entries:
        final[label] += lambd * math.exp(-(beta - beta * dot(feature, key)))
    return final


def check_read_out(method, o, feature, entries):
    """The reservoir term exactly; the entropy of the (very peaked) final prediction to fp32's precision."""
    hand = read_out(feature, entries)
    reservoir = [x - y for x, y in zip(hand, logits_of(feature))]
    assert method.reservoir_logits(torch.tensor(feature)).tolist() == pytest.approx(reservoir, rel=1e-5, abs=1e-9)
    assert o.entropy_after == pytest.approx(entropy_of(softmax(hand)), rel=2e-3)
    assert o.pred == max(range(3), key=lambda c: hand[c])


def test_tca_pops_the_entry_with_the_largest_entropy_plus_similarity():
    method = TCA(basis_text(), TUNING, TCA.Config(reservoir_size=2, logit_scale="model"))
    a, b, c = towards(10), towards(12), towards(15, 0, 2)  # a and b nearly alike; c leans towards e2 instead
    o = method(views(a))
    assert (o.appended, o.deleted, o.buffer_size) == ([0], [], 1)
    check_read_out(method, o, a, [(0, a)])  # it reads itself
    o = method(views(b))
    assert (o.appended, o.deleted, o.buffer_size) == ([1], [], 2)
    # three in class 0: score = H + mean cosine to the other two; a is the most typical and goes, though most confident
    scores = {name: h_of(x) + (dot(x, y) + dot(x, z)) / 2
              for name, x, y, z in (("a", a, b, c), ("b", b, a, c), ("c", c, a, b))}
    assert h_of(a) < h_of(b) and max(scores, key=scores.get) == "a"
    o = method(views(c))
    assert (o.appended, o.deleted, o.buffer_size) == ([2], [0], 2)
    assert method.snapshot() == {0: [(1, pytest.approx(h_of(b), rel=1e-4)), (2, pytest.approx(h_of(c), rel=1e-4))]}
    assert o.entropy_before == pytest.approx(h_of(c), rel=1e-4)
    check_read_out(method, o, c, [(0, b), (0, c)])
    # an uncertain newcomer has the largest score itself: it is popped at once, gets no id, but is still read
    d = towards(40)
    score_d = h_of(d) + (dot(d, b) + dot(d, c)) / 2
    assert score_d > max(h_of(b) + (dot(b, c) + dot(b, d)) / 2, h_of(c) + (dot(c, b) + dot(c, d)) / 2)
    o = method(views(d))
    assert (o.appended, o.deleted, o.buffer_size) == ([], [], 2)
    check_read_out(method, o, d, [(0, b), (0, c)])
    # another class has its own reservoir, and every entry of every class is read
    e = towards(80)
    o = method(views(e))
    assert (o.appended, o.deleted, o.buffer_size) == ([3], [], 3)
    check_read_out(method, o, e, [(0, b), (0, c), (1, e)])
    method.reset()
    assert method.snapshot() == {} and method.next_id == 0


def test_tca_tie_pops_the_first_entry_in_entropy_order():
    method = TCA(basis_text(), TUNING, TCA.Config(reservoir_size=1, logit_scale="model"))
    method(views(towards(10)))
    # the same image again: equal H, equal similarity; torch.argmax takes the first, the stored entry
    o = method(views(towards(10)))
    assert (o.appended, o.deleted, o.buffer_size) == ([1], [0], 1)
    # a sharper image: H lower, similarity to the other the same, so the stored (less sharp) one goes
    assert h(5) < h(10)
    o = method(views(towards(5)))
    assert (o.appended, o.deleted) == ([2], [1])


def test_tca_reservoir_lists_stay_sorted_by_entropy():
    method = TCA(basis_text(), TUNING, TCA.Config(reservoir_size=3, logit_scale="model"))
    for degrees in (30, 10, 20):
        method(views(towards(degrees)))
    assert [i for i, _ in method.snapshot()[0]] == [1, 2, 0]
    assert [e for _, e in method.snapshot()[0]] == pytest.approx([h(10), h(20), h(30)], rel=1e-5)


def test_tca_uses_view_zero_only():
    method = TCA(basis_text(), TUNING, TCA.Config(logit_scale="model"))
    o = method(views(towards(40), towards(85), towards(85)))
    assert o.entropy_before == pytest.approx(h(40), rel=1e-5)
    assert list(method.snapshot()) == [0]
    with pytest.raises(ValueError):
        TCA.Config(reservoir_size=0)


def test_tca_authors_literal_logit_scale_sets_the_entropy_against_the_similarity_by_hand():
    """utils.py:229's 100 against the model's scale (the stub's 5): at 100 the entropies of these sharp samples are
    near 0 and the similarity decides which entry pops; at 5 the entropy does."""
    a, b, c = towards(0), towards(10), towards(30)

    def score(x, others, scale):  # H + mean cosine to the class's other entries
        return entropy_of(softmax(logits_of(x, scale))) + sum(dot(x, o) for o in others) / len(others)

    popped = {}
    for option, scale in (("authors", 100.0), ("model", 5.0)):
        method = TCA(basis_text(5.0), TUNING, TCA.Config(reservoir_size=2, logit_scale=option))
        first = method(views(a))
        final = logits_of(a, scale)
        final[0] += 3.0  # it reads itself: lambd * exp(0)
        assert first.entropy_before == pytest.approx(entropy_of(softmax(logits_of(a, scale))), rel=1e-4, abs=1e-6)
        assert first.entropy_after == pytest.approx(entropy_of(softmax(final)), rel=1e-3, abs=1e-6)
        method(views(b))
        third = method(views(c))
        scores = [score(a, [b, c], scale), score(b, [a, c], scale), score(c, [a, b], scale)]
        popped[option] = max(range(3), key=scores.__getitem__)
        kept_newcomer = popped[option] != 2
        assert (third.appended, third.deleted) == (([2], [popped[option]]) if kept_newcomer else ([], []))
    assert popped == {"authors": 1, "model": 2}
    with pytest.raises(ValueError):
        TCA.Config(logit_scale="clip")


# ---------------------------------------------------------------------------------- orderings, state, records


def stream_records(method, samples, order):
    ids = [f"s{i}" for i in order]
    source = {f"s{i}": samples[i] for i in range(len(samples))}
    return run_stream(method, ids, {i: 0 for i in ids}, source.__getitem__).drop(columns=["seconds"])


def kept_samples(method, records) -> set[str]:
    """The samples whose entries are in the reservoir now (ids mapped back through the records)."""
    sample_of = {i: sample for sample, ids in zip(records["sample_id"], records["appended"]) for i in ids}
    return {sample_of[i] for entries in method.snapshot().values() for i, _ in entries}


def test_tca_orderings_change_the_reservoir_and_the_records_and_repeats_do_not():
    samples = random_view_features(12, n_views=2, dim=8, seed=3)
    method = TCA(random_text(), TUNING, TCA.Config(reservoir_size=2))
    forward = stream_records(method, samples, list(range(12)))
    kept_forward = kept_samples(method, forward)
    backward = stream_records(method, samples, list(range(11, -1, -1)))
    assert kept_samples(method, backward) != kept_forward
    by_sample = lambda frame: frame.set_index("sample_id").sort_index()  # noqa: E731
    assert not by_sample(forward)[["entropy_after", "deleted"]].equals(by_sample(backward)[["entropy_after",
                                                                                            "deleted"]])
    assert stream_records(method, samples, list(range(12))).equals(forward)
    assert stream_records(TCA(random_text(), TUNING, TCA.Config(reservoir_size=2)), samples,
                          list(range(12))).equals(forward)


def test_tca_state_dict_resumes_a_stream_bit_for_bit():
    samples = random_view_features(12, n_views=2, dim=8, seed=5)
    config = TCA.Config(reservoir_size=2)
    whole = TCA(random_text(), TUNING, config)
    [whole(s) for s in samples[:6]]
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    resumed = TCA(random_text(), TUNING, config)
    resumed.reset()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rest = [whole(s) for s in samples[6:]]
    assert [resumed(s) for s in samples[6:]] == rest
    assert any(o.deleted or not o.appended for o in rest)  # reservoirs were full: the state mattered


def test_tca_records_follow_the_reservoir():
    method = TCA(random_text(), TUNING, TCA.Config(reservoir_size=2))
    outcomes = follow_memory(method, random_view_features(15, n_views=2, dim=8, seed=7))
    assert sum(len(o.deleted) for o in outcomes) > 0


def test_tca_runs_on_the_tiny_clip(text):
    method = TCA(text, TUNING, TCA.Config(), ["a photo of a {}.", "a {}."])
    records = three_sample_stream(method)
    assert len(records) == 3 and records["pred"].between(0, 2).all() and records["buffer_size"].iloc[-1] == 3
    assert TCA.uses_templates and not TCA.order_independent
