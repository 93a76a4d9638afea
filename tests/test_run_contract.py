"""One run, one set of records: bad numbers stop a run naming the sample, the thread count is part of the run,
the CLI and the sweep agree, the mixed-precision path runs on CPU, a missing GPU is one clear error."""
import shutil

import numpy as np
import pytest
import torch
import yaml

from dynaprompt.cli import main as cli
from dynaprompt.config import load_settings
from dynaprompt.features import ViewEncoder, cache_identity
from dynaprompt.methods import build_method
from dynaprompt.model import ModelSpec, load_clip
from dynaprompt.objectives import TuningConfig
from dynaprompt.provenance import run_fingerprint
from dynaprompt.resolve import resolve_run
from dynaprompt.results import ResultsLayout, RunKey
from dynaprompt.runner import feature_store, open_stream, run_stream

from .conftest import make_params, random_view_features


def write_params(tmp_path, image_root, **changes):
    params = make_params(image_root)
    params["paths"] = {"results": str(tmp_path / "results"), "features": str(tmp_path / "features"),
                       "prepared": str(tmp_path / "prepared")}
    params.update(changes)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def build_cache(params_file, clip):
    """The embed stage's cache of `toy`, as the stage builds it."""
    settings = load_settings(params_file)
    data = open_stream(settings, "toy")
    views = resolve_run(settings, "toy", "dynaprompt").views
    store = feature_store(settings, "toy", views)
    store.build(data, ViewEncoder(clip, views), data.manifest["sample_id"].tolist(),
                cache_identity(clip, settings.model.arch, views))
    return store, data


def test_poisoned_cache_entry_stops_the_run_naming_it(tmp_path, image_root, clip, capsys):
    params = write_params(tmp_path, image_root)
    store, data = build_cache(params, clip)
    features = np.load(store.features_file, mmap_mode="r+")
    victim = data.manifest["sample_id"].tolist()[5]
    features[5, 3, 7] = float("nan")
    features.flush()
    del features
    code = cli(["run", "--params", str(params), "--dataset", "toy", "--method", "dynaprompt", "--ordering",
                "shuffle-0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    position = load_stream_position(params, victim)
    assert f"toy/dynaprompt/shuffle-0: non-finite view features at sample {victim!r} (stream position {position})" \
        in err
    key = RunKey("toy", "dynaprompt", "shuffle-0")
    assert not ResultsLayout(tmp_path / "results").records(key).exists()  # nothing written as finished


def load_stream_position(params, sample_id) -> int:
    from dynaprompt.orderings import order_samples

    settings = load_settings(params)
    return order_samples(open_stream(settings, "toy").manifest, settings.ordering("shuffle-0")).index(sample_id)


def test_poisoned_image_stops_the_run_naming_it(tmp_path, image_root, capsys):
    images = tmp_path / "images"
    shutil.copytree(image_root, images)
    broken = images / "trouser" / "img2.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated: the decoder fails
    params = write_params(tmp_path, images)
    code = cli(["run", "--params", str(params), "--dataset", "toy", "--method", "tpt", "--ordering", "shuffle-0",
                "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dynaprompt: error: toy/tpt/shuffle-0 (computed once per dataset, in manifest order")
    assert "trouser/img2.png" in err and "stream position" in err and "truncated" in err


def test_non_finite_contexts_stop_the_stream(text, monkeypatch):
    import dynaprompt.objectives as objectives

    method = build_method("tpt", text, TuningConfig(lr=0.05))
    monkeypatch.setattr(objectives, "fresh_parameters", lambda c: (c * float("nan")).requires_grad_(True))
    with pytest.raises(objectives.NonFiniteError, match=r"loss at sample 's0' \(stream position 0\)"):
        run_stream(method, ["s0"], {"s0": 0}, lambda s: random_view_features(1, seed=1)[0])


def test_thread_count_is_part_of_the_run(tmp_path, image_root, clip):
    one = load_settings(write_params(tmp_path, image_root, run={"block_size": 4, "threads": 1}))
    two = load_settings(write_params(tmp_path, image_root, run={"block_size": 4, "threads": 2}))
    key = RunKey("toy", "dynaprompt", "shuffle-0")
    assert run_fingerprint(one, key, clip.weights) != run_fingerprint(two, key, clip.weights)
    assert resolve_run(two, "toy", "dynaprompt").threads == 2


def test_cli_runs_through_the_results_layout_and_reuses(tmp_path, image_root, capsys):
    params = write_params(tmp_path, image_root, run={"block_size": 4, "threads": 2})
    args = ["run", "--params", str(params), "--dataset", "toy", "--method", "online_tpt", "--ordering", "shuffle-1",
            "--no-progress"]
    assert cli(args) == 0
    layout = ResultsLayout(tmp_path / "results")
    summary = layout.read_summary(RunKey("toy", "online_tpt", "shuffle-1"))
    assert summary.fingerprint and summary.settings["run.threads"] == 2
    assert cli(args) == 0
    assert "reused, same fingerprint" in capsys.readouterr().out


@pytest.mark.parametrize("kind, config", [("tpt", None), ("dynaprompt", None)])
def test_mixed_precision_path_runs_on_cpu(text, kind, config):
    """bfloat16 autocast with gradient scaling on CPU: the path a GPU takes, exercised before a user's GPU does."""
    amp = TuningConfig(lr=0.05, amp=True, amp_on_cpu=True)
    full = TuningConfig(lr=0.05, amp=False)
    views = random_view_features(6, n_views=16, seed=2)
    ids = [f"s{i}" for i in range(6)]
    labels = {s: i % 3 for i, s in enumerate(ids)}
    mixed = build_method(kind, text, amp, config)
    assert mixed.scaler.is_enabled()
    records = run_stream(mixed, ids, labels, dict(zip(ids, views)).__getitem__)
    reference = run_stream(build_method(kind, text, full, config), ids, labels, dict(zip(ids, views)).__getitem__)
    assert np.isfinite(records["entropy_after"]).all()
    assert (records["pred"] == reference["pred"]).mean() >= 0.5  # bfloat16 may flip a near tie, not most answers
    assert not records["entropy_after"].equals(reference["entropy_after"])  # it did run in reduced precision


def test_cuda_without_a_gpu_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="model.device is 'cuda' but torch sees 0 CUDA device"):
        load_clip(ModelSpec(arch="tiny-clip", pretrained=None, device="cuda"))


def test_cli_names_the_missing_gpu(tmp_path, image_root, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    params = write_params(tmp_path, image_root, model={"arch": "tiny-clip", "pretrained": None, "device": "cuda"})
    code = cli(["run", "--params", str(params), "--dataset", "toy", "--method", "tpt", "--ordering", "shuffle-0"])
    assert code == 2 and "torch sees 0 CUDA device" in capsys.readouterr().err


