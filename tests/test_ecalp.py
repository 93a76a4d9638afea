"""ECALP on hand-made feature streams, with the graph and the propagation worked out by hand in plain `math`.

The text side is tests.test_peers's stub: classes 0, 1, 2 = e0, e1, e2 in R^4. Their per-dimension variance over
the classes is (1/3, 1/3, 1/3, 0), so the context-aware weights w = (1, 1, 1, 0) / sqrt(3) drop the 4th
coordinate on the weighted side of every image-image similarity.
"""
from __future__ import annotations

import io
import math

import pytest
import torch

import dynaprompt.methods.ecalp as ecalp_module
from dynaprompt.methods.ecalp import ECALP
from dynaprompt.objectives import TuningConfig
from dynaprompt.runner import run_stream

from .conftest import random_view_features, three_sample_stream
from .test_peers import basis_text, dot, entropy_of, random_text, softmax, views

TUNING = TuningConfig()


def unit(v):
    norm = math.sqrt(dot(v, v))
    return [x / norm for x in v]


TEXT = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]


def weights_by_hand():
    mean = [sum(t[d] for t in TEXT) / 3 for d in range(4)]
    variance = [sum((t[d] - mean[d]) ** 2 for t in TEXT) / 2 for d in range(4)]  # unbiased, over the 3 classes
    return unit(variance)


def similarity(a, b):
    """S(a, b) = normalise(a * w) . normalise(b): a is the older node, weighted."""
    return dot(unit([x * y for x, y in zip(a, weights_by_hand())]), unit(b))


def ecalp_by_hand(stream, gamma=10.0, iterations=3, divisor=5.0):
    """The query copy's scores at each sample and the final carried labels, when every node neighbours every node.

    That holds while N <= k_image (8): the candidate store then keeps every node, each row's entry for v being
    S(older, newer), the stale entry of the previous query copy being the one left out. k_text = 3 = C: every
    node links to every class, by (x . t_c) ** gamma.
    """
    carry, scores = [], []
    for i, x in enumerate(stream):
        nodes = stream[: i + 1] + [x]  # the persistent nodes, then the query copy of sample i
        n, size = len(nodes), 3 + len(nodes)
        graph = [[0.0] * size for _ in range(size)]
        for u in range(n):
            for v in range(n):  # u's edge to v, and its transpose (W + W^T)
                value = similarity(nodes[min(u, v)], nodes[max(u, v)]) ** gamma
                graph[3 + u][3 + v] += value
                graph[3 + v][3 + u] += value
            for c in range(3):
                value = dot(nodes[u], TEXT[c]) ** gamma
                graph[3 + u][c] += value
                graph[c][3 + u] += value
        scale = [1 / (math.sqrt(sum(row)) + 1e-6) for row in graph]
        normalised = [[scale[a] * graph[a][b] * scale[b] for b in range(size)] for a in range(size)]
        start = [[0.0] * 3 for _ in range(n)]
        for u, (label, value) in enumerate(carry):  # nodes 0..i-1; node i and the copy start at 0
            start[u][label] = value
        labels = [[1.0 if c == k else 0.0 for c in range(3)] for k in range(3)] + start
        for _ in range(iterations):
            estimate = [[sum(normalised[3 + u][b] * labels[b][c] for b in range(size)) for c in range(3)]
                        for u in range(n)]
            labels = labels[:3] + estimate
        rows = labels[3:]
        carry = [(max(range(3), key=lambda c: row[c]), max(row) / divisor) for row in rows][: i + 1]
        scores.append(rows[-1])
    return scores, carry


STREAM = [unit([0.9, 0.3, 0.1, 0.3]), unit([0.2, 0.9, 0.1, -0.3]), unit([0.6, 0.5, 0.2, 0.5])]


def test_ecalp_graph_and_propagation_by_hand():
    method = ECALP(basis_text(), TUNING, ECALP.Config())  # logit scale 10
    method.start_stream(len(STREAM))
    expected_scores, _ = ecalp_by_hand(STREAM)
    for i, (x, expected) in enumerate(zip(STREAM, expected_scores)):
        o = method(views(x))
        assert method.scores.tolist() == pytest.approx(expected, rel=1e-5)
        output = softmax([10000 * s for s in expected])
        assert o.pred == max(range(3), key=lambda c: expected[c])
        assert o.entropy_after == pytest.approx(entropy_of(output), rel=1e-3, abs=1e-9)
        assert o.entropy_before == pytest.approx(entropy_of(softmax([10 * v for v in x[:3]])), rel=1e-5)
        assert (o.appended, o.deleted, o.buffer_size) == ([i], [], i + 1)
        _, carry = ecalp_by_hand(STREAM[: i + 1])
        got = method.snapshot()["carry"]
        assert [label for label, _ in got] == [label for label, _ in carry]
        assert [value for _, value in got] == pytest.approx([value for _, value in carry], rel=1e-5)


def test_ecalp_context_aware_weights_are_the_normalised_class_variance():
    method = ECALP(basis_text(), TUNING, ECALP.Config())
    assert method.weights.tolist() == pytest.approx(weights_by_hand(), abs=1e-7)
    assert weights_by_hand() == pytest.approx([1 / math.sqrt(3)] * 3 + [0.0])


def test_ecalp_candidate_store_widths_and_entries_by_hand():
    # k_image = 2: widths k, k, k (older rows <= k), k + 1 (older rows = k + 1), then k + 2
    method = ECALP(basis_text(), TUNING, ECALP.Config(k_image=2))
    samples = random_view_features(9, n_views=1, dim=4, seed=11)
    stream = [s[0].tolist() for s in samples]
    widths = []
    for i, sample in enumerate(samples):
        method(sample)
        widths.append(method.width)
        nodes = stream[: i + 1] + [stream[i]]  # persistent nodes, then the current query copy
        for u, row in enumerate(method.snapshot()["store"]):
            values = [value for _, value in row]
            assert values == sorted(values, reverse=True)
            for v, value in row:  # every kept entry is S(older, newer) of a current node: no stale entry survives
                assert value == pytest.approx(similarity(nodes[min(u, v)], nodes[max(u, v)]), abs=1e-6)
    assert widths == [2, 2, 2, 3, 4, 4, 4, 4, 4]


def test_ecalp_mean_view_uses_the_unnormalised_mean_of_all_views():
    method = ECALP(basis_text(), TUNING, ECALP.Config(view="mean"))
    rows = [unit([0.9, 0.3, 0.1, 0.3]), unit([0.5, 0.5, 0.5, 0.5])]
    mean = [(a + b) / 2 for a, b in zip(*rows)]
    o = method(views(*rows))
    assert o.entropy_before == pytest.approx(entropy_of(softmax([10 * v for v in mean[:3]])), rel=1e-5)
    assert method.text_sim[0].tolist() == pytest.approx(sorted(mean[:3], reverse=True), rel=1e-6)  # raw x . t_c
    assert method.unit[0].tolist() == pytest.approx(unit(mean), rel=1e-6)
    with pytest.raises(ValueError):
        ECALP.Config(view="confident")


# ---------------------------------------------------------------------------------- orderings, state, records


def stream_records(method, samples, order):
    ids = [f"s{i}" for i in order]
    source = {f"s{i}": samples[i] for i in range(len(samples))}
    return run_stream(method, ids, {i: 0 for i in ids}, source.__getitem__).drop(columns=["seconds"])


def carry_by_sample(method, order):
    return {f"s{index}": value for index, (_, value) in zip(order, method.snapshot()["carry"])}


def test_ecalp_orderings_change_the_graph_and_the_records_and_repeats_do_not():
    samples = random_view_features(8, n_views=4, dim=8, seed=3)
    method = ECALP(random_text(), TUNING, ECALP.Config(k_image=3))
    forward_order, backward_order = list(range(8)), list(range(7, -1, -1))
    forward = stream_records(method, samples, forward_order)
    carry_forward = carry_by_sample(method, forward_order)
    backward = stream_records(method, samples, backward_order)
    assert carry_by_sample(method, backward_order) != carry_forward
    by_sample = lambda frame: frame.set_index("sample_id").sort_index()  # noqa: E731
    assert not by_sample(forward)["appended"].equals(by_sample(backward)["appended"])
    assert stream_records(method, samples, forward_order).equals(forward)
    assert carry_by_sample(method, forward_order) == carry_forward
    assert stream_records(ECALP(random_text(), TUNING, ECALP.Config(k_image=3)), samples, forward_order).equals(forward)


def test_ecalp_state_dict_resumes_a_stream_bit_for_bit():
    samples = random_view_features(14, n_views=4, dim=8, seed=5)
    config = ECALP.Config(k_image=3)
    whole = ECALP(random_text(), TUNING, config)
    whole.start_stream(len(samples))
    [whole(s) for s in samples[:7]]
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    resumed = ECALP(random_text(), TUNING, config)
    resumed.start_stream(len(samples))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rest = [whole(s) for s in samples[7:]]
    assert [resumed(s) for s in samples[7:]] == rest
    assert torch.equal(resumed.scores, whole.scores)


def test_ecalp_grows_its_preallocation_without_changing_the_graph(monkeypatch):
    samples = random_view_features(12, n_views=2, dim=8, seed=9)
    sized = ECALP(random_text(), TUNING, ECALP.Config(k_image=3))
    sized.start_stream(len(samples))
    expected = [sized(s) for s in samples]
    monkeypatch.setattr(ecalp_module, "INITIAL_NODES", 1)
    growing = ECALP(random_text(), TUNING, ECALP.Config(k_image=3))
    growing.start_stream(0)  # length unknown: room for 3 nodes, doubled as the graph grows
    assert growing.capacity == 3
    assert [growing(s) for s in samples] == expected and growing.capacity >= 13


def test_ecalp_records_follow_the_graph():
    method = ECALP(random_text(), TUNING, ECALP.Config())
    for position, sample in enumerate(random_view_features(5, n_views=2, dim=8, seed=1)):
        o = method(sample)
        assert (o.appended, o.deleted, o.buffer_size) == ([position], [], position + 1)
        assert len(method.snapshot()["carry"]) == position + 1 == method.n_nodes
    method.reset()
    assert method.n_nodes == 0 and method.snapshot()["carry"] == []


def test_ecalp_runs_on_the_tiny_clip(text):
    method = ECALP(text, TUNING, ECALP.Config(), ["a photo of a {}.", "a {}."])
    records = three_sample_stream(method)
    assert len(records) == 3 and records["pred"].between(0, 2).all() and records["buffer_size"].iloc[-1] == 3
    assert ECALP.uses_templates and not ECALP.order_independent
