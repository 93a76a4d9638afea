"""DPE on hand-made feature streams, with the answers worked out by hand (plain `math`, not the method's helpers).

The text side is tests.test_peers's stub: classes 0, 1, 2 = e0, e1, e2 in R^4 with a chosen logit scale. The
one AdamW step is checked against a numerical gradient of the loss written out below from its definition.
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from dynaprompt.methods.dpe import DPE
from dynaprompt.objectives import TuningConfig
from dynaprompt.runner import run_stream

from .conftest import follow_memory, random_view_features, three_sample_stream
from .test_peers import BLURRY, basis_text, dot, entropy_of, h, logits_of, random_text, softmax, towards, vec, views

TUNING = TuningConfig()
LOG2_3 = math.log2(3)


def frozen(**options) -> DPE.Config:
    """No residual step (both learning rates 0): the cache and the read-out alone."""
    return DPE.Config(**{"query": "original", "inference_query": "original", "lr_text": 0.0, "lr_image": 0.0,
                         "logit_scale": "model", **options})


def unit(v):
    norm = math.sqrt(dot(v, v))
    return [x / norm for x in v]


def add(u, v):
    return [a + b for a, b in zip(u, v)]


# ------------------------------------------------------------------------------------------------ cache, read-out


def test_dpe_cache_keeps_the_lowest_entropies_per_class_and_records_follow():
    method = DPE(basis_text(), TUNING, frozen(shot_capacity=2))  # logit scale 10
    out = [method(views(towards(d))) for d in (30, 10)]
    assert [(o.appended, o.deleted, o.buffer_size) for o in out] == [([0], [], 1), ([1], [], 2)]
    cache = method.snapshot()["cache"]
    assert [i for i, _ in cache[0]] == [1, 0]  # sorted by entropy: 10 degrees, then 30
    assert cache[0][0][1] == pytest.approx(h(10) / LOG2_3, rel=1e-5)  # H / log2(C), nats over bits
    # full class: 20 degrees (lower than the worst, 30) replaces id 0; 25 degrees and a tie with 20 are rejected
    assert h(10) < h(20) < h(25) < h(30)
    o = method(views(towards(20)))
    assert (o.appended, o.deleted, o.buffer_size) == ([2], [0], 2)
    for degrees in (25, 20):
        o = method(views(towards(degrees)))
        assert (o.appended, o.deleted, o.buffer_size) == ([], [], 2)
    assert [i for i, _ in method.snapshot()["cache"][0]] == [1, 2]
    o = method(views(towards(80)))  # class 1 has its own slots
    assert (o.appended, o.deleted, o.buffer_size) == ([3], [], 3)
    assert [i for i, _ in method.snapshot()["cache"][1]] == [3]
    method.reset()
    assert method.snapshot() == {"cache": {}, "n_evolved": 0} and method.next_id == 0


def test_dpe_reads_the_mean_prototype_of_each_cached_class():
    method = DPE(basis_text(2.0), TUNING, frozen(alpha=1.0))  # a mild scale, so that no entropy is near 0
    a, b, c = towards(10), towards(30), towards(80)
    method(views(a))
    method(views(b))
    o = method(views(c))  # class 1
    # prototypes: class 0 = normalise((a + b) / 2), class 1 = c; final = logits + 1 exp(-5 (1 - x . k_c))
    proto0 = unit([(p + q) / 2 for p, q in zip(a, b)])
    final = logits_of(c, 2.0)
    final[0] += math.exp(-5.0 * (1 - dot(c, proto0)))
    final[1] += math.exp(-5.0 * (1 - dot(c, c)))
    assert o.entropy_before == pytest.approx(h(80, scale=2.0), rel=1e-5)
    assert o.entropy_after == pytest.approx(entropy_of(softmax(final)), rel=1e-5)
    assert o.pred == 1


def test_dpe_confident_query_stores_the_unnormalised_mean_and_reads_out_by_the_inference_rule():
    angles = [40, 30, 10, 44, 5, 35] + [38] * 14  # 20 views: the 2 sharpest are 5 and 10 degrees
    scale = 5.0
    mean = [(x + y) / 2 for x, y in zip(towards(5), towards(10))]
    mean_logits = [(p + q) / 2 for p, q in zip(logits_of(towards(5), scale), logits_of(towards(10), scale))]
    mean_probs = [(p + q) / 2 for p, q in zip(softmax(logits_of(towards(5), scale)),
                                              softmax(logits_of(towards(10), scale)))]
    for inference in ("original", "confident"):
        method = DPE(basis_text(scale), TUNING, frozen(query="confident", inference_query=inference, alpha=1.0))
        o = method(views(*[towards(d) for d in angles]))
        assert method.features[0, 0].tolist() == pytest.approx(mean, abs=1e-6)  # not renormalised
        assert method.snapshot()["cache"][0][0][1] == pytest.approx(entropy_of(mean_probs) / LOG2_3, rel=1e-5)
        assert o.entropy_before == pytest.approx(entropy_of(softmax(mean_logits)), rel=1e-5)
        # read-out: view 0 (40 degrees) or the mean of the (re-ranked, here unchanged) confident views
        q, base = (towards(40), logits_of(towards(40), scale)) if inference == "original" else (mean, mean_logits)
        final = list(base)
        final[0] += math.exp(-5.0 * (1 - dot(q, unit(mean))))
        assert o.entropy_after == pytest.approx(entropy_of(softmax(final)), rel=1e-5)


# --------------------------------------------------------------------------------------------- the residual step


def loss_of(params, x, text_global, prototypes, scale, alpha, beta, align, temperature):
    """H(softmax(final)) + align * InfoNCE, as written in main_dpe.py:run_test_dpe, in plain floats.

    params = 12 textual residual entries (3 classes x 4) then 4 per cached class (in `prototypes` order).
    """
    r_text = [params[4 * c: 4 * c + 4] for c in range(3)]
    cached = sorted(prototypes)
    r_image = {c: params[12 + 4 * i: 16 + 4 * i] for i, c in enumerate(cached)}
    text = [unit(add(text_global[c], r_text[c])) for c in range(3)]
    keys = {c: unit(add(prototypes[c], r_image[c])) for c in cached}
    final = [scale * dot(x, text[c]) + (alpha * math.exp(-(beta - beta * dot(x, keys[c]))) if c in keys else 0.0)
             for c in range(3)]
    nce = 0.0
    for c in cached:
        logits = [dot(keys[c], text[j]) / temperature for j in cached]
        top = max(logits)
        nce -= logits[cached.index(c)] - top - math.log(sum(math.exp(v - top) for v in logits))
    return entropy_of(softmax(final)) + align * nce / len(cached)


def adamw_first_step(loss, params, lr, eps, step=1e-6):
    """AdamW's first step from zero: -lr * g / (|g| + eps), g by central differences (weight decay acts on 0)."""
    out = []
    for i in range(len(params)):
        up, down = list(params), list(params)
        up[i] += step
        down[i] -= step
        g = (loss(up) - loss(down)) / (2 * step)
        out.append(params[i] - lr * g / (abs(g) + eps))
    return out


def test_dpe_one_adamw_step_on_both_residuals_and_the_textual_evolution_by_hand():
    scale, alpha, beta, align, lr = 5.0, 6.0, 5.0, 2.5, 0.05
    config = DPE.Config(query="original", inference_query="original", lr_text=lr, lr_image=lr, logit_scale="model")
    method = DPE(basis_text(scale), TUNING, config)
    text_global = [vec(1), vec(0, 1), vec(0, 0, 1)]  # the stub's text features e0, e1, e2
    prototypes = {}
    for x, evolves in ((towards(44), True), (towards(50), False)):
        # the pseudo-label and the entropy_before come from normalise(T_g) before the step
        start = [scale * dot(x, unit(t)) for t in text_global]
        label = max(range(3), key=lambda c: start[c])
        assert label not in prototypes  # one entry per class here: the prototype is the sample itself
        prototypes[label] = x
        loss = lambda p, x=x, t=text_global: loss_of(p, x, t, prototypes, scale, alpha, beta, align, 0.01)  # noqa: E731
        stepped = adamw_first_step(loss, [0.0] * (12 + 4 * len(prototypes)), lr, 1e-3)
        text = [unit(add(text_global[c], stepped[4 * c: 4 * c + 4])) for c in range(3)]
        keys = {c: unit(add(prototypes[c], stepped[12 + 4 * i: 16 + 4 * i])) for i, c in enumerate(sorted(prototypes))}
        final = [scale * dot(x, text[c]) + (alpha * math.exp(-(beta - beta * dot(x, keys[c]))) if c in keys else 0.0)
                 for c in range(3)]
        o = method(views(x))
        assert o.entropy_before == pytest.approx(entropy_of(softmax(start)), rel=1e-5)
        assert o.entropy_after == pytest.approx(entropy_of(softmax(final)), rel=1e-4)
        assert o.pred == max(range(3), key=lambda c: final[c])
        assert (entropy_of(softmax(final)) / LOG2_3 < 0.1) == evolves
        if evolves:  # n = 1: T_g <- T_g / 2 + W' / 2, not renormalised
            text_global = [[(a + b) / 2 for a, b in zip(t, w)] for t, w in zip(text_global, text)]
        assert method.text_global.flatten().tolist() == pytest.approx(sum(text_global, []), abs=2e-6)
    assert method.snapshot()["n_evolved"] == 1
    # the third sample starts from the evolved prototypes
    x = towards(20)
    o = method(views(x))
    assert o.entropy_before == pytest.approx(entropy_of(softmax([scale * dot(x, unit(t)) for t in text_global])),
                                             rel=1e-5)


def test_dpe_classes_out_of_the_cache_keep_a_zero_residual():
    method = DPE(basis_text(5.0), TUNING, DPE.Config(query="original", inference_query="original", lr_image=0.05,
                                                     logit_scale="model"))
    captured = []
    original_step = method.step
    method.step = lambda *args: captured.append(original_step(*args)) or captured[-1]
    method(views(towards(44)))  # class 0
    # one entry that is the query itself: x . normalise(x + r) is flat at r = 0, and InfoNCE over one class is 0
    assert captured[-1][1].abs().sum() == 0
    method(views(towards(50)))  # class 1: now both prototypes move (read-out and InfoNCE); class 2 has none
    image_residual = captured[-1][1]
    assert image_residual[0].abs().sum() > 0 and image_residual[1].abs().sum() > 0
    assert image_residual[2].abs().sum() == 0


# ---------------------------------------------------------------------------------- orderings, state, records


def stream_records(method, samples, order):
    ids = [f"s{i}" for i in order]
    source = {f"s{i}": samples[i] for i in range(len(samples))}
    records = run_stream(method, ids, {i: 0 for i in ids}, source.__getitem__)
    return records.drop(columns=["seconds"])


def test_dpe_orderings_change_the_memory_and_the_records_and_repeats_do_not():
    samples = random_view_features(6, n_views=20, dim=8, seed=3)
    config = DPE.Config(lr_text=0.05, lr_image=0.05)
    method = DPE(random_text(), TUNING, config)
    forward = stream_records(method, samples, [0, 1, 2, 3, 4, 5])
    state_forward = method.state_dict()
    backward = stream_records(method, samples, [5, 4, 3, 2, 1, 0])
    assert not torch.equal(state_forward["text_global"], method.state_dict()["text_global"])
    by_sample = lambda frame: frame.set_index("sample_id").sort_index()  # noqa: E731
    assert not by_sample(forward)[["entropy_after", "appended"]].equals(by_sample(backward)[["entropy_after",
                                                                                             "appended"]])
    assert stream_records(method, samples, [0, 1, 2, 3, 4, 5]).equals(forward)
    assert stream_records(DPE(random_text(), TUNING, config), samples, [0, 1, 2, 3, 4, 5]).equals(forward)


def test_dpe_state_dict_resumes_a_stream_bit_for_bit():
    samples = random_view_features(8, n_views=20, dim=8, seed=5)
    config = DPE.Config(lr_text=0.05, lr_image=0.05, shot_capacity=2)
    whole = DPE(random_text(), TUNING, config)
    whole.reset()
    first = [whole(s) for s in samples[:4]]
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = DPE(random_text(), TUNING, config)
    resumed.reset()
    resumed.load_state_dict(state)
    rest = [whole(s) for s in samples[4:]]
    assert [resumed(s) for s in samples[4:]] == rest
    assert any(o.deleted or not o.appended for o in first + rest)  # the cache was full: the state mattered


def test_dpe_records_follow_the_cache():
    samples = random_view_features(12, n_views=20, dim=8, seed=7)
    method = DPE(random_text(), TUNING, DPE.Config(shot_capacity=1, lr_text=0.05, lr_image=0.05))
    outcomes = follow_memory(method, samples, stored=lambda snapshot: snapshot["cache"])
    assert sum(len(o.deleted) for o in outcomes) > 0  # the stream exercised a replacement


def test_dpe_runs_on_the_tiny_clip(text):
    method = DPE(text, TUNING, DPE.Config(), ["a photo of a {}.", "a {}."])
    records = three_sample_stream(method)
    assert len(records) == 3 and records["pred"].between(0, 2).all() and records["buffer_size"].iloc[-1] >= 1
    assert DPE.uses_templates and not DPE.order_independent


def test_dpe_authors_literal_logit_scale_by_hand():
    """utils.py:146's 100 against the model's scale (the stub's 5): entropies, read-out and the evolution gate."""
    x = towards(40)
    evolved = {}
    for option, scale in (("authors", 100.0), ("model", 5.0)):
        method = DPE(basis_text(5.0), TUNING, frozen(alpha=1.0, logit_scale=option))
        o = method(views(x))
        logits = logits_of(x, scale)
        final = [logits[0] + 1.0 * math.exp(-5.0 * (1 - dot(x, x))), logits[1], logits[2]]  # it reads itself
        assert o.entropy_before == pytest.approx(entropy_of(softmax(logits)), rel=1e-4, abs=1e-6)
        assert method.snapshot()["cache"][0][0][1] == pytest.approx(entropy_of(softmax(logits)) / LOG2_3,
                                                                    rel=1e-4, abs=1e-6)
        assert o.entropy_after == pytest.approx(entropy_of(softmax(final)), rel=1e-4, abs=1e-6)
        evolved[option] = method.snapshot()["n_evolved"]
        assert evolved[option] == int(entropy_of(softmax(final)) / LOG2_3 < 0.1)
    assert evolved == {"authors": 1, "model": 0}  # the literal makes the sample confident enough to evolve T_g
    with pytest.raises(ValueError):
        DPE.Config(logit_scale="clip")


def test_dpe_blurry_sample_enters_under_the_first_class_and_config_checks():
    method = DPE(basis_text(), TUNING, frozen())
    o = method(views(BLURRY))  # equal logits: argmax is the first class, H = ln 3 (normalised 0.693)
    assert o.appended == [0] and method.snapshot()["cache"][0][0][1] == pytest.approx(math.log(3) / LOG2_3)
    with pytest.raises(ValueError):
        DPE.Config(query="nearest")
    with pytest.raises(ValueError):
        DPE.Config(steps=0)
