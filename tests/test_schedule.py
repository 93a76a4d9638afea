"""Scheduled robustness sweeps add new orderings until the intervals are tight, and log only what they compute."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from dynaprompt.config import load_settings
from dynaprompt.registry import OrderingRegistry
from dynaprompt.results import ResultsLayout

from .conftest import ROOT, sweep_params

ORDER_DEPENDENT = ["online_tpt", "dynaprompt"]


def scheduled_params(image_root, tmp_path, target=0.0001, **overrides):
    return sweep_params(image_root, tmp_path, datasets=["toy-a", "toy-mix"], methods=["zero_shot", *ORDER_DEPENDENT],
                        schedule={"name": "nightly", "cron": "15 2 * * *", "add_orderings": 1,
                                  "target_half_width": target, "max_orderings": 10}, **overrides)


def registry(tmp_path):
    return OrderingRegistry(ResultsLayout(tmp_path / "results").orderings_registry).entries()


def child_runs(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["test"], output_format="pandas")
    return found[found["tags.mlflow.parentRunId"].notna()], found[found["tags.mlflow.parentRunId"].isna()]


@pytest.mark.slow
def test_two_scheduled_runs_add_2k_distinct_orderings_and_log_each_result_once(prefect_server, image_root, tmp_path):
    from flows.sweep import run_sweep

    params = scheduled_params(image_root, tmp_path)
    run_sweep(str(params))  # the fixed plan first, as `dvc repro` runs it
    children_before, _ = child_runs(tmp_path)
    first = run_sweep(str(params), add_orderings=1)
    second = run_sweep(str(params), add_orderings=1)
    # K = 1 per order-dependent kind: a shuffle and a class-blocked ordering (toy-a), a cyclic one (toy-mix)
    assert len(first["added"]) == len(second["added"]) == 3
    entries = registry(tmp_path)
    names = [e.name for e in entries]
    assert len(names) == len(set(names)) == 6 and set(first["added"]).isdisjoint(second["added"])
    assert all(e.status == "complete" for e in entries)
    seeds = {(e.kind, e.seed) for e in entries}
    settings = load_settings(params)
    assert seeds.isdisjoint({(o.kind, o.seed) for o in settings.orderings.values()})  # never a params seed
    # only the order-dependent methods ran the new orderings
    assert {m for e in entries for _, m in e.runs} == set(ORDER_DEPENDENT)
    runs = pd.read_parquet(tmp_path / "results" / "runs.parquet")
    assert not runs.duplicated(["dataset", "method", "ordering"]).any()
    assert set(names) <= set(runs["ordering"])
    children, parents = child_runs(tmp_path)
    assert len(children) == len(children_before) + first["computed"] + second["computed"]
    assert not children["tags.fingerprint"].duplicated().any()
    scheduled = parents[parents["params.added_orderings"] != "none"]
    assert len(scheduled) == 2 and set(scheduled["params.added_orderings"]) == {",".join(first["added"]),
                                                                                 ",".join(second["added"])}
    # the report reads the registry: the accumulated orderings are covered
    from stages.reporting.results import load_results

    loaded = load_results(ResultsLayout(tmp_path / "results"), settings)
    assert set(names) <= set(loaded.runs["ordering"])


@pytest.mark.slow
def test_target_met_at_once_adds_nothing(prefect_server, image_root, tmp_path, capsys):
    from flows.sweep import run_sweep

    params = scheduled_params(image_root, tmp_path, target=1.0)  # a +-100 point interval: met by any two orderings
    config = yaml.safe_load(params.read_text())
    config["orderings"]["cyclic-1"] = {"kind": "cyclic", "block": 2, "seed": 1}  # two on the mixture too
    params.write_text(yaml.safe_dump(config))
    run_sweep(str(params))
    outcome = run_sweep(str(params), add_orderings=2)
    assert outcome == {"runs": 0, "computed": 0, "reused": 0, "added": []}
    assert registry(tmp_path) == []
    assert "nothing to add" in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_scheduled_run_resumes_without_reusing_a_half_written_seed(real_prefect_server, image_root, tmp_path):
    params = scheduled_params(image_root, tmp_path, workers=1)
    env = {**os.environ, "PREFECT_API_URL": real_prefect_server}
    first = subprocess.run([sys.executable, "-m", "flows.sweep", "--params", str(params)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    process = subprocess.Popen([sys.executable, "-m", "flows.sweep", "--params", str(params), "--add-orderings",
                                "1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    registry_file = ResultsLayout(tmp_path / "results").orderings_registry
    deadline = time.time() + 300
    while time.time() < deadline and not (registry_file.is_file() and len(json.loads(registry_file.read_text())
                                                                           ["orderings"]) == 3):
        time.sleep(0.1)
    time.sleep(2)  # let a run or two of the new orderings finish, then kill -9 mid-sweep
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = registry(tmp_path)
    assert len(killed) == 3 and all(e.status == "pending" for e in killed)
    done = subprocess.run([sys.executable, "-m", "flows.sweep", "--params", str(params), "--add-orderings", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    entries = registry(tmp_path)
    assert [e.name for e in entries[:3]] == [e.name for e in killed]  # resumed, not redrawn
    assert all(e.status == "complete" for e in entries) and len(entries) == 6
    seeds = [(e.kind, e.seed) for e in entries]
    assert len(seeds) == len(set(seeds))
    assert not list((tmp_path / "results").rglob("*.partial"))


def test_next_seed_is_above_every_seed_in_use(tmp_path, image_root):
    params = yaml.safe_load(scheduled_params(image_root, tmp_path).read_text())
    params["orderings"]["shuffle-7"] = {"kind": "shuffle", "seed": 7}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    settings = load_settings(path)
    reg = OrderingRegistry(tmp_path / "orderings.json")
    entry = reg.draw(settings, "shuffle", [["toy-a", "online_tpt"]], "s1")
    assert entry.seed == 8 and entry.name == "shuffle-8" and entry.status == "pending"
    assert reg.draw(settings, "shuffle", [["toy-a", "online_tpt"]], "s1").seed == 9
    assert reg.draw(settings, "cyclic", [["toy-mix", "online_tpt"]], "s1", {"block": 2}).name == "cyclic-1"


@pytest.mark.slow
def test_a_scheduled_run_adds_cells_under_every_seed_of_the_grid(prefect_server, image_root, tmp_path):
    """With sweep.view_seeds, a new ordering runs under each seed; the registry records the seeds."""
    from flows.sweep import run_sweep

    params = sweep_params(image_root, tmp_path, datasets=["toy-a"], methods=["zero_shot", "online_tpt"],
                          view_seeds=[0, 3], schedule={"name": "nightly", "cron": "15 2 * * *", "add_orderings": 1,
                                                       "target_half_width": 0.0001, "max_orderings": 10,
                                                       "variance_bootstrap": 5})
    run_sweep(str(params))
    layout = ResultsLayout(tmp_path / "results")
    base = {(s.method, s.ordering, s.view_seed) for s in layout.summaries()}
    assert {seed for _, _, seed in base} == {0, 3}  # the fixed plan is crossed with the seeds
    added = run_sweep(str(params), add_orderings=1)["added"]
    entries = registry(tmp_path)
    assert [e.name for e in entries] == added and all(e.seeds == [0, 3] for e in entries)
    cells = {(s.method, s.ordering, s.view_seed) for s in layout.summaries()} - base
    assert cells == {("online_tpt", name, seed) for name in added for seed in (0, 3)}
    assert all((layout.root / "runs" / "toy-a" / "online_tpt" / f"{name}~seed3.parquet").is_file() for name in added)
