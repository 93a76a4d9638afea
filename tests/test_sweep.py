"""The sweep flow: results files, MLflow lineage, skip-if-done, resume after a crash, scale-out, schedules."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import flows  # noqa: F401  (offline Prefect defaults before prefect is imported)
from dynaprompt.records import RECORD_COLUMNS

from .conftest import make_params

ROOT = Path(__file__).resolve().parent.parent


def sweep_params(image_root, tmp_path, **sweep_overrides):
    params = make_params(image_root)
    params["views"] = {"n_views": 8, "view_seed": 0}
    params["datasets"] = {"toy-a": {"kind": "image_folder", "root": str(image_root)},
                          "toy-b": {"kind": "image_folder", "root": str(image_root)}}
    params["mixtures"] = {"toy-mix": {"members": ["toy-a", "toy-b"]}}
    params["methods"] = {"zero_shot": {"kind": "zero_shot"}, "tpt": {"kind": "tpt"},
                         "online_tpt": {"kind": "online_tpt"}, "dynaprompt": {"kind": "dynaprompt", "buffer_size": 3}}
    params["orderings"] = {"shuffle-0": {"kind": "shuffle", "seed": 0}, "shuffle-1": {"kind": "shuffle", "seed": 1},
                           "cyclic-0": {"kind": "cyclic", "block": 2, "seed": 0}}
    params["paths"] = {"results": str(tmp_path / "results"), "prepared": str(tmp_path / "prepared"),
                       "features": str(tmp_path / "features")}
    params["mlflow"] = {"db": str(tmp_path / "mlflow.db"), "artifacts": str(tmp_path / "mlartifacts"),
                        "experiment": "test"}
    params["sweep"] = {"runner": "thread", "workers": 2, "threads_per_run": 1,
                       "schedule": {"name": "nightly", "cron": "15 2 * * *"}, **sweep_overrides}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


N_RUNS = 2 * 4 * 2 + 1 * 4 * 1


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def results_of(tmp_path):
    runs = pd.read_parquet(tmp_path / "results" / "runs.parquet")
    return runs.sort_values(["dataset", "method", "ordering"], ignore_index=True)


@pytest.mark.slow
def test_sweep_writes_records_runs_table_and_mlflow_children(prefect_server, image_root, tmp_path):
    from flows.sweep import run_sweep

    params = sweep_params(image_root, tmp_path)
    summary = run_sweep(str(params))
    assert summary["runs"] == N_RUNS and summary["reused"] == 0
    runs = results_of(tmp_path)
    assert len(runs) == N_RUNS and runs["accuracy"].between(0, 1).all()
    assert set(runs.loc[runs["dataset"] == "toy-mix", "ordering"]) == {"cyclic-0"}
    records = pd.read_parquet(tmp_path / "results/runs/toy-mix/dynaprompt/cyclic-0.parquet")
    assert list(records.columns) == RECORD_COLUMNS + ["domain"] and len(records) == 24
    assert records["domain"].tolist()[:4] == ["toy-a", "toy-a", "toy-b", "toy-b"]
    plan = json.loads((tmp_path / "results/plan.json").read_text())["runs"]
    assert len(plan) == N_RUNS

    # order-independent methods: computed once, the same prediction per sample under every ordering
    a = pd.read_parquet(tmp_path / "results/runs/toy-a/tpt/shuffle-0.parquet").set_index("sample_id").sort_index()
    b = pd.read_parquet(tmp_path / "results/runs/toy-a/tpt/shuffle-1.parquet").set_index("sample_id").sort_index()
    assert a["pred"].equals(b["pred"])

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["test"], output_format="pandas")
    children = found[found["tags.mlflow.parentRunId"].notna()]
    parents = found[found["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1 and len(children) == N_RUNS
    assert set(children["tags.mlflow.runName"]) == {f"{d}/{m}/{o}" for d, m, o in runs[["dataset", "method",
                                                                                          "ordering"]].values}
    child = children[children["tags.mlflow.runName"] == "toy-a/dynaprompt/shuffle-0"].iloc[0]
    history = mlflow.tracking.MlflowClient().get_metric_history(child["run_id"], "block_accuracy")
    assert [m.step for m in history] == [0, 1, 2]  # 12 samples, blocks of 4

    # a second sweep reuses every run
    again = run_sweep(str(params))
    assert again["reused"] == N_RUNS
    pd.testing.assert_frame_equal(results_of(tmp_path).drop(columns="reused"), runs.drop(columns="reused"))


@pytest.mark.slow
def test_resume_after_a_crash_recomputes_only_what_is_missing(prefect_server, image_root, tmp_path):
    from flows.sweep import run_sweep

    params = sweep_params(image_root, tmp_path)
    run_sweep(str(params))
    reference = results_of(tmp_path)
    # simulate a crash: one run never finished (no files), one died while writing (a partial file)
    victim = tmp_path / "results/runs/toy-b/dynaprompt/shuffle-1.parquet"
    victim.unlink()
    victim.with_suffix(".json").unlink()
    half = tmp_path / "results/runs/toy-a/online_tpt/shuffle-0"
    half.with_suffix(".json").unlink()
    half.with_suffix(".parquet").rename(half.with_name("shuffle-0.parquet.partial"))
    run_sweep(str(params))
    resumed = results_of(tmp_path)
    recomputed = resumed.loc[~resumed["reused"], ["dataset", "method", "ordering"]].values.tolist()
    assert sorted(recomputed) == [["toy-a", "online_tpt", "shuffle-0"], ["toy-b", "dynaprompt", "shuffle-1"]]
    pd.testing.assert_frame_equal(resumed.drop(columns=["reused", "seconds_per_sample", "seconds_total"]),
                                  reference.drop(columns=["reused", "seconds_per_sample", "seconds_total"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port: Dask workers reach it instead of starting their own."""
    port = free_port()
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": ""}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 90
    import urllib.request

    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(server.pid, signal.SIGTERM)
        pytest.fail("prefect server did not start")
    yield url
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def run_cli(args, env_extra, timeout=600):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


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
    assert 0 < len(finished) < N_RUNS + 4
    done = run_cli(["flows.sweep", "--params", str(params)], {"PREFECT_API_URL": real_prefect_server})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = results_of(tmp_path)
    assert len(runs) == N_RUNS and not list(runs_dir.rglob("*.partial"))
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"


@pytest.mark.slow
def test_scheduled_deployment_has_the_cron_and_parameters(real_prefect_server, image_root, tmp_path):
    params = sweep_params(image_root, tmp_path)
    done = run_cli(["flows.schedule", "--params", str(params), "--register-only"],
                   {"PREFECT_API_URL": real_prefect_server}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    code = (
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    d = c.read_deployment_by_name('sweep/nightly')\n"
        "    print(d.schedules[0].schedule.cron, d.parameters['params_file'], sep='|')\n"
    )
    read = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PREFECT_API_URL": real_prefect_server},
                          capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr[-3000:]
    assert read.stdout.strip().split("|") == ["15 2 * * *", str(params.resolve())]
