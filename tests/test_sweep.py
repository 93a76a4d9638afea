"""The sweep flow: results files, MLflow lineage, skip-if-done, resume after a crash, scale-out, schedules."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import flows  # noqa: F401  (offline Prefect defaults before prefect is imported)
from dynaprompt.records import RECORD_COLUMNS

from .conftest import ROOT, run_cli, sweep_params


def planned(params) -> list:
    """The runs the params plan (the orderings each stream is paired with are the plan's business)."""
    from dynaprompt.config import load_settings
    from dynaprompt.plan import expand_plan

    return [key for key, _ in expand_plan(load_settings(params))]


def results_of(tmp_path):
    runs = pd.read_parquet(tmp_path / "results" / "runs.parquet")
    return runs.sort_values(["dataset", "method", "ordering"], ignore_index=True)


def mlflow_runs(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["test"], output_format="pandas")


@pytest.mark.slow
def test_sweep_writes_records_runs_table_and_mlflow_children(prefect_server, image_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.sweep import run_sweep

    params = sweep_params(image_root, tmp_path)
    plan = planned(params)
    n_runs = len(plan)
    summary = run_sweep(str(params))
    assert summary["runs"] == n_runs and summary["reused"] == 0 and summary["computed"] == n_runs
    runs = results_of(tmp_path)
    assert len(runs) == n_runs and runs["accuracy"].between(0, 1).all()
    mixed = runs["dataset"] == "toy-mix"
    assert set(runs.loc[mixed, "ordering"]) == {k.ordering for k in plan if k.dataset == "toy-mix"}
    records = pd.read_parquet(tmp_path / "results/runs/toy-mix/dynaprompt/cyclic-0.parquet")
    assert list(records.columns) == RECORD_COLUMNS + ["domain"] and len(records) == 24
    assert records["domain"].tolist()[:4] == ["toy-a", "toy-a", "toy-b", "toy-b"]
    written = json.loads((tmp_path / "results/plan.json").read_text())["runs"]
    assert len(written) == n_runs and {p["group"] for p in written} == {"main"}

    # order-independent methods: computed once, the same prediction per sample under every ordering
    a = pd.read_parquet(tmp_path / "results/runs/toy-a/tpt/shuffle-0.parquet").set_index("sample_id").sort_index()
    b = pd.read_parquet(tmp_path / "results/runs/toy-a/tpt/shuffle-1.parquet").set_index("sample_id").sort_index()
    assert a["pred"].equals(b["pred"])

    found = mlflow_runs(tmp_path)
    children = found[found["tags.mlflow.parentRunId"].notna()]
    parents = found[found["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1 and len(children) == n_runs
    assert set(children["tags.mlflow.runName"]) == {f"{d}/{m}/{o}" for d, m, o in runs[["dataset", "method",
                                                                                          "ordering"]].values}
    child = children[children["tags.mlflow.runName"] == "toy-a/dynaprompt/shuffle-0"].iloc[0]
    client = MlflowClient()
    history = client.get_metric_history(child["run_id"], "accuracy_block4")
    assert [m.step for m in history] == [0, 1, 2]  # 12 samples, blocks of 4
    run = client.get_run(child["run_id"])
    assert history[0].timestamp >= run.info.start_time > 10 ** 12 and history[-1].timestamp <= run.info.end_time + 1
    assert run.info.end_time > run.info.start_time
    assert {"tuning.lr", "method.buffer_size", "method.selection", "views.n_views", "tuning.steps",
            "tuning.confident_ratio", "views.view_seed", "run.threads", "method.criteria"} <= set(run.data.params)
    assert run.data.params["tuning.lr"] == "0.05" and run.data.params["method.buffer_size"] == "3"
    assert run.data.tags["sweep_id"] == parents.iloc[0]["tags.sweep_id"] and "fingerprint" in run.data.tags
    assert run.data.tags.get("mlflow.user") and run.data.tags.get("mlflow.note.content")
    experiment = client.get_experiment_by_name("test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "mlflow.note.content" in experiment.tags
    parent = client.get_run(parents.iloc[0]["run_id"])
    assert parent.data.metrics["computed"] == n_runs and "mean_accuracy/toy-a/tpt" in parent.data.metrics

    # a second sweep reuses every run and logs no new run for a result already logged
    again = run_sweep(str(params))
    assert again["reused"] == n_runs and again["computed"] == 0
    pd.testing.assert_frame_equal(results_of(tmp_path), runs)
    found = mlflow_runs(tmp_path)
    assert found["tags.mlflow.parentRunId"].notna().sum() == n_runs
    assert found["tags.mlflow.parentRunId"].isna().sum() == 2  # the second sweep's parent, with 0 computed


@pytest.mark.slow
def test_resume_after_a_crash_recomputes_only_what_is_missing(prefect_server, image_root, tmp_path):
    from flows.sweep import run_sweep

    params = sweep_params(image_root, tmp_path)
    n_runs = len(planned(params))
    run_sweep(str(params))
    reference = results_of(tmp_path)
    # simulate a crash: one run never finished (no files), one died while writing (a partial file)
    victim = tmp_path / "results/runs/toy-b/dynaprompt/shuffle-1.parquet"
    victim.unlink()
    victim.with_suffix(".json").unlink()
    half = tmp_path / "results/runs/toy-a/online_tpt/shuffle-0"
    half.with_suffix(".json").unlink()
    half.with_suffix(".parquet").rename(half.with_name("shuffle-0.parquet.partial"))
    outcome = run_sweep(str(params))
    assert outcome["computed"] == 2 and outcome["reused"] == n_runs - 2
    resumed = results_of(tmp_path)
    timing = ["seconds_per_sample", "seconds_total", "wall_seconds"]
    pd.testing.assert_frame_equal(resumed.drop(columns=timing), reference.drop(columns=timing))


@pytest.mark.slow
def test_dask_local_cluster_gives_the_thread_runners_results(real_prefect_server, image_root, tmp_path):
    env = {"PREFECT_API_URL": real_prefect_server}
    thread_dir, dask_dir = tmp_path / "thread", tmp_path / "dask"
    thread_dir.mkdir(), dask_dir.mkdir()
    for folder, runner in ((thread_dir, "thread"), (dask_dir, "dask")):
        params = sweep_params(image_root, folder, datasets=["toy-a"], methods=["tpt", "dynaprompt"])
        done = run_cli(["flows.sweep", "--params", str(params), "--runner", runner], env)
        assert done.returncode == 0, done.stderr[-3000:]
    thread, dask = results_of(thread_dir), results_of(dask_dir)
    assert len(thread) == 4
    columns = ["dataset", "method", "ordering", "n", "accuracy", "block_accuracy"]
    pd.testing.assert_frame_equal(thread[columns], dask[columns])
    for key in thread[["dataset", "method", "ordering"]].values:
        relative = Path("results/runs", *key[:2], f"{key[2]}.parquet")
        a, b = pd.read_parquet(thread_dir / relative), pd.read_parquet(dask_dir / relative)
        pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))


@pytest.mark.slow
def test_killed_sweep_resumes_without_recomputing_finished_runs(real_prefect_server, image_root, tmp_path):
    params = sweep_params(image_root, tmp_path, workers=1)
    n_runs = len(planned(params))
    env = {**os.environ, "PREFECT_API_URL": real_prefect_server}
    process = subprocess.Popen([sys.executable, "-m", "flows.sweep", "--params", str(params)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs_dir = tmp_path / "results" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(runs_dir.rglob("*.json"))) < 4:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # kill -9, mid-sweep
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in runs_dir.rglob("*.parquet")}
    assert 0 < len(finished) < n_runs + 4
    done = run_cli(["flows.sweep", "--params", str(params)], {"PREFECT_API_URL": real_prefect_server})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = results_of(tmp_path)
    assert len(runs) == n_runs and not list(runs_dir.rglob("*.partial"))
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"


@pytest.mark.slow
def test_scheduled_deployment_has_the_cron_parameters_and_concurrency_limit(real_prefect_server, image_root, tmp_path):
    params = sweep_params(image_root, tmp_path)
    done = run_cli(["flows.schedule", "--params", str(params), "--register-only"],
                   {"PREFECT_API_URL": real_prefect_server}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    code = (
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    d = c.read_deployment_by_name('sweep/nightly')\n"
        "    print(d.schedules[0].schedule.cron, d.parameters['params_file'], d.parameters['add_orderings'],\n"
        "          d.global_concurrency_limit.limit, d.concurrency_options.collision_strategy.value, sep='|')\n"
    )
    read = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PREFECT_API_URL": real_prefect_server},
                          capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr[-3000:]
    # one run at a time: a run that comes due while the last still runs is cancelled, not queued
    assert read.stdout.strip().split("|") == ["15 2 * * *", str(params.resolve()), "1", "1", "CANCEL_NEW"]


@pytest.mark.slow
def test_the_cli_and_the_sweep_give_the_same_records(prefect_server, image_root, tmp_path):
    """An order-dependent run, 2 torch threads, through both entry points: identical records."""
    from dynaprompt.cli import main as cli
    from flows.sweep import run_sweep

    params = sweep_params(image_root, tmp_path, datasets=["toy-a"], methods=["dynaprompt"], orderings=["shuffle-1"])
    config = yaml.safe_load(params.read_text())
    config["run"] = {"block_size": 4, "threads": 2}
    params.write_text(yaml.safe_dump(config))
    run_sweep(str(params))
    assert cli(["run", "--params", str(params), "--dataset", "toy-a", "--method", "dynaprompt", "--ordering",
                "shuffle-1", "--out", str(tmp_path / "cli.parquet"), "--no-progress"]) == 0
    swept = pd.read_parquet(tmp_path / "results/runs/toy-a/dynaprompt/shuffle-1.parquet")
    by_cli = pd.read_parquet(tmp_path / "cli.parquet")
    pd.testing.assert_frame_equal(swept.drop(columns="seconds"), by_cli.drop(columns="seconds"))
    summary = json.loads((tmp_path / "cli.json").read_text())
    assert summary["settings"]["run.threads"] == 2


@pytest.mark.slow
def test_a_run_with_bad_numbers_fails_alone_and_the_others_are_kept(prefect_server, image_root, tmp_path):
    """A NaN in one dataset's feature cache stops that dataset's runs, naming the sample; the rest finish."""
    import numpy as np

    from dynaprompt.config import load_settings
    from dynaprompt.features import ViewEncoder, cache_identity
    from dynaprompt.model import load_clip
    from dynaprompt.resolve import resolve_run
    from dynaprompt.results import ResultsLayout, RunKey
    from dynaprompt.runner import feature_store, open_stream
    from flows.sweep import run_sweep

    params = sweep_params(image_root, tmp_path, datasets=["toy-a", "toy-b"], methods=["tpt", "dynaprompt"])
    settings = load_settings(params)
    clip = load_clip(settings.model)
    views = resolve_run(settings, "toy-a", "dynaprompt").views
    store = feature_store(settings, "toy-a", views)
    data = open_stream(settings, "toy-a")
    store.build(data, ViewEncoder(clip, views), data.manifest["sample_id"].tolist(),
                cache_identity(clip, settings.model.arch, views))
    features = np.load(store.features_file, mmap_mode="r+")
    features[2] = float("nan")
    features.flush()
    del features
    with pytest.raises(RuntimeError) as failure:
        run_sweep(str(params))
    message = str(failure.value)
    bad = data.manifest["sample_id"].iloc[2]
    assert "toy-a/dynaprompt/shuffle-0" in message and f"non-finite view features at sample '{bad}'" in message
    layout = ResultsLayout(tmp_path / "results")
    assert layout.read_summary(RunKey("toy-a", "dynaprompt", "shuffle-0")) is None  # not written as finished
    assert all(layout.read_summary(RunKey("toy-b", m, o)) is not None
               for m in ("tpt", "dynaprompt") for o in ("shuffle-0", "shuffle-1"))


def test_two_sweeps_planning_one_run_compute_it_once(image_root, tmp_path, capsys):
    """The run task holds the run's lock while it computes (an order-independent method's shared run's too): a
    second task for the same run, as another sweep submits it, waits, then reuses the finished run."""
    import threading

    from dynaprompt.results import ResultsLayout, RunKey
    from tasks.runs import run_one

    params = str(sweep_params(image_root, tmp_path, datasets=["toy-a"], methods=["zero_shot", "online_tpt"]))
    layout = ResultsLayout(tmp_path / "results")
    key = RunKey("toy-a", "online_tpt", "shuffle-0")
    gate = layout.lock(key)
    gate.acquire()  # a third sweep is computing it
    outcomes = {}

    def task(name, method, cell):
        outcomes[name] = run_one(params, "toy-a", method, cell)

    tasks = [threading.Thread(target=task, args=args) for args in (
        ("a", "online_tpt", "shuffle-0"), ("b", "online_tpt", "shuffle-0"),
        ("c", "zero_shot", "shuffle-0"), ("d", "zero_shot", "shuffle-1"))]
    for thread in tasks:
        thread.start()
    time.sleep(1)
    assert "a" not in outcomes and "b" not in outcomes and layout.read_summary(key) is None
    gate.release()
    for thread in tasks:
        thread.join(timeout=120)
    assert sorted(outcomes[n]["reused"] for n in "ab") == [False, True]
    assert outcomes["a"]["summary"]["fingerprint"] == outcomes["b"]["summary"]["fingerprint"]
    assert not outcomes["c"]["reused"] and not outcomes["d"]["reused"]
    out = capsys.readouterr().out
    assert out.count("toy-a/zero_shot/__shared__: on ") == 1  # the shared records computed once, reordered twice
    assert out.count("toy-a/online_tpt/shuffle-0: on ") == 1 and "waiting for it" in out
    assert not list(layout.root.rglob("*.lock"))
