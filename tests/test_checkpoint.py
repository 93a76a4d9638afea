"""Runs that survive a lost worker: every `run.checkpoint_every` samples a run saves its records and its method's
state; a run killed in between (here: an exception, and `kill -9` from the CLI and from the sweep) resumes at its
last checkpoint and finishes with the records an uninterrupted run gives."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from dynaprompt.checkpoint import RunCheckpoint
from dynaprompt.methods import METHODS, build_method
from dynaprompt.methods.dynaprompt import Config as DynaPromptConfig
from dynaprompt.objectives import TuningConfig
from dynaprompt.results import ResultsLayout, RunKey
from dynaprompt.runner import run_stream

from .conftest import ROOT, random_view_features

TUNING = TuningConfig(lr=0.05)
KINDS = {"tpt": None, "online_tpt": None, "dynaprompt": DynaPromptConfig(buffer_size=3),
         "dynaprompt_official": DynaPromptConfig(buffer_size=3, selection="official"),
         "tda": None, "dmn": None, "onzeta": None, "boostadapter": None, "zero_shot": None, "zero": None,
         **{kind: None for kind in ("ctpt", "rtpt", "mta", "tps", "histpt", "dmn_w", "dpe", "ecalp", "tca", "oga",
                                    "bca", "dota")}}  # TTL, RLCF (images, a teacher): tests/test_ttl.py, test_rlcf.py


class Killed(Exception):
    """Stands for the worker dying mid-stream."""


def compare(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Same records, bit for bit, but for the wall time of each sample."""
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"), check_exact=True)


@pytest.mark.parametrize("name", list(KINDS))
def test_a_run_killed_between_checkpoints_resumes_with_identical_records(name, text, tmp_path):
    kind = "dynaprompt" if name.startswith("dynaprompt") else name
    samples = dict(zip([f"s{i}" for i in range(13)], random_view_features(13, n_views=16, dim=128, seed=4)))
    ids, labels = list(samples), {s: i % 3 for i, s in enumerate(samples)}
    uninterrupted = run_stream(build_method(kind, text, TUNING, KINDS[name]), ids, labels, samples.__getitem__)

    def dies_at(limit):
        calls = []

        def source(sample_id):
            if len(calls) == limit:
                raise Killed
            calls.append(sample_id)
            return samples[sample_id]
        return source

    checkpoint = RunCheckpoint(tmp_path / "run.checkpoint", "fp", every=4)
    with pytest.raises(Killed):  # dies at the 11th sample: saved after 4 and 8
        run_stream(build_method(kind, text, TUNING, KINDS[name]), ids, labels, dies_at(10), checkpoint=checkpoint)
    assert len(list((tmp_path / "run.checkpoint").glob("records-*.parquet"))) == 2
    resumed_from = []
    source = lambda s: resumed_from.append(s) or samples[s]  # noqa: E731
    fresh = RunCheckpoint(tmp_path / "run.checkpoint", "fp", every=4)
    resumed = run_stream(build_method(kind, text, TUNING, KINDS[name]), ids, labels, source, checkpoint=fresh)
    assert resumed_from == ids[8:]  # nothing before the last checkpoint is computed again
    compare(resumed, uninterrupted)
    if not METHODS[kind].order_independent:
        assert uninterrupted["entropy_after"].nunique() > 1


def test_a_checkpoint_of_another_fingerprint_is_discarded(text, tmp_path, capsys):
    samples = dict(zip("abcdef", random_view_features(6, n_views=16, dim=128, seed=5)))
    ids, labels = list(samples), {s: 0 for s in samples}
    method = build_method("online_tpt", text, TUNING)
    checkpoint = RunCheckpoint(tmp_path / "c", "old", every=2)
    run_stream(method, ids[:3], labels, samples.__getitem__, checkpoint=checkpoint)  # leaves a save after 2
    capsys.readouterr()
    assert RunCheckpoint(tmp_path / "c", "new", every=2).load() is None
    assert not (tmp_path / "c").exists()
    assert capsys.readouterr().out == (f"{tmp_path / 'c'}: a checkpoint of other params, weights, code or device: "
                                       "discarded, the run starts at sample 0\n")


def test_a_resumed_run_says_so_first_and_a_fresh_one_does_not(text, tmp_path, capsys):
    samples = dict(zip([f"s{i}" for i in range(9)], random_view_features(9, n_views=16, dim=128, seed=7)))
    ids, labels = list(samples), {s: 0 for s in samples}
    folder = tmp_path / "run.checkpoint"
    def dies_at_s5(sample_id):
        if sample_id == "s5":
            raise Killed
        return samples[sample_id]

    with pytest.raises(Killed):
        run_stream(build_method("online_tpt", text, TUNING), ids, labels, dies_at_s5, desc="toy/online_tpt/shuffle-0",
                   checkpoint=RunCheckpoint(folder, "fp", every=2))
    assert "resuming" not in capsys.readouterr().out  # a fresh start says nothing of a checkpoint
    run_stream(build_method("online_tpt", text, TUNING), ids, labels, samples.__getitem__,
               desc="toy/online_tpt/shuffle-0", checkpoint=RunCheckpoint(folder, "fp", every=2))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"toy/online_tpt/shuffle-0: resuming at sample 4 of 9 from its checkpoint {folder}"


# ----------------------------------------------------------------------------------------- kill -9, for real


def toy_images(root, n_per_class=70):
    rng = np.random.default_rng(0)
    for label in range(3):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for k in range(n_per_class):
            pixels = rng.integers(0, 80, size=(24, 24, 3), dtype=np.uint8)
            pixels[:, label * 8:label * 8 + 6] += 150
            Image.fromarray(pixels).save(folder / f"{k:03d}.png")


def killable_params(tmp_path, every=15):
    toy_images(tmp_path / "images")
    params = {
        "model": {"arch": "tiny-clip", "pretrained": None, "device": "cpu"},
        "views": {"n_views": 8}, "tuning": {"lr": 0.05}, "run": {"block_size": 50, "checkpoint_every": every},
        "datasets": {"toy": {"kind": "image_folder", "root": str(tmp_path / "images")}},
        "methods": {"dynaprompt": {"kind": "dynaprompt", "buffer_size": 3}},
        "orderings": {"shuffle-0": {"kind": "shuffle", "seed": 0}},
        "paths": {"results": str(tmp_path / "results"), "prepared": str(tmp_path / "prepared"),
                  "features": str(tmp_path / "features")},
        "mlflow": {"db": str(tmp_path / "mlflow.db"), "artifacts": str(tmp_path / "mlartifacts")},
        "sweep": {"runner": "thread", "workers": 1},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def kill_when_checkpointed(command, state_file, env, min_parts=2, timeout=240):
    """Start `command`, SIGKILL its process group once `state_file` names at least `min_parts` saves."""
    import torch

    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            if torch.load(state_file, weights_only=True)["parts"] >= min_parts:
                break
        except (OSError, RuntimeError, EOFError, KeyError):
            pass
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    return process


def reference_records(tmp_path, params, env):
    out = tmp_path / "reference.parquet"
    done = subprocess.run([sys.executable, "-m", "dynaprompt.cli", "run", "--params", str(params), "--dataset", "toy",
                           "--method", "dynaprompt", "--ordering", "shuffle-0", "--out", str(out), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return pd.read_parquet(out)


@pytest.mark.slow
def test_kill_9_of_a_cli_run_resumes_from_its_checkpoint(tmp_path):
    params = killable_params(tmp_path)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    key = RunKey("toy", "dynaprompt", "shuffle-0")
    layout = ResultsLayout(tmp_path / "results")
    state = layout.records(key).with_suffix(".checkpoint") / "state.pt"
    command = [sys.executable, "-m", "dynaprompt.cli", "run", "--params", str(params), "--dataset", "toy", "--method",
               "dynaprompt", "--ordering", "shuffle-0", "--no-progress"]
    kill_when_checkpointed(command, state, env)
    assert layout.read_summary(key) is None  # killed: nothing written as finished
    saved = torch_load_records(state)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()  # views made on the fly (no cache here), the device, then the resume
    resume = f"toy/dynaprompt/shuffle-0: resuming at sample {saved} of 210 from its checkpoint"
    assert any(line.startswith(resume) for line in lines[:3]), lines
    compare(layout.read_records(key), reference_records(tmp_path, params, env))
    assert not state.parent.exists()  # a finished run leaves no checkpoint


@pytest.mark.slow
def test_kill_9_of_a_sweep_resumes_its_run_from_the_checkpoint(tmp_path):
    params = killable_params(tmp_path)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": ""}
    key = RunKey("toy", "dynaprompt", "shuffle-0")
    layout = ResultsLayout(tmp_path / "results")
    state = layout.records(key).with_suffix(".checkpoint") / "state.pt"
    command = [sys.executable, "-m", "flows.sweep", "--params", str(params)]
    kill_when_checkpointed(command, state, env)
    saved = torch_load_parts(state)
    records = torch_load_records(state)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert f"toy/dynaprompt/shuffle-0: resuming at sample {records} of 210 from its checkpoint" in done.stdout
    compare(layout.read_records(key), reference_records(tmp_path, params, env))
    assert saved >= 2


def torch_load_parts(state_file) -> int:
    import torch

    return torch.load(state_file, weights_only=True)["parts"]


def torch_load_records(state_file) -> int:
    import torch

    return torch.load(state_file, weights_only=True)["records"]
