"""MLflow lineage: one parent run per sweep, one child run per computed (dataset, method, ordering).

What a researcher sees in the UI:
- the experiment opens on its runs (its kind is model training, not GenAI);
- every result is logged once: a sweep that reuses a finished result logs no new run for it (the run that
  computed it, found by its fingerprint, keeps standing for it); the parent counts what it computed and reused;
- runs carry their real start and end times, the effective settings as params, the git commit, the sweep id,
  the user, and the records and summary as artifacts;
- the block metric is `accuracy_block<N>` (N = samples per block), one step per block, timestamped when the
  block's last sample finished;
- the parent holds per-method summary metrics; the report stage adds the report to it.

Nothing is missed: results are logged from their files (the summary JSON and the records), by fingerprint, not
only by the process that was alive when they finished. A sweep starts by closing the parents of dead sweeps
(RUNNING, their sweep lock free) as KILLED, and by logging every finished result of its results folder that the
store lacks (`log_missing`); results that reach it as reused but are missing are logged the same way.

Two sweeps may write to one sqlite store at once: every tracker's store access holds an OS lock on `<db>.lock`,
so the first open of a fresh database (MLflow creates its schema then, and two processes creating it at once
collide) happens once, and a result is logged once: right before logging, under that lock, the store is asked
again whether its fingerprint is already there (another sweep may have logged it since this one started).

`dvc exp run --temp` (and `--queue`) runs a stage in a temporary copy of the repository that is deleted after it;
a store relative to the params file would be written there and lost. DVC exports the workspace's root to the
stage as DVC_ROOT: a store inside the copy is mapped to the same place in the workspace (`mlflow_store`), and the
parent carries the experiment's name (DVC_EXP_NAME) as the tag `dvc.exp_name`.
"""
from __future__ import annotations

import getpass
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from dynaprompt.results import FileLock, ResultsLayout
from tasks.environment import PROJECT_ROOT, configure_environment

configure_environment()

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

EXPERIMENT_DESCRIPTION = (
    "Sample-order robustness of test-time prompt tuning of CLIP. Parent runs are sweeps; their children are "
    "runs named dataset/method/ordering. Compare children on `accuracy` and on the per-block curve "
    "`accuracy_block<N>` (one step = one block of N samples along the stream)."
)


def mlflow_store(settings) -> tuple[Path, Path]:
    """(database, artifacts folder) of `mlflow:` in params, resolved against the params file; the workspace's
    when the params file is in a DVC experiment's temporary copy of the repository."""
    return (in_workspace(settings.base_dir / settings.mlflow.db),
            in_workspace(settings.base_dir / settings.mlflow.artifacts))


def in_workspace(path: Path) -> Path:
    """`path`, or where it lies in the workspace (DVC_ROOT) when it lies in another repository root (the temporary
    copy `dvc exp run --temp` works in, found as the nearest folder above holding `.dvc/`)."""
    path = Path(path).resolve()
    if not os.environ.get("DVC_ROOT"):
        return path
    workspace = Path(os.environ["DVC_ROOT"]).resolve()
    copy = next((folder for folder in path.parents if (folder / ".dvc").is_dir()), None)
    if copy is None or workspace not in copy.parents:  # the workspace itself, or a path outside any copy of it
        return path
    return workspace / path.relative_to(copy)


def tracking_uri(db_file: Path) -> str:
    """sqlite URI with an absolute path (four slashes), as MLflow needs."""
    return f"sqlite:///{Path(db_file).resolve()}"


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The checked-out commit (with '-dirty' when the work tree has changes), or None outside a repository."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def store_lock(db_file: Path) -> FileLock:
    """The lock every tracker holds while it reads or writes the store at `db_file`."""
    db_file = Path(db_file).resolve()
    return FileLock(db_file.with_name(db_file.name + ".lock"))


def block_metric_name(block_size: int) -> str:
    return f"accuracy_block{block_size}"


class SweepTracker:
    """Writes a sweep's runs to MLflow from the flow's own thread (sqlite dislikes concurrent writers)."""

    def __init__(self, db_file: Path, artifacts: Path, experiment: str):
        Path(db_file).parent.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri(db_file)
        self.store_lock = store_lock(db_file)
        with self.store_lock:  # MLflow creates a fresh database's schema here, and the experiment if missing
            self.client = MlflowClient(tracking_uri=self.uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=Path(artifacts).resolve().as_uri())
            self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
            self.client.set_experiment_tag(self.experiment_id, "mlflow.note.content", EXPERIMENT_DESCRIPTION)
            self.logged = self.logged_fingerprints()
        self.parent_id: str | None = None
        self.common_tags: dict = {}

    def logged_fingerprints(self) -> dict:
        """fingerprint -> run id of every run result already in the store."""
        runs = self.client.search_runs([self.experiment_id], filter_string="tags.fingerprint != ''",
                                       max_results=50000)
        return {run.data.tags["fingerprint"]: run.info.run_id for run in runs}

    def logged_run(self, fingerprint: str) -> str | None:
        """The run already standing for `fingerprint`, seen by this tracker or, since it started, logged by another
        sweep's (the caller holds the store lock)."""
        if fingerprint not in self.logged:
            found = self.client.search_runs([self.experiment_id], filter_string=f"tags.fingerprint = '{fingerprint}'",
                                            max_results=1)
            if found:
                self.logged[fingerprint] = found[0].info.run_id
        return self.logged.get(fingerprint)

    def is_logged(self, fingerprint: str) -> bool:
        """Whether a run stands for `fingerprint` in the store (asked under the store lock when not known here)."""
        if fingerprint in self.logged:
            return True
        with self.store_lock:
            return self.logged_run(fingerprint) is not None

    def close_dead_sweeps(self, alive, closer: str) -> list[str]:
        """Mark the parents of dead sweeps KILLED: RUNNING parents whose sweep `alive(tags)` says is gone. Each ends
        when its last child ended (its start if it has none) and names `closer`; their run ids."""
        closed = []
        with self.store_lock:
            running = self.client.search_runs([self.experiment_id], max_results=10000,
                                              filter_string="tags.kind = 'sweep' and attributes.status = 'RUNNING'")
            for parent in running:
                if alive(parent.data.tags):
                    continue
                last = self.client.search_runs([self.experiment_id], max_results=1,
                                               filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                               order_by=["attributes.end_time DESC"])
                end = max([parent.info.start_time] + [run.info.end_time or 0 for run in last])
                self.client.set_tag(parent.info.run_id, "closed_by", closer)
                self.client.set_terminated(parent.info.run_id, status="KILLED", end_time=end)
                closed.append(parent.info.run_id)
        return closed

    def start_sweep(self, name: str, sweep_id: str, params: dict, description: str, tags: dict | None = None) -> str:
        """The sweep's parent run, RUNNING; `tags` say how to tell whether it is still alive (its lock, host, pid)."""
        self.common_tags = {"sweep_id": sweep_id, "mlflow.user": getpass.getuser(),
                            "mlflow.source.name": "flows/sweep.py", "mlflow.source.type": "LOCAL"}
        commit = git_commit()
        if commit:
            self.common_tags["mlflow.source.git.commit"] = commit
        if os.environ.get("DVC_EXP_NAME"):  # run by `dvc exp run`: the experiment's name
            self.common_tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
        with self.store_lock:
            run = self.client.create_run(self.experiment_id, run_name=name, tags={
                **self.common_tags, **(tags or {}), "kind": "sweep", "mlflow.note.content": description})
            self.parent_id = run.info.run_id
            self.client.log_batch(self.parent_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return self.parent_id

    def log_run(self, summary: dict, records_file: Path, summary_file: Path, recovered: bool = False) -> str | None:
        """A child run for a finished result; None (nothing logged) when its fingerprint is already in the store,
        checked again right before logging (under the store lock, so two sweeps never both log it). `recovered`:
        logged from its files, computed by an earlier sweep that did not log it."""
        with self.store_lock:
            if self.logged_run(summary["fingerprint"]) is not None:
                return None
            return self._log_child(summary, records_file, summary_file, recovered)

    def log_missing(self, layout: ResultsLayout) -> int:
        """Log every finished result under `layout` that the store lacks (its sweep ended, or died, before it logged
        it) as a child of this sweep, tagged `recovered`; how many. The caller makes sure no live sweep is about to
        log them itself."""
        with self.store_lock:
            self.logged = self.logged_fingerprints()
        count = 0
        for summary in layout.summaries():
            if summary.fingerprint not in self.logged:
                key = summary.key
                count += self.log_run(asdict(summary), layout.records(key), layout.summary(key), True) is not None
        return count

    def _log_child(self, summary: dict, records_file: Path, summary_file: Path, recovered: bool) -> str:
        cell = summary["ordering"] if summary.get("seed") is None else f"{summary['ordering']}~seed{summary['seed']}"
        name = f"{summary['dataset']}/{summary['method']}/{cell}"
        device = summary.get("device_info") or {}
        tags = {**self.common_tags, "mlflow.parentRunId": self.parent_id, "run_key": name, "kind": "run",
                "device": summary.get("device", "cpu"), "device.name": str(device.get("name", "")),
                "device.cuda": str(device.get("cuda", "")), "device.driver": str(device.get("driver", "")),
                "fingerprint": summary["fingerprint"], "dataset": summary["dataset"], "method": summary["method"],
                "ordering": summary["ordering"], "order_independent": str(summary["order_independent"]).lower(),
                "view_seed": str(summary.get("view_seed", "")), "cell": cell,
                "mlflow.note.content": f"{summary['method']} ({summary['method_kind']}) on {summary['dataset']}, "
                                       f"ordering {summary['ordering']} ({summary['ordering_kind']})"}
        if recovered:
            tags["recovered"] = "true"
            tags["mlflow.note.content"] += ("; computed by an earlier sweep that ended before logging it, logged "
                                            f"from its files by sweep {self.common_tags['sweep_id']}")
        start_ms = int(summary["started_at"] * 1000)
        run = self.client.create_run(self.experiment_id, run_name=name, start_time=start_ms, tags=tags)
        run_id = run.info.run_id
        params = {k: summary[k] for k in ("dataset", "method", "method_kind", "ordering", "ordering_kind",
                                          "weights", "device", "view_seed")}
        params.update(summary["settings"])
        end_ms = int(summary["ended_at"] * 1000)
        metrics = [Metric(k, float(summary[k]), end_ms, 0)
                   for k in ("accuracy", "n", "seconds_per_sample", "wall_seconds")]
        metrics += self.block_metrics(summary, records_file)
        self.client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        artifacts = get_artifact_repository(run.info.artifact_uri)  # the run's store, looked up once for both files
        artifacts.log_artifact(str(records_file), "records")
        artifacts.log_artifact(str(summary_file), "records")
        self.client.set_terminated(run_id, end_time=end_ms)
        self.logged[summary["fingerprint"]] = run_id
        return run_id

    @staticmethod
    def block_metrics(summary: dict, records_file: Path) -> list[Metric]:
        """Accuracy per block, step = block index, timestamp = when the block's last sample finished."""
        import pandas as pd

        seconds = pd.read_parquet(records_file, columns=["seconds"])["seconds"].cumsum().to_numpy()
        size, start, span = summary["block_size"], summary["started_at"], summary["wall_seconds"]
        scale = span / seconds[-1] if len(seconds) and seconds[-1] > 0 else 0.0  # wall time includes I/O
        name = block_metric_name(size)
        ends = [seconds[min((step + 1) * size, len(seconds)) - 1] for step in range(len(summary["block_accuracy"]))]
        return [Metric(name, float(value), int(1000 * (start + scale * end)), step)
                for step, (value, end) in enumerate(zip(summary["block_accuracy"], ends))]

    def end_sweep(self, status: str, metrics: dict) -> None:
        now = int(time.time() * 1000)
        with self.store_lock:
            self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
            self.client.set_terminated(self.parent_id, status=status)


def attach_report(db_file: Path, experiment: str, sweep_run_id: str, files: list[Path]) -> None:
    """The report's files as artifacts of the sweep's parent run (called by the report stage)."""
    with store_lock(db_file):
        client = MlflowClient(tracking_uri=tracking_uri(db_file))
    for file in files:
        client.log_artifact(sweep_run_id, str(file), artifact_path="report")


__all__ = ["SweepTracker", "attach_report", "block_metric_name", "mlflow", "mlflow_store", "tracking_uri", "RunTag"]
