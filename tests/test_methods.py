"""Method behaviour on real streams: order independence, online drift, determinism, cache vs images."""
import pandas as pd
import pytest
import torch

from dynaprompt.config import settings_from_params
from dynaprompt.datasets import build_dataset
from dynaprompt.features import CachedViewSource, ImageViewSource, ViewEncoder
from dynaprompt.methods import build_method
from dynaprompt.methods.zero import zero_vote
from dynaprompt.orderings import order_samples
from dynaprompt.resolve import resolve, resolve_run
from dynaprompt.results import RunKey
from dynaprompt.runner import build_text_encoder, execute, run_stream
from dynaprompt.schema import ParamsError

from .conftest import make_params

ALL_METHODS = ["zero_shot", "zero_shot_ensemble", "tpt", "online_tpt", "dynaprompt", "dynaprompt_official", "zero"]


@pytest.fixture(scope="module")
def toy(image_root, clip):
    """Settings, dataset, text encoder and a view-feature cache built once for the module."""
    settings = settings_from_params(make_params(image_root))
    spec = settings.datasets["toy"]
    data = build_dataset("toy", spec.kind, spec.options)
    images = ImageViewSource(data, ViewEncoder(clip, settings.views))
    cache = CachedViewSource.build(images, data.manifest["sample_id"].tolist())
    text = build_text_encoder(clip, data.classnames, settings)
    labels = dict(zip(data.manifest["sample_id"], data.manifest["label"]))
    return settings, data, images, cache, text, labels


def run(toy, method_name, ordering="natural", source=None):
    settings, data, images, cache, text, labels = toy
    run_settings = resolve_run(settings, "toy", method_name)
    method = build_method(settings.method(method_name).kind, text, run_settings.tuning, run_settings.options,
                          run_settings.templates)
    stream = order_samples(data.manifest, settings.ordering(ordering))
    return run_stream(method, stream, labels, source or cache)


def by_sample(records):
    return records.set_index("sample_id").sort_index()


@pytest.mark.parametrize("name", ["tpt", "zero_shot", "zero"])
def test_order_independent_methods_give_the_same_prediction_per_sample(toy, name):
    a = by_sample(run(toy, name, "shuffle-0"))
    b = by_sample(run(toy, name, "shuffle-1"))
    assert not (run(toy, name, "shuffle-0")["sample_id"] == run(toy, name, "shuffle-1")["sample_id"]).all()
    pd.testing.assert_series_equal(a["pred"], b["pred"])
    pd.testing.assert_series_equal(a["entropy_after"], b["entropy_after"])


def test_online_tpt_differs_from_tpt_after_the_first_sample(toy):
    tpt, online = run(toy, "tpt"), run(toy, "online_tpt")
    assert tpt.loc[0, "entropy_after"] == online.loc[0, "entropy_after"]
    assert tpt.loc[0, "pred"] == online.loc[0, "pred"]
    # from sample 1 on, Online TPT starts from the previous sample's prompt, not from v0
    assert (tpt["entropy_before"].iloc[1:] != online["entropy_before"].iloc[1:]).all()


def test_online_tpt_depends_on_the_order(toy):
    a = by_sample(run(toy, "online_tpt", "shuffle-0"))
    b = by_sample(run(toy, "online_tpt", "shuffle-1"))
    assert not a["entropy_after"].equals(b["entropy_after"])


@pytest.mark.parametrize("name", ALL_METHODS)
def test_same_params_give_identical_records(toy, name):
    a = run(toy, name, "shuffle-0").drop(columns="seconds")
    b = run(toy, name, "shuffle-0").drop(columns="seconds")
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_cached_features_and_images_give_identical_predictions(toy, name):
    settings, data, images, cache, text, labels = toy
    from_cache = run(toy, name, "shuffle-0", source=cache)
    from_images = run(toy, name, "shuffle-0", source=images)
    pd.testing.assert_series_equal(from_cache["pred"], from_images["pred"])
    pd.testing.assert_series_equal(from_cache["entropy_after"], from_images["entropy_after"])


def test_records_have_the_public_columns_and_one_row_per_sample(toy):
    records = run(toy, "dynaprompt", "class_blocked-0")
    settings, data, *_ = toy
    assert list(records.columns)[:5] == ["position", "sample_id", "label", "pred", "correct"]
    for column in ["n_selected", "appended", "deleted", "buffer_size", "seconds", "entropy_before"]:
        assert column in records.columns
    assert len(records) == len(data.manifest)
    assert records["position"].tolist() == list(range(len(records)))
    assert (records["n_selected"] >= 1).all()


def test_execute_summarises_blocks_settings_and_final_buffer(settings, clip):
    result = execute(resolve(settings, RunKey("toy", "dynaprompt", "shuffle-0"), clip.weights), clip)
    summary = result.summary
    assert summary.n == 12
    assert len(summary.block_accuracy) == 3  # block_size 4
    assert summary.accuracy == pytest.approx(result.records["correct"].mean())
    assert 1 <= len(summary.final_state["final_buffer"]) <= 3
    assert summary.settings["tuning.lr"] == 0.05 and summary.settings["method.buffer_size"] == 3
    assert summary.settings["method.probdiff"] is None and summary.settings["run.threads"] == 1
    assert summary.ended_at >= summary.started_at > 0
    limited = execute(resolve(settings, RunKey("toy", "tpt", "shuffle-0"), clip.weights), clip, limit=5)
    assert len(limited.records) == 5


def test_tuning_step_lowers_the_marginal_entropy(toy):
    records = run(toy, "tpt")
    assert (records["entropy_after"] < records["entropy_before"]).mean() > 0.5


def test_zero_vote_majority_and_tie_break():
    # 10 views, 3 classes; ratio 0.3 keeps the 3 lowest-entropy views (the sharpest logits)
    sharp = lambda c: torch.nn.functional.one_hot(torch.tensor(c), 3).float() * 20  # noqa: E731
    soft = lambda c: torch.nn.functional.one_hot(torch.tensor(c), 3).float() * (1 + 0.1 * c)  # noqa: E731
    logits = torch.stack([sharp(1), sharp(1), sharp(2)] + [soft(0)] * 7)
    assert zero_vote(logits, 0.3) == 1
    # a 1-1 tie between classes 1 and 2 among the 2 confident views; the next most confident view says 2
    tie = torch.stack([sharp(1), sharp(2), soft(2) * 5, soft(0) * 4] + [soft(0)] * 6)
    assert zero_vote(tie, 0.2) == 2


def test_unknown_method_parameter_is_named(image_root):
    params = make_params(image_root)
    params["methods"]["dynaprompt"] = {"kind": "dynaprompt", "buffer_sise": 3}
    with pytest.raises(ParamsError, match="methods.dynaprompt.buffer_sise: unknown key 'buffer_sise'.*buffer_size"):
        settings_from_params(params)
    params["methods"]["dynaprompt"] = {"kind": "dynaprompt", "selection": "official", "criteria": "entropy_only"}
    with pytest.raises(ParamsError, match="official"):
        settings_from_params(params)
