"""Scale-out that survives losses: a worker killed mid-run, a flow killed mid-sweep, one Prefect server per sweep,
a Dask cluster whose workers start elsewhere, MLflow filled from the records, DVC experiments' MLflow store, and
the sweep's batches."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from PIL import Image

import flows  # noqa: F401  (offline Prefect defaults before prefect is imported)
from dynaprompt.config import load_settings
from dynaprompt.plan import expand_plan
from dynaprompt.results import ResultsLayout

from .conftest import CLASSNAMES, ROOT, free_port, sweep_params

ORDER_DEPENDENT = ["online_tpt", "dynaprompt"]


@pytest.fixture(scope="module")
def long_images(tmp_path_factory):
    """3 classes x 16 images: runs long enough (a second or more) to be killed in the middle."""
    root = tmp_path_factory.mktemp("long-images")
    rng = np.random.default_rng(1)
    for label, name in enumerate(CLASSNAMES):
        (root / name).mkdir()
        for k in range(16):
            pixels = rng.integers(0, 60, size=(40, 40, 3), dtype=np.uint8)
            pixels[:, label * 12: label * 12 + 10] += 180
            Image.fromarray(pixels).save(root / name / f"img{k}.png")
    return root


def long_params(images, tmp_path, **sweep):
    """toy-a only, the order-dependent methods over 2 shuffles under 2 view seeds: 8 runs."""
    return sweep_params(images, tmp_path, datasets=["toy-a"], methods=ORDER_DEPENDENT, view_seeds=[0, 1], **sweep)


def sweep_env(**extra) -> dict:
    """The environment of a sweep started here: no Prefect server given (unless `extra` names one)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "OMP_WAIT_POLICY": "PASSIVE", **extra}


def start(args, env, log: Path, cwd=ROOT) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(process: subprocess.Popen, log: Path, timeout=300) -> str:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return log.read_text()


def lock_holders(runs_dir: Path) -> list[int]:
    """The processes holding a run's lock now (computing it), read from the kernel's lock table."""
    inodes = set()
    for lock in runs_dir.rglob("*.lock"):
        try:
            inodes.add(os.stat(lock).st_ino)
        except FileNotFoundError:
            continue
    holders = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" not in fields and int(fields[5].rsplit(":", 1)[1]) in inodes:  # "->": waiting, not holding
            holders.append(int(fields[4]))
    return holders


def servers_in_session(session: int) -> set[int]:
    """Prefect servers among the processes of a session: `prefect server start` or Prefect's temporary one."""
    found = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            line = " ".join(process.info["cmdline"] or [])
            if os.getsid(process.info["pid"]) == session and (
                    "prefect.server.api.server:create_app" in line or "prefect server start" in line):
                found.add(process.info["pid"])
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def mlflow_runs(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["test"], output_format="pandas")
    parent = found.get("tags.mlflow.parentRunId", pd.Series(None, index=found.index, dtype=object))
    return found[parent.notna()], found[parent.isna()]


def assert_every_run_logged_once(tmp_path, n_runs):
    layout = ResultsLayout(tmp_path / "results")
    children, parents = mlflow_runs(tmp_path)
    assert len(layout.summaries()) == n_runs
    assert not children["tags.fingerprint"].duplicated().any()
    assert set(children["tags.fingerprint"]) == {s.fingerprint for s in layout.summaries()}
    return children, parents


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["process", "dask"])
def test_a_worker_killed_mid_run_costs_no_run(long_images, tmp_path, runner):
    """kill -9 of the worker computing a run: the sweep exits 0 with every record, each logged once."""
    params = long_params(long_images, tmp_path, runner=runner, runs_per_task=2)
    log, runs_dir = tmp_path / "sweep.log", tmp_path / "results" / "runs"
    sweep = start(["flows.sweep", "--params", str(params)], sweep_env(PREFECT_HOME=str(tmp_path / "prefect")), log)
    killed, deadline = None, time.time() + 240
    while killed is None and sweep.poll() is None and time.time() < deadline:
        for pid in lock_holders(runs_dir):
            if pid != sweep.pid and os.getsid(pid) == sweep.pid:  # a worker of this sweep, in the middle of a run
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.02)
    output = finish(sweep, log)
    assert killed is not None, output[-3000:]
    assert sweep.returncode == 0, output[-3000:]
    if runner == "process":
        assert "a worker was lost (BrokenProcessPool" in output
    runs = pd.read_parquet(tmp_path / "results" / "runs.parquet")
    assert len(runs) == 8 and not list(runs_dir.rglob("*.partial"))
    assert_every_run_logged_once(tmp_path, 8)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["process", "dask"])
def test_one_prefect_server_serves_a_sweep_on_two_workers(image_root, tmp_path, runner):
    """Without PREFECT_API_URL the sweep starts one server and its 2 workers use it: one server process, ever."""
    params = sweep_params(image_root, tmp_path, datasets=["toy-a", "toy-b"], methods=ORDER_DEPENDENT, runner=runner,
                          workers=2)
    log = tmp_path / "sweep.log"
    sweep = start(["flows.sweep", "--params", str(params)], sweep_env(PREFECT_HOME=str(tmp_path / "prefect")), log)
    seen = set()
    while sweep.poll() is None:
        seen |= servers_in_session(sweep.pid)
        time.sleep(0.1)
    output = finish(sweep, log)
    assert sweep.returncode == 0, output[-3000:]
    assert len(seen) == 1 and output.count("sweep: Prefect server http://127.0.0.1:") == 1
    assert len(ResultsLayout(tmp_path / "results").summaries()) == 8


def test_a_remote_dask_cluster_without_a_server_is_one_clear_error(image_root, tmp_path, monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.sweep import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    params = sweep_params(image_root, tmp_path)
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert main(["--params", str(params), "--runner", "dask", "--address", "tcp://127.0.0.1:1"]) == 1
    error = capsys.readouterr().err
    assert "tcp://127.0.0.1:1 runs tasks on other hosts" in error and "export PREFECT_API_URL=" in error


@pytest.mark.slow
def test_a_dask_cluster_whose_workers_start_elsewhere_runs_the_sweep(real_prefect_server, image_root, tmp_path):
    """`dask scheduler` and `dask worker` (2 processes) started in a folder that is not the project's, without
    PREFECT_API_URL; params with relative paths, in a third folder: every run finishes, no worker starts a
    server."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    params = sweep_params(image_root, project, datasets=["toy-a"], methods=["zero_shot", *ORDER_DEPENDENT],
                          runs_per_task=2)
    config = yaml.safe_load(params.read_text())
    config["paths"] = {"results": "results", "prepared": "data/prepared", "features": "data/features",
                       "cache": ".cache"}
    config["mlflow"] = {"db": "mlflow.db", "artifacts": "mlartifacts", "experiment": "test"}
    params.write_text(yaml.safe_dump(config))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = sweep_env(PREFECT_HOME=str(elsewhere / "prefect"))
    scheduler = start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                       "--dashboard-address", ":0"], env, elsewhere / "scheduler.log", cwd=elsewhere)
    workers = start(["distributed.cli.dask_worker", address, "--nworkers", "2", "--nthreads", "1",
                     "--dashboard-address", ":0"], env, elsewhere / "workers.log", cwd=elsewhere)
    try:
        log = tmp_path / "sweep.log"
        sweep = start(["flows.sweep", "--params", str(params), "--runner", "dask", "--address", address],
                      sweep_env(PREFECT_API_URL=real_prefect_server), log, cwd=tmp_path)
        output = finish(sweep, log)
        assert sweep.returncode == 0, output[-3000:] + (elsewhere / "workers.log").read_text()[-3000:]
        assert not servers_in_session(workers.pid)
    finally:
        for process in (workers, scheduler):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    n_runs = len(expand_plan(load_settings(params)))
    assert len(ResultsLayout(project / "results").summaries()) == n_runs == 6
    assert not (elsewhere / "results").exists() and (project / "mlflow.db").is_file()
    assert_every_run_logged_once(project, n_runs)


@pytest.mark.slow
def test_a_killed_flow_leaves_no_run_unlogged_and_its_parent_is_closed(real_prefect_server, long_images, tmp_path):
    """kill -9 of the whole sweep (flow and workers) while a batch has finished runs it has not logged yet; the
    rerun logs them from their files, computes the rest, logs every run exactly once and closes the dead parent."""
    params = long_params(long_images, tmp_path, runner="process", workers=1, runs_per_task=8)
    env = sweep_env(PREFECT_API_URL=real_prefect_server)
    runs_dir = tmp_path / "results" / "runs"
    sweep = start(["flows.sweep", "--params", str(params)], env, tmp_path / "first.log")
    deadline = time.time() + 240
    while len(list(runs_dir.rglob("*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(sweep.pid, signal.SIGKILL)  # kill -9 mid-batch: 2 runs on disk, none logged (a batch logs at its end)
    sweep.wait()
    finished = len(ResultsLayout(tmp_path / "results").summaries())
    children, parents = mlflow_runs(tmp_path)
    unlogged = finished - len(children)
    assert 2 <= finished < 8 and unlogged > 0 and list(parents["status"]) == ["RUNNING"]

    rerun = start(["flows.sweep", "--params", str(params)], env, tmp_path / "second.log")
    output = finish(rerun, tmp_path / "second.log")
    assert rerun.returncode == 0, output[-3000:]
    children, parents = assert_every_run_logged_once(tmp_path, 8)
    status = dict(zip(parents["tags.sweep_id"], parents["status"]))
    assert sorted(status.values()) == ["FINISHED", "KILLED"]
    recovered = children[children["tags.recovered"] == "true"]
    assert len(recovered) == unlogged == parents["metrics.recovered"].max() and "closed as KILLED" in output


def test_batches_cover_the_plan_once_and_chain_an_order_independent_methods_orderings(image_root, tmp_path):
    from flows.sweep import plan_batches

    def batches_of(**sweep):
        params = sweep_params(image_root, tmp_path, datasets=["toy-a"], methods=["zero_shot", "tpt", "dynaprompt"],
                              view_seeds=[0, 1, 2], workers=2, **sweep)
        settings = load_settings(params)
        plan = expand_plan(settings)
        batches = plan_batches(plan, settings)
        batched = [k for b in batches for k in b.keys]
        assert len(batched) == len(set(batched)) and set(batched) == {k for k, _ in plan}  # every run, once
        for batch in batches:
            assert {(k.dataset, k.method) for k in batch.keys} == {(batch.dataset, batch.method)}
        return {method: [[k.cell for k in b.keys] for b in batches if b.method == method]
                for method in ("zero_shot", "tpt", "dynaprompt")}

    small = batches_of(runs_per_task=2)
    # an order-independent method: one task per seed, holding every ordering (the first computes, the others reorder)
    assert small["tpt"] == small["zero_shot"] == [["shuffle-0", "shuffle-1"], ["shuffle-0~seed1", "shuffle-1~seed1"],
                                                  ["shuffle-0~seed2", "shuffle-1~seed2"]]
    assert [len(cells) for cells in small["dynaprompt"]] == [2, 2, 2]  # runs_per_task at a time
    assert [len(cells) for cells in batches_of(runs_per_task=10)["dynaprompt"]] == [3, 3]  # spread over 2 workers


def test_the_dead_sweeps_parent_is_closed_and_missing_results_logged_once(image_root, tmp_path):
    """Tracker level: a RUNNING parent whose sweep lock is free is closed KILLED, one whose lock is held is left;
    results on disk that the store lacks are logged once, however often asked."""
    from dynaprompt.results import FileLock
    from tasks.runs import run_one
    from tasks.tracking import SweepTracker

    params = sweep_params(image_root, tmp_path, datasets=["toy-a"], methods=["online_tpt"])
    for cell in ("shuffle-0", "shuffle-1"):
        assert "error" not in run_one(str(params), "toy-a", "online_tpt", cell)
    layout = ResultsLayout(tmp_path / "results")
    live, dead = FileLock(tmp_path / "live.lock"), tmp_path / "dead.lock"
    live.acquire()
    try:
        tracker = SweepTracker(tmp_path / "mlflow.db", tmp_path / "mlartifacts", "test")
        for name, lock in (("live", live.path), ("dead", dead)):
            SweepTracker(tmp_path / "mlflow.db", tmp_path / "mlartifacts", "test").start_sweep(
                name, name, {}, name, tags={"sweep_lock": str(lock)})
        closed = tracker.close_dead_sweeps(lambda tags: FileLock(tags["sweep_lock"]).held(), "sweep now")
        tracker.start_sweep("now", "now", {}, "now")
        assert tracker.log_missing(layout) == 2 and tracker.log_missing(layout) == 0
    finally:
        live.release()
    children, parents = mlflow_runs(tmp_path)
    status = dict(zip(parents["tags.sweep_id"], parents["status"]))
    assert status == {"live": "RUNNING", "dead": "KILLED", "now": "RUNNING"} and len(closed) == 1
    assert len(children) == 2 and set(children["tags.recovered"]) == {"true"}
    assert set(children["tags.fingerprint"]) == {s.fingerprint for s in layout.summaries()}


def test_an_experiment_in_a_temporary_copy_logs_to_the_workspaces_store(tmp_path, monkeypatch):
    """`dvc exp run --temp` works in <workspace>/.dvc/tmp/exps/<tmp>/ and exports DVC_ROOT=<workspace>."""
    from tasks.tracking import in_workspace

    workspace = tmp_path / "workspace"
    copy = workspace / ".dvc" / "tmp" / "exps" / "tmpabc"
    (copy / ".dvc").mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    assert in_workspace(copy / "mlflow.db") == workspace.resolve() / "mlflow.db"
    assert in_workspace(copy / "sub" / "store.db") == workspace.resolve() / "sub" / "store.db"
    assert in_workspace(workspace / "mlflow.db") == (workspace / "mlflow.db").resolve()  # `dvc repro` itself
    assert in_workspace(tmp_path / "elsewhere.db") == (tmp_path / "elsewhere.db").resolve()  # outside any copy
    monkeypatch.delenv("DVC_ROOT")
    assert in_workspace(copy / "mlflow.db") == (copy / "mlflow.db").resolve()


@pytest.mark.slow
def test_dvc_exp_run_temp_finds_the_workspaces_mlflow_store(tmp_path):
    """A real `dvc exp run --temp`: its stage resolves params' relative `mlflow.db` to the workspace's file, and
    sees the experiment's name."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "params.yaml").write_text(yaml.safe_dump({"mlflow": {"db": "mlflow.db",
                                                                      "artifacts": "mlartifacts"}}))
    seen = tmp_path / "seen.txt"  # outside the repository: the stage writes it wherever it runs
    (workspace / "where.py").write_text(
        "import os, sys\n"
        "from pathlib import Path\n"
        "from types import SimpleNamespace\n"
        "from tasks.tracking import mlflow_store\n"
        "settings = SimpleNamespace(base_dir=Path.cwd(), mlflow=SimpleNamespace(db='mlflow.db', "
        "artifacts='mlartifacts'))\n"
        "Path(sys.argv[1]).write_text(f\"{mlflow_store(settings)[0]}|{os.environ.get('DVC_EXP_NAME')}|"
        "{Path.cwd()}\")\n")
    (workspace / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"where": {
        "cmd": f"{sys.executable} where.py {seen}", "deps": ["where.py"], "params": ["mlflow"]}}}))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT)}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                    ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                    [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", "where-exp"]):
        done = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    store, name, cwd = seen.read_text().split("|")
    assert Path(cwd).resolve() != workspace.resolve()  # it ran in a temporary copy ...
    assert Path(store) == (workspace / "mlflow.db").resolve() and name == "where-exp"  # ... logging to the workspace


def test_a_worker_finds_the_params_in_its_own_checkout_and_never_a_stale_copy(tmp_path, monkeypatch):
    """The head's checkout at one path, a worker's at another (a shared filesystem mounted elsewhere): the worker
    reads its checkout's copy when it holds the same params, and stops with one error naming the paths when not."""
    from tasks import runs

    head, worker = tmp_path / "mnt" / "project", tmp_path / "shared" / "project"
    for checkout in (head, worker):
        (checkout / "configs").mkdir(parents=True)
        (checkout / "configs" / "toy.yaml").write_text("sweep: {workers: 2}\n")
    monkeypatch.setattr(runs, "PROJECT_ROOT", head)
    reference = runs.params_reference(head / "configs" / "toy.yaml")
    assert reference["in_checkout"] == "configs/toy.yaml"
    monkeypatch.setattr(runs, "PROJECT_ROOT", worker)
    (head / "configs" / "toy.yaml").unlink()  # not visible at the head's path from this worker
    runs.located_params.cache_clear()
    assert runs.located_params(**reference) == str(worker / "configs" / "toy.yaml")
    (worker / "configs" / "toy.yaml").write_text("sweep: {workers: 3}\n")  # a stale copy
    runs.located_params.cache_clear()
    with pytest.raises(FileNotFoundError, match="different content"):
        runs.located_params(**reference)
    runs.located_params.cache_clear()


def test_local_dask_workers_keep_glibcs_default_trimming_and_no_profiler(monkeypatch):
    """Dask's nanny would set MALLOC_TRIM_THRESHOLD_=65536 in every worker (a run's samples 20-25% slower)."""
    import copy

    import dask
    import distributed  # noqa: F401  (its defaults in dask's config)

    from dynaprompt.specs import ModelSpec, SweepConfig
    from tasks.gpu import dask_runner

    monkeypatch.setattr(dask.config, "config", copy.deepcopy(dask.config.config))
    dask_runner(SweepConfig(workers=2), ModelSpec(device="cpu"))
    environ = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert "MALLOC_TRIM_THRESHOLD_" not in environ and environ["OMP_NUM_THREADS"] == 1
    assert dask.config.get("distributed.worker.profile.enabled") is False
    assert dask_runner(SweepConfig(), ModelSpec(device="cpu"), "tcp://head:8786").address == "tcp://head:8786"


def test_runs_asking_for_the_model_at_once_share_one_load(image_root, tmp_path, monkeypatch):
    """The thread runner's runs start together: one load, one model (two loads of a seeded random model at once
    drew from torch's global generator in turn, and gave two different models)."""
    import threading

    from tasks import runs

    params = str(sweep_params(image_root, tmp_path))
    loads, real = [], runs.load_model

    def slow_load(settings):
        loads.append(settings)
        time.sleep(0.5)
        return real(settings)

    runs.clear_caches()
    monkeypatch.setattr(runs, "load_model", slow_load)
    models = []
    threads = [threading.Thread(target=lambda: models.append(runs.shared_clip(params))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runs.clear_caches()
    assert len(loads) == 1 and len(models) == 3 and all(model is models[0] for model in models)


def test_a_long_lived_worker_reads_changed_params_and_a_changed_registry_again(image_root, tmp_path):
    """A Dask worker outlives sweeps: its cached settings follow the params file and the orderings registry."""
    import json

    from tasks import runs

    params = sweep_params(image_root, tmp_path, workers=2)
    runs.clear_caches()
    first = runs.run_settings(str(params))
    assert runs.run_settings(str(params)) is first and first.sweep.workers == 2
    registry = ResultsLayout(tmp_path / "results").orderings_registry
    registry.parent.mkdir(parents=True, exist_ok=True)
    registry.write_text(json.dumps({"orderings": []}))  # a scheduled sweep wrote the registry
    assert runs.run_settings(str(params)) is not first
    config = yaml.safe_load(params.read_text())
    config["sweep"]["workers"] = 3
    params.write_text(yaml.safe_dump(config))
    assert runs.run_settings(str(params)).sweep.workers == 3
    runs.clear_caches()
