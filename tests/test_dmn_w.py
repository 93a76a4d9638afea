"""DMN-W on hand-made streams: view 0 alone is labelled, stored and read; a full class always replaces its worst slot.

The text side is test_peers' stub (classes = e0, e1, e2 of R^4, a chosen logit scale); expected values are worked
out here with plain `math` from tta-vlm's dmn_weak.py, not with the method's helpers.
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from dynaprompt.methods import METHODS, build_method
from dynaprompt.methods.dmn_w import DMNW, Config
from dynaprompt.objectives import TuningConfig

from .conftest import follow_memory, random_view_features, three_sample_stream
from .test_peers import BLURRY, basis_text, dot, entropy_of, random_text, run_order, softmax, towards, views

TUNING = TuningConfig()


def zs_probs(feature, scale: float = 10.0) -> list[float]:
    return softmax([scale * feature[k] for k in range(3)])


def stored_entropy(degrees: float) -> float:
    """tta-vlm's Entropy: -sum p log(p + 1e-5) of the zero-shot softmax (dmn_weak.py:L63-68)."""
    return -sum(p * math.log(p + 1e-5) for p in zs_probs(towards(degrees)))


def test_view_zero_alone_is_labelled_stored_and_read_out_by_hand():
    method = DMNW(basis_text(5.0), TUNING, Config())  # logit scale 5
    f0 = towards(40)  # view 0: class 0, mildly
    sharp = towards(85)  # a sharp class-1 view, which DMN would label the sample by: DMN-W does not read it
    o = method(views(f0, sharp, sharp, BLURRY))
    assert (o.appended, o.deleted, o.buffer_size) == ([0], [], 1)
    p_zs = zs_probs(f0, 5.0)
    assert method.snapshot() == {0: [(0, pytest.approx(-sum(p * math.log(p + 1e-5) for p in p_zs), rel=1e-5))]}
    assert method.memory[0, 0].tolist() == pytest.approx(f0)
    # read-out: class 0 = normalise(1 * f0 + exp(-5.5 (1 - f0.e0)) e0); classes 1, 2 = their text features
    w = math.exp(-5.5 * (1 - f0[0]))
    proto0 = [f0[0] + w, f0[1], 0.0, 0.0]
    p_mem = softmax([5 * dot(f0, proto0) / math.sqrt(dot(proto0, proto0)), 5 * f0[1], 0.0])
    final = [z + 1.0 * m for z, m in zip(p_zs, p_mem)]  # alpha 1.0
    assert o.pred == 0
    assert o.entropy_before == pytest.approx(entropy_of(p_zs), rel=1e-5)
    assert o.entropy_after == pytest.approx(entropy_of([x / 2 for x in final]), rel=1e-5)
    # the other views change nothing
    again = DMNW(basis_text(5.0), TUNING, Config())
    assert again(views(f0, BLURRY)) == o


def test_a_full_class_always_replaces_its_highest_entropy_slot():
    method = DMNW(basis_text(), TUNING, Config(memory_length=2))
    out = [method(views(towards(d))) for d in (30, 10)]
    assert [o.appended for o in out] == [[0], [1]]
    # 40 degrees has a HIGHER entropy than both stored samples, and still replaces the worst one, id 0 (30 degrees)
    assert stored_entropy(40) > stored_entropy(30) > stored_entropy(10)
    o = method(views(towards(40)))
    assert (o.appended, o.deleted, o.buffer_size) == ([2], [0], 2)
    assert method.snapshot()[0] == [(2, pytest.approx(stored_entropy(40), abs=1e-6)),
                                    (1, pytest.approx(stored_entropy(10), abs=1e-6))]
    # the next one replaces the newcomer itself, now the worst (slot 0)
    o = method(views(towards(20)))
    assert (o.appended, o.deleted) == ([3], [2])
    assert method.memory[0, 0].tolist() == pytest.approx(towards(20))


def test_the_authors_lower_entropy_rule_drops_a_worse_newcomer():
    method = DMNW(basis_text(), TUNING, Config(memory_length=2, replacement="lower"))
    for d in (30, 10):
        method(views(towards(d)))
    o = method(views(towards(40)))
    assert (o.appended, o.deleted, o.buffer_size) == ([], [], 2)
    o = method(views(towards(20)))  # lower than H(30): replaces id 0; the dropped sample took no id
    assert (o.appended, o.deleted) == ([2], [0])


def test_tied_entropies_replace_the_lowest_slot():
    method = DMNW(basis_text(), TUNING, Config(memory_length=3))
    for _ in range(3):
        method(views(towards(25)))
    o = method(views(towards(5)))
    assert (o.appended, o.deleted) == ([3], [0])
    assert [i for i, _ in method.snapshot()[0]] == [3, 1, 2]


def test_orderings_change_the_memory_and_repeats_do_not():
    samples = random_view_features(6, n_views=4, dim=8, seed=3)
    method = build_method("dmn_w", random_text(), TUNING, Config(memory_length=1))
    forward, snaps_forward = run_order(method, samples, [0, 1, 2, 3, 4, 5])
    backward, snaps_backward = run_order(method, samples, [5, 4, 3, 2, 1, 0])
    assert snaps_forward[2] != snaps_backward[2]
    assert any(forward[i].entropy_after != backward[i].entropy_after for i in range(6))
    again, snaps_again = run_order(method, samples, [0, 1, 2, 3, 4, 5])
    assert again == forward and snaps_again == snaps_forward
    fresh, snaps_fresh = run_order(build_method("dmn_w", random_text(), TUNING, Config(memory_length=1)), samples,
                                   [0, 1, 2, 3, 4, 5])
    assert fresh == forward and snaps_fresh == snaps_forward


def test_state_dict_resumes_a_stream_bit_for_bit():
    samples = random_view_features(10, n_views=4, dim=8, seed=5)
    config = Config(memory_length=2)
    whole = DMNW(random_text(), TUNING, config)
    first = [whole(s) for s in samples[:5]]
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    resumed = DMNW(random_text(), TUNING, config)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    rest = [whole(s) for s in samples[5:]]
    assert [resumed(s) for s in samples[5:]] == rest
    assert resumed.snapshot() == whole.snapshot()
    assert any(o.deleted for o in first + rest)  # a class was full: the state mattered


def test_records_follow_the_memory():
    samples = random_view_features(12, n_views=2, dim=8, seed=7)
    method = DMNW(random_text(), TUNING, Config(memory_length=2))
    assert all(len(o.appended) == 1 for o in follow_memory(method, samples))


def test_config_checks():
    with pytest.raises(ValueError, match="replacement"):
        Config(replacement="sometimes")
    with pytest.raises(ValueError, match="memory_length"):
        Config(memory_length=0)


def test_runs_a_stream_on_the_tiny_clip(text):
    method = build_method("dmn_w", text, TUNING)
    assert METHODS["dmn_w"].uses_templates and not METHODS["dmn_w"].order_independent
    records = three_sample_stream(method)
    assert len(records) == 3 and records["pred"].between(0, 2).all()
    assert records["buffer_size"].tolist() == [1, 2, 3]
    with_templates = build_method("dmn_w", text, TUNING, templates=["a photo of a {}.", "a {}."])
    assert not torch.equal(with_templates.text_features, method.text_features)
