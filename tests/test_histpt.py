"""HisTPT on hand-made streams, with the answers worked out by hand (plain `math`, not the method's helpers).

Two stand-in text encoders over 3 classes in R^4 (logit scale 5): `ScriptedText` returns chosen features at each
step (with a zero gradient, so the prompt stays put and the banks' contents are known), and `ShiftText` returns
normalise(e_c + mean of the context's rows), so that the step can be checked against a numerical gradient.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from dynaprompt.methods import build_method
from dynaprompt.methods.histpt import HisTPT, fused_pseudo_label
from dynaprompt.objectives import TuningConfig

from .conftest import random_view_features, three_sample_stream
from .test_peers import dot, entropy_of, run_order, softmax, towards, views

SCALE = 5.0


class ScriptedText:
    """Features script[n] at the n-th encode with grad (the step's forward), plus a zero-gradient path to the prompt;
    the prediction pass (no grad) sees the last ones."""

    def __init__(self, script):
        self.script = [torch.tensor(features, dtype=torch.float32) for features in script]
        self.init_context = torch.zeros(2, 4)
        self.calls = 0

    def encode(self, contexts):
        if torch.is_grad_enabled():
            self.calls += 1
        return self.script[self.calls - 1].unsqueeze(0) + 0 * contexts.sum()

    def logit_scale(self):
        return torch.tensor(SCALE)


class ShiftText:
    """normalise(e_c + mean_t ctx[t]) for the classes c = 0, 1, 2: one context moves every class's feature."""

    init_context = torch.zeros(2, 4)

    def encode(self, contexts):
        return F.normalize(torch.eye(4)[:3].unsqueeze(0) + contexts.mean(1, keepdim=True), dim=-1)

    def logit_scale(self):
        return torch.tensor(SCALE)


def unit(v):
    norm = math.sqrt(dot(v, v))
    return [x / norm for x in v]


def flat(nested) -> list[float]:
    return torch.tensor(nested, dtype=torch.float64).flatten().tolist()


def mean(vectors):
    return [sum(column) / len(vectors) for column in zip(*vectors)]


def hardness(feature, classes) -> float:
    """-sum_c l_c exp(l_c) of the raw logits l = 5 x . t_c (seem_model_v1.py:482-486, one view)."""
    return -sum(SCALE * dot(feature, t) * math.exp(SCALE * dot(feature, t)) for t in classes)


def script_step(n: int):
    """Class features at step n: e_c tilted towards e3 by a step-dependent amount."""
    return [unit([1.0 if k == c else 0.0 for k in range(3)] + [0.1 * n * (c + 1)]) for c in range(3)]


def test_histpt_banks_follow_the_authors_rules():
    size, topk, momentum = 4, 2, 0.9
    script = [script_step(n) for n in range(6)]
    method = HisTPT(ScriptedText(script), TuningConfig(), HisTPT.Config(bank_size=size, hard_topk=topk,
                                                                        momentum=momentum, loss_views="original"))
    samples = [towards(d) for d in (10, 80, 30, 60, 20, 70)]
    # the banks, written out: lists of [3][4] features, newest first
    local, hard, scores, global_ = None, None, None, None
    local_ids, hard_ids = None, None
    for n, (x, t) in enumerate(zip(samples, script)):
        score = hardness(x, t)
        o = method(views(x))
        if n == 0:  # every slot is a copy of the first features
            local, hard, scores, global_ = [t] * size, [t] * size, [score] * size, t
            local_ids, hard_ids = list(range(size)), list(range(size, 2 * size))
            assert (o.appended, o.deleted) == (list(range(2 * size)), [])
        else:
            dropped = [local_ids[-1], hard_ids[-1]]
            local, scores = [t] + local[:-1], [score] + scores[:-1]
            hardest = sorted(range(size), key=lambda i: -scores[i])[:topk]
            hard = [[mean([local[i][c] for i in hardest]) for c in range(3)]] + hard[:-1]
            new = 2 * size + 2 * (n - 1)
            local_ids, hard_ids = [new] + local_ids[:-1], [new + 1] + hard_ids[:-1]
            oldest = [[(a + b) / 2 for a, b in zip(local[-1][c], hard[-1][c])] for c in range(3)]
            global_ = [[g * momentum + u * (1 - momentum) for g, u in zip(global_[c], oldest[c])] for c in range(3)]
            assert (o.appended, o.deleted) == ([new, new + 1], dropped)
        assert o.buffer_size == 2 * size
        assert method.snapshot() == {"local": local_ids, "hard": hard_ids,
                                     "hardness": pytest.approx(scores, rel=1e-5)}
        assert method.local.flatten().tolist() == pytest.approx(flat(local), abs=1e-6)
        assert method.hard.flatten().tolist() == pytest.approx(flat(hard), abs=1e-6)
        assert method.global_prototype.flatten().tolist() == pytest.approx(flat(global_), abs=1e-6)
        # the prompt never moved: the prediction is the step's features on view 0
        assert o.entropy_before == pytest.approx(entropy_of(softmax([SCALE * dot(x, tc) for tc in t])), rel=1e-5)
        assert o.entropy_after == pytest.approx(o.entropy_before)
    # five pushes later every copy of the first features has left the local bank, oldest first
    assert script[0] not in local and method.snapshot()["local"] == [16, 14, 12, 10]


def test_histpt_pseudo_label_fuses_the_weighted_logits():
    """Global bank sharply for class 0, local and hard mildly for class 1: the entropy weights favour the global
    bank, and the weighted *logits* pick class 0 where weighted probabilities (TTABC's fusion) would pick class 1."""
    rows = {"global": [12.0, 0.0, 0.0], "local": [0.0, 3.0, 0.0], "hard": [0.0, 3.0, 0.0]}
    banks = torch.tensor([[[v / SCALE, 0, 0, 0] for v in rows[name]] for name in ("global", "local", "hard")])
    weights = softmax([-entropy_of(softmax(r)) for r in rows.values()])
    by_logits = [sum(w * r[c] for w, r in zip(weights, rows.values())) for c in range(3)]
    by_probs = [sum(w * softmax(r)[c] for w, r in zip(weights, rows.values())) for c in range(3)]
    assert max(range(3), key=by_logits.__getitem__) == 0 and max(range(3), key=by_probs.__getitem__) == 1
    assert int(fused_pseudo_label(torch.tensor([1.0, 0, 0, 0]), banks, torch.tensor(SCALE))) == 0


def loss_at(context_mean, x, label) -> float:
    """Cross-entropy of 5 x . normalise(e_c + m) against `label`, m the mean of the context's rows."""
    logits = [SCALE * dot(x, unit([(1.0 if k == c else 0.0) + context_mean[k] for k in range(4)])) for c in range(3)]
    return -math.log(softmax(logits)[label])


def nudged(context, row, k, delta):
    """`context` with entry (row, k) moved by `delta`."""
    return [[v + (delta if (r, j) == (row, k) else 0.0) for j, v in enumerate(values)]
            for r, values in enumerate(context)]


def gradient(x, label, context, step=1e-5):
    """d loss / d context [2][4] by central differences (each row moves the mean by half its change)."""
    return [[(loss_at(mean(nudged(context, row, k, step)), x, label)
              - loss_at(mean(nudged(context, row, k, -step)), x, label)) / (2 * step) for k in range(4)]
            for row in range(2)]


def adamw(context, grads, state, lr, wd=0.01, betas=(0.9, 0.999), eps=1e-8):
    """torch's AdamW, written out: decay, moments, bias correction; `state` (m, v, t) is updated in place."""
    m, v, t = state["m"], state["v"], state["t"] + 1
    out = []
    for r in range(2):
        out.append([])
        for k in range(4):
            g = grads[r][k]
            m[r][k] = betas[0] * m[r][k] + (1 - betas[0]) * g
            v[r][k] = betas[1] * v[r][k] + (1 - betas[1]) * g * g
            step = lr * (m[r][k] / (1 - betas[0] ** t)) / (math.sqrt(v[r][k] / (1 - betas[1] ** t)) + eps)
            out[-1].append(context[r][k] * (1 - lr * wd) - step)
    state["t"] = t
    return out


@pytest.mark.parametrize("persistent", [True, False])
def test_histpt_steps_on_the_pseudo_label_with_the_optimizer_state_carried(persistent):
    lr = 0.05
    method = HisTPT(ShiftText(), TuningConfig(lr=lr), HisTPT.Config(loss_views="original",
                                                                    persistent_optimizer=persistent))
    context = [[0.0] * 4, [0.0] * 4]
    state = {"m": [[0.0] * 4 for _ in range(2)], "v": [[0.0] * 4 for _ in range(2)], "t": 0}
    for x in (towards(30), towards(5)):  # both clearly class 0 under every bank: the pseudo-label is 0
        features = [unit([(1.0 if k == c else 0.0) + mean(context)[k] for k in range(4)]) for c in range(3)]
        assert max(range(3), key=lambda c: dot(x, features[c])) == 0
        if not persistent:
            state = {"m": [[0.0] * 4 for _ in range(2)], "v": [[0.0] * 4 for _ in range(2)], "t": 0}
        context = adamw(context, gradient(x, 0, context), state, lr)
        o = method(views(x))
        assert method.context.flatten().tolist() == pytest.approx(flat(context), abs=2e-5)
        stepped = [unit([(1.0 if k == c else 0.0) + mean(context)[k] for k in range(4)]) for c in range(3)]
        assert o.entropy_before == pytest.approx(entropy_of(softmax([SCALE * dot(x, f) for f in features])), rel=1e-5)
        assert o.entropy_after == pytest.approx(entropy_of(softmax([SCALE * dot(x, f) for f in stepped])), rel=1e-3)
    assert int(method.optimizer.state_dict()["state"][0]["step"]) == (2 if persistent else 1)


def test_histpt_confident_views_carry_the_loss_and_original_does_not():
    """With `confident`, the sharpest of 20 views are in the loss (and the hardness); view 0 alone with `original`."""
    sample = views(*[towards(d) for d in [40, 30, 10, 44, 5, 35] + [38] * 14])  # the sharpest two: 5 and 10 degrees
    t = script_step(0)
    for loss_views, kept in (("confident", [towards(5), towards(10)]), ("original", [towards(40)])):
        method = HisTPT(ScriptedText([t]), TuningConfig(), HisTPT.Config(loss_views=loss_views))
        method(sample)
        expected = sum(hardness(x, t) for x in kept) / len(kept)
        assert method.snapshot()["hardness"][0] == pytest.approx(expected, rel=1e-5)


def test_histpt_config_checks():
    for bad in ({"loss_views": "all"}, {"hardness": "max"}, {"hard_topk": 0}, {"hard_topk": 33}):
        with pytest.raises(ValueError):
            HisTPT.Config(**bad)
    assert not HisTPT.uses_templates and not HisTPT.order_independent


# ---------------------------------------------------------------------------------- orderings, state, records


def test_histpt_orderings_change_the_memory_and_repeats_do_not(text):
    samples = random_view_features(6, n_views=10, dim=128, seed=3)
    tuning = TuningConfig(lr=0.05)
    method = build_method("histpt", text, tuning)
    forward, snaps_forward = run_order(method, samples, [0, 1, 2, 3, 4, 5])
    backward, snaps_backward = run_order(method, samples, [5, 4, 3, 2, 1, 0])
    assert snaps_forward[2] != snaps_backward[2]  # the hardness of {0,1,2} vs {5,4,3}
    assert any(forward[i].entropy_after != backward[i].entropy_after for i in range(6))
    again, snaps_again = run_order(method, samples, [0, 1, 2, 3, 4, 5])
    assert again == forward and snaps_again == snaps_forward
    fresh, snaps_fresh = run_order(build_method("histpt", text, tuning), samples, [0, 1, 2, 3, 4, 5])
    assert fresh == forward and snaps_fresh == snaps_forward


@pytest.mark.parametrize("amp", [False, True])
def test_histpt_state_dict_resumes_a_stream_bit_for_bit(text, amp):
    """Also under mixed precision (bfloat16 autocast on the CPU, with the gradient scaler GPUs use)."""
    samples = random_view_features(8, n_views=16, dim=128, seed=5)
    tuning = TuningConfig(lr=0.05, amp_on_cpu=amp)
    whole = HisTPT(text, tuning, HisTPT.Config(bank_size=4, hard_topk=2))
    [whole(s) for s in samples[:4]]
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = HisTPT(text, tuning, HisTPT.Config(bank_size=4, hard_topk=2))
    resumed.load_state_dict(state)
    rest = [whole(s) for s in samples[4:]]
    assert [resumed(s) for s in samples[4:]] == rest
    assert torch.equal(resumed.context, whole.context) and torch.equal(resumed.global_prototype, whole.global_prototype)
    # the carried optimizer state is part of it: without it the same stream continues differently
    forgetful = HisTPT(text, tuning, HisTPT.Config(bank_size=4, hard_topk=2))
    forgetful.load_state_dict({**state, "optimizer": forgetful.optimizer.state_dict()})
    [forgetful(s) for s in samples[4:]]
    assert not torch.equal(forgetful.context, whole.context)


def test_histpt_runs_on_the_tiny_clip(text):
    method = HisTPT(text, TuningConfig(lr=0.05), HisTPT.Config())
    records = three_sample_stream(method)
    assert records["buffer_size"].tolist() == [64, 64, 64] and records["pred"].between(0, 2).all()
    assert records["appended"].tolist() == [list(range(64)), [64, 65], [66, 67]]
    assert records["deleted"].tolist() == [[], [31, 63], [30, 62]]
