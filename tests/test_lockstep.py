"""Lockstep over several orderings gives the records of running each ordering one by one."""
import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.lockstep import run_lockstep, tune_contexts_lockstep
from dynaprompt.methods import build_method
from dynaprompt.methods.dynaprompt import Config as DynaPromptConfig
from dynaprompt.objectives import TuningConfig, TuningRequest, make_grad_scaler, tune_contexts
from dynaprompt.runner import run_stream

from .conftest import random_view_features

TUNING = TuningConfig(lr=0.05)
N_SAMPLES = 8
SPECS = {  # name -> (kind, config)
    "tpt": ("tpt", None),
    "online_tpt": ("online_tpt", None),
    "dynaprompt": ("dynaprompt", DynaPromptConfig(buffer_size=3)),
    "dynaprompt_official": ("dynaprompt", DynaPromptConfig(buffer_size=3, selection="official")),
}


@pytest.fixture(scope="module")
def stream():
    """8 samples of fake view features, their labels, and 3 orderings of them."""
    features = random_view_features(N_SAMPLES, n_views=16, seed=3)
    ids = [f"s{i}" for i in range(N_SAMPLES)]
    source = dict(zip(ids, features)).__getitem__
    labels = {sample_id: i % 3 for i, sample_id in enumerate(ids)}
    orderings = [[ids[i] for i in np.random.default_rng(seed).permutation(N_SAMPLES)] for seed in range(3)]
    return orderings, labels, source


def one_by_one(spec, text, orderings, labels, source):
    """`run_stream` over each ordering, a fresh method each."""
    kind, config = spec
    return [run_stream(build_method(kind, text, TUNING, config), order, labels, source) for order in orderings]


@pytest.mark.parametrize("name", list(SPECS))
def test_lockstep_gives_the_records_of_one_by_one(text, stream, name):
    orderings, labels, source = stream
    expected = one_by_one(SPECS[name], text, orderings, labels, source)
    kind, config = SPECS[name]
    got = run_lockstep(kind, text, TUNING, config, orderings, labels, source)
    assert len(got) == len(orderings)
    for want, have in zip(expected, got):
        assert list(have.columns) == list(want.columns)
        exact = ["position", "sample_id", "label", "pred", "correct", "selected", "n_selected", "appended",
                 "deleted", "buffer_size"]
        pd.testing.assert_frame_equal(have[exact], want[exact])
        for column in ["entropy_before", "entropy_after"]:
            np.testing.assert_allclose(have[column], want[column], rtol=0, atol=1e-5)
    if name.startswith("dynaprompt"):  # the streams really were in different states
        assert len({tuple(map(tuple, r["selected"])) for r in expected}) > 1


def test_lockstep_streams_of_different_lengths(text, stream):
    orderings, labels, source = stream
    short = [orderings[0], orderings[1][:3]]
    got = run_lockstep("online_tpt", text, TUNING, None, short, labels, source)
    expected = one_by_one(SPECS["online_tpt"], text, short, labels, source)
    assert [len(r) for r in got] == [N_SAMPLES, 3]
    for want, have in zip(expected, got):
        assert have["pred"].tolist() == want["pred"].tolist()


@pytest.mark.parametrize("kind", ["zero_shot", "tda"])
def test_methods_without_tuning_fall_back_to_one_by_one(text, stream, kind):
    orderings, labels, source = stream
    got = run_lockstep(kind, text, TUNING, None, orderings, labels, source)
    expected = one_by_one((kind, None), text, orderings, labels, source)
    for want, have in zip(expected, got):
        pd.testing.assert_frame_equal(have.drop(columns="seconds"), want.drop(columns="seconds"))


def test_batched_step_equals_separate_steps_with_weight_decay(text):
    """Summed losses and per-stream AdamW (decay 0.5, two steps) step each request as tune_contexts alone does."""
    config = TuningConfig(lr=0.05, weight_decay=0.5, steps=2)
    views = random_view_features(2, n_views=16, seed=7)
    base = text.init_context
    requests = [
        TuningRequest(base.unsqueeze(0) * 1.1, views[0]),
        TuningRequest(torch.stack([base, base * 0.9]), views[1], mentions=[0, 1, 1]),
    ]
    scalers = [make_grad_scaler(base.device, config) for _ in requests]
    together = tune_contexts_lockstep(text, requests, config, scalers)
    for request, tuned in zip(requests, together):
        alone = tune_contexts(text, request.contexts, request.view_features, config,
                              make_grad_scaler(base.device, config), request.mentions)
        torch.testing.assert_close(tuned, alone, rtol=0, atol=1e-5)  # batched passes round differently
        assert not torch.equal(tuned, request.contexts)


def test_one_adamw_over_a_concatenation_equals_one_per_part():
    """The claim in lockstep's docstring: AdamW is elementwise, weight decay included."""
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 4, 8, generator=generator), torch.randn(3, 4, 8, generator=generator)]
    grads = [torch.randn(p.shape, generator=generator) for p in parts]
    options = dict(lr=0.05, weight_decay=0.3, betas=(0.9, 0.999), eps=1e-8)
    joint = torch.cat(parts).requires_grad_(True)
    joint.grad = torch.cat(grads)
    torch.optim.AdamW([joint], **options).step()
    for part, grad, stepped in zip(parts, grads, joint.detach().split([2, 3])):
        alone = part.clone().requires_grad_(True)
        alone.grad = grad
        torch.optim.AdamW([alone], **options).step()
        torch.testing.assert_close(stepped, alone.detach(), rtol=0, atol=0)
