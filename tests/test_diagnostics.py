"""The findings' diagnostics on tiny inputs, with the answers worked out by hand (plain `math`, or the loss written
out again with plain torch ops and autograd)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from dynaprompt.diagnostics import ctpt_first_step, ctpt_gradients, ecalp_text_edges, prediction_agreement
from dynaprompt.methods.ecalp import ECALP
from dynaprompt.objectives import TuningConfig

from .conftest import random_view_features
from .test_ctpt import INIT, ContextText, hand_loss, sharpest, views_of
from .test_peers import StubText

# ----------------------------------------------------------------------------------------------------- ECALP

# dot products with the classes e0, e1, e2 (view 0 of each sample): 0.5, 0.2, -0.8 | 0.6, 0.3, -0.4 | 0.1, 0.7, 0.2
NODES = [[0.5, 0.2, -0.8, 0.0], [0.6, 0.3, -0.4, 0.0], [0.1, 0.7, 0.2, 0.0]]
OTHER_VIEW = [0.0, 0.0, 0.6, 0.8]


def heaviest_class(dots, gamma=10.0):
    """The class of the largest dot ** gamma among the top-3 (all 3 classes here)."""
    return max(range(len(dots)), key=lambda c: dots[c] ** gamma)


def test_ecalp_negative_text_edges_and_heaviest_edges_by_hand():
    views = torch.tensor([[node, OTHER_VIEW] for node in NODES])  # [3 samples, 2 views, 4]
    got = ecalp_text_edges(views, torch.eye(4)[:3])
    dots = [node[:3] for node in NODES]
    # the negative edges: -0.8 and -0.4; the heaviest: 0.8^10 = 0.107 > 0.5^10 (sample 0, class 2 not its top-1
    # class 0), 0.6^10 = 6.0e-3 > 0.4^10 = 1.0e-4 (sample 1: class 0), 0.7^10 (sample 2: class 1)
    assert [heaviest_class(d) for d in dots] == [2, 0, 1]
    assert [max(range(3), key=d.__getitem__) for d in dots] == [0, 0, 1]
    assert got == {"n_nodes": 3, "text_edges": 9, "negative_text_edges": 2, "negative_text_edge_share": 2 / 9,
                   "heaviest_not_top1": 1, "heaviest_not_top1_share": 1 / 3}
    # the "mean" node (x + other view) / 2: dots 0.25 0.1 -0.1 | 0.3 0.15 0.1 | 0.05 0.35 0.4
    mean = ecalp_text_edges(views, torch.eye(4)[:3], ECALP.Config(view="mean"))
    halved = [[d[0] / 2, d[1] / 2, (d[2] + 0.6) / 2] for d in dots]
    assert sum(v < 0 for d in halved for v in d) == mean["negative_text_edges"] == 1
    assert sum(heaviest_class(d) != max(range(3), key=d.__getitem__) for d in halved) == 0
    assert mean["heaviest_not_top1"] == 0
    # k_text 2 keeps the two largest dots: sample 0 loses its negative edge, sample 1 too
    assert ecalp_text_edges(views, torch.eye(4)[:3], ECALP.Config(k_text=2))["negative_text_edges"] == 0
    # a single view per sample ([N, E]) is the same as view 0
    assert ecalp_text_edges(torch.tensor(NODES), torch.eye(4)[:3]) == got


def test_ecalp_diagnostic_reads_the_graph_the_method_builds():
    """On a random stream: the diagnostic's edges are the ones ECALP stores, node by node."""
    samples = random_view_features(12, n_views=4, dim=8, seed=2)
    text = StubText(torch.randn(3, 8, generator=torch.Generator().manual_seed(5)), 10.0)
    method = ECALP(text, TuningConfig(), ECALP.Config(k_text=2))
    for sample in samples:
        method(sample)
    sims, classes = method.text_sim[:12], method.text_knn[:12]
    heaviest = classes.gather(1, (sims ** 10.0).argmax(-1, keepdim=True))[:, 0]
    got = ecalp_text_edges(torch.stack(samples), method.text_features, method.config)
    assert got["negative_text_edges"] == int((sims < 0).sum()) > 0
    assert got["heaviest_not_top1"] == int((heaviest != classes[:, 0]).sum()) > 0


# ----------------------------------------------------------------------------------------------------- C-TPT


def test_ctpt_first_step_ratio_and_the_steps_direction_by_hand():
    views, lam, lr = views_of(3), 0.5, 0.1
    tuning = TuningConfig(lr=lr, confident_ratio=0.34)  # floor(0.34 * 6) = 2 views
    keep = sharpest(views, INIT, 2)
    context = INIT.clone().requires_grad_(True)
    (entropy_grad,) = torch.autograd.grad(hand_loss(context, views, keep, 0.0), context)
    (total,) = torch.autograd.grad(hand_loss(context, views, keep, lam), context)
    dispersion_grad = total - entropy_grad  # -lam grad ATFD
    # AdamW's first step: decay, then lr * g / (|g| + eps)
    step = -lr * 0.01 * INIT - lr * total / (total.abs() + 1e-8)
    follows = sum(s * d < 0 for s, d in zip(step.flatten().tolist(), dispersion_grad.flatten().tolist())) / 12
    ratio, share = ctpt_first_step(ContextText(), views, tuning, lam)
    assert ratio == pytest.approx(math.sqrt((dispersion_grad ** 2).sum() / (entropy_grad ** 2).sum()), rel=1e-4)
    assert share == pytest.approx(follows)
    assert 0 < share < 1  # lambda 0.5 here: the two terms share the step


def test_ctpt_gradients_over_a_stream():
    tuning = TuningConfig(lr=0.1, confident_ratio=0.34)
    samples = [views_of(seed) for seed in (3, 4, 5)]
    per_sample = [ctpt_first_step(ContextText(), views, tuning, 20.0) for views in samples]
    got = ctpt_gradients(ContextText(), samples, tuning, 20.0)
    assert got == {"n_samples": 3, "gradient_ratio_median": sorted(r for r, _ in per_sample)[1],
                   "follows_dispersion_share": pytest.approx(sum(s for _, s in per_sample) / 3)}
    # lambda 20 outweighs the entropy: a larger gradient, and more of the step follows it than at lambda 0.5
    assert got["gradient_ratio_median"] > 1
    assert got["follows_dispersion_share"] > ctpt_gradients(ContextText(), samples, tuning, 0.5)[
        "follows_dispersion_share"]
    zero = ctpt_gradients(ContextText(), samples, tuning, 0.0)
    assert zero["gradient_ratio_median"] == 0.0 and zero["follows_dispersion_share"] == 0.0  # no dispersion term


def test_ctpt_first_step_runs_on_the_tiny_clip(text):
    views = random_view_features(1, n_views=16, dim=128, seed=0)[0]
    ratio, share = ctpt_first_step(text, views, TuningConfig(lr=0.01), 20.0)
    assert math.isfinite(ratio) and ratio > 0 and 0 <= share <= 1


# ------------------------------------------------------------------------------------------------ agreement


def records(preds: dict) -> pd.DataFrame:
    return pd.DataFrame({"sample_id": list(preds), "pred": list(preds.values())})


def test_prediction_agreement_matches_samples_by_id():
    ctpt = records({"a": 0, "b": 1, "c": 2})
    zero_shot = records({"c": 2, "a": 1, "b": 1})  # another order: a differs, b and c agree
    assert prediction_agreement(ctpt, zero_shot) == pytest.approx(2 / 3)
    assert prediction_agreement(ctpt, ctpt) == 1.0


def test_prediction_agreement_names_what_does_not_match():
    with pytest.raises(ValueError, match="'b' has no row in reference"):
        prediction_agreement(records({"a": 0, "b": 1}), records({"a": 0, "d": 1}))
    with pytest.raises(ValueError, match="'d' has no row in records"):
        prediction_agreement(records({"a": 0}), records({"a": 0, "d": 1}))
    with pytest.raises(ValueError, match="appears twice"):
        prediction_agreement(pd.DataFrame({"sample_id": ["a", "a"], "pred": [0, 1]}), records({"a": 0}))
    with pytest.raises(ValueError, match="no records"):
        prediction_agreement(records({}), records({}))
