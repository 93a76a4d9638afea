"""Every path in params is taken from the params file's folder: a process's working directory never matters (a Dask
worker started anywhere), and no absolute path of one checkout reaches a run's identity."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dynaprompt import check
from dynaprompt.cli import main as cli
from dynaprompt.config import load_settings
from dynaprompt.model import BUNDLED_CONFIGS, ModelSpec, WeightsNotFoundError, load_clip, load_model
from dynaprompt.resolve import resolve
from dynaprompt.results import ResultsLayout, RunKey

from .conftest import ROOT, make_params

KEY = RunKey("toy", "tpt", "shuffle-0")
RUN = ["run", "--dataset", "toy", "--method", "tpt", "--ordering", "shuffle-0", "--no-progress"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny CLIP's weights in open_clip's format (random, seed 1: not what a null `pretrained` gives)."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(load_clip(ModelSpec(arch="tiny-clip", pretrained=None, init_seed=1, device="cpu")).model.state_dict(),
               path)
    return path


def make_project(folder: Path, image_root: Path, weights: Path) -> Path:
    """A project whose params name everything relatively: images, weights, a JSON arch, a hub cache."""
    shutil.copytree(image_root, folder / "images")
    (folder / "weights").mkdir()
    shutil.copy(weights, folder / "weights" / "tiny.pt")
    (folder / "model").mkdir()
    shutil.copy(BUNDLED_CONFIGS / "tiny-clip.json", folder / "model" / "my-tiny.json")
    params = make_params(folder / "images")
    params["datasets"] = {"toy": {"kind": "image_folder", "root": "images"}}
    params["model"] = {"arch": "model/my-tiny.json", "pretrained": "weights/tiny.pt", "cache_dir": "hub",
                       "device": "cpu"}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder / "params.yaml"


def test_a_run_from_another_working_directory_reads_and_writes_under_the_params_folder(
        tmp_path, image_root, weights, monkeypatch, capsys):
    params = make_project(tmp_path / "project", image_root, weights)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli([*RUN[:1], "--params", str(params), *RUN[1:]]) == 0
    out = capsys.readouterr().out
    assert f"model: my-tiny from {tmp_path / 'project' / 'weights' / 'tiny.pt'} (open_clip)" in out
    summary = ResultsLayout(tmp_path / "project" / "results").read_summary(KEY)
    assert summary is not None and summary.weights == str(tmp_path / "project" / "weights" / "tiny.pt")
    assert list(elsewhere.iterdir()) == []  # nothing read or written relative to the working directory
    settings = load_settings(params)
    assert check.model_shapes(check.settings_arch(settings))["text_width"] == 128  # check finds the JSON arch too


def test_a_process_started_in_a_temporary_folder_runs(tmp_path, image_root, weights):
    params = make_project(tmp_path / "project", image_root, weights)
    start = tmp_path / "worker-cwd"
    start.mkdir()
    done = subprocess.run([sys.executable, "-m", "dynaprompt.cli", *RUN[:1], "--params", str(params), *RUN[1:]],
                          cwd=start, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert ResultsLayout(tmp_path / "project" / "results").read_summary(KEY) is not None
    assert list(start.iterdir()) == []


def test_two_checkouts_at_different_paths_give_one_fingerprint(tmp_path, image_root, weights):
    first = load_settings(make_project(tmp_path / "a", image_root, weights))
    second = load_settings(make_project(tmp_path / "deeper" / "b", image_root, weights))
    runs = [resolve(s, KEY, load_model(s).weights) for s in (first, second)]
    assert runs[0].weights != runs[1].weights  # each loaded its own copy ...
    assert runs[0].fingerprint == runs[1].fingerprint  # ... and the identity carries no absolute path


def test_missing_weights_name_the_file_under_the_params_folder(tmp_path, image_root, weights, monkeypatch):
    params = make_project(tmp_path / "project", image_root, weights)
    (tmp_path / "project" / "weights" / "tiny.pt").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path / "project" / "weights" / "tiny.pt")):
        load_model(load_settings(params))


def test_the_pretrain_stage_compares_paths_not_spellings(tmp_path):
    from dynaprompt.config import settings_from_params
    from stages.pretrain import trains_bundled_model

    def settings(pretrained, output="data/models/tiny.pt"):
        return settings_from_params({"model": {"pretrained": pretrained}, "pretrain": {"output": output}},
                                    base_dir=tmp_path)

    assert trains_bundled_model(settings("./data/models/tiny.pt"))
    assert trains_bundled_model(settings(str(tmp_path / "data" / "models" / "tiny.pt")))
    assert not trains_bundled_model(settings("data/models/other.pt")) and not trains_bundled_model(settings(None))


def test_the_bundled_params_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(ROOT / "params.yaml")
    assert settings.base_dir == ROOT
    assert settings.path("results") == ROOT / "results"
