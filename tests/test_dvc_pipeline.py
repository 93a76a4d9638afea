"""The real dvc.yaml on a toy project: `dvc repro` end to end, then an unrelated dataset reruns neither
pretrain nor the sweep, and the plots are declared with data DVC can diff."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from .conftest import ROOT

pytestmark = pytest.mark.slow
CODE = ("dynaprompt", "stages", "flows", "tasks", "analysis", "dvc.yaml")


def toy_params(project) -> dict:
    """The real params.yaml (every section dvc.yaml declares), on two image folders with a random tiny CLIP."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    folder = lambda name: {"kind": "image_folder", "root": f"images/{name}"}  # noqa: E731
    params.update({
        "model": {**params["model"], "pretrained": None, "device": "cpu"},
        "views": {**params["views"], "n_views": 8},
        "run": {"block_size": 4, "threads": 1},
        "methods": {"zero_shot": {"kind": "zero_shot"}, "tpt": {"kind": "tpt"},
                    "dynaprompt": {"kind": "dynaprompt", "buffer_size": 3}, "tda": {"kind": "tda"}},
        "orderings": {"shuffle-0": {"kind": "shuffle", "seed": 0}, "shuffle-1": {"kind": "shuffle", "seed": 1},
                      "cyclic-0": {"kind": "cyclic", "block": 2, "seed": 0}},
        "datasets": {"toy-a": folder("a"), "toy-b": folder("b")},
        "mixtures": {"toy-mix": {"members": ["toy-a", "toy-b"]}},
        "testbed": {"streams": ["toy-a"], "templates": "captions"},
        "calibration": {"dataset": None},
        "ablations": {"dataset": None},
        "sweep": {**params["sweep"], "datasets": ["toy-a", "toy-b", "toy-mix"],
                  "methods": ["zero_shot", "tpt", "dynaprompt", "tda"], "runner": "thread", "workers": 2,
                  "chaos": {"orderings": ["shuffle"], "replicates": 2}},
        "mlflow": {**params["mlflow"], "experiment": "toy"},
    })
    return params


def dvc(project, *args, timeout=900):
    # stage commands call `python`: the interpreter running the tests, as an activated venv would give
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": path}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_repro_then_an_unrelated_dataset_reruns_neither_pretrain_nor_the_sweep(tmp_path, image_root):
    project = tmp_path / "project"
    project.mkdir()
    for entry in CODE:
        (shutil.copytree if (ROOT / entry).is_dir() else shutil.copy)(ROOT / entry, project / entry)
    for name in ("a", "b"):
        shutil.copytree(image_root, project / "images" / name)
    (project / "params.yaml").write_text(yaml.safe_dump(toy_params(project)))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    assert dvc(project, "init", "-q").returncode == 0
    done = dvc(project, "repro")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((project / "reports" / "pretrain.json").read_text())["skipped"]  # random weights: no-op
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert {"toy-a", "toy-b", "toy-mix"} <= set(metrics["datasets"])
    results_before = {p: p.stat().st_mtime_ns for p in (project / "results").rglob("*.parquet")}

    # an unrelated dataset: its own stages appear, the sweep and pretrain stay up to date
    params = yaml.safe_load((project / "params.yaml").read_text())
    shutil.copytree(image_root, project / "images" / "c")
    params["datasets"]["toy-c"] = {"kind": "image_folder", "root": "images/c"}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    status = dvc(project, "status", "--json")
    changed = set(json.loads(status.stdout))
    assert "pretrain" not in changed and "sweep" not in changed and "report" not in changed, changed
    assert "prepare@toy-c" in changed
    again = dvc(project, "repro")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Running stage 'sweep'" not in again.stdout and "Running stage 'pretrain'" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (project / "results").rglob("*.parquet")} == results_before

    # the plots are data DVC reads: `dvc plots show --json` finds every declared file's points
    shown = dvc(project, "plots", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert "accuracy_per_block.csv" in shown.stdout and "samples_seen" in shown.stdout
