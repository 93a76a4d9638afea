"""The sweep flow: every planned (dataset, method, ordering) run, in batches of Prefect tasks, lineage in MLflow.

    python -m flows.sweep [--params params.yaml] [--runner process|thread|dask] [--address tcp://host:8786]
    python -m flows.sweep --add-orderings K      # a scheduled robustness sweep: K new orderings per kind

Without --add-orderings it runs the fixed plan of params.yaml (what `dvc repro` reproduces). Finished runs are
skipped (same fingerprint, records on disk), so a sweep killed mid-way completes on the next start without
recomputing anything; order-independent methods compute once per dataset and seed and are reordered.
With --add-orderings it first finishes orderings a killed scheduled sweep left pending, then draws new ones
(seeds no ordering used) for the (dataset, method) pairs whose interval is still wider than
`sweep.schedule.target_half_width`, runs them, and marks them complete; with every pair on target it does nothing.

What a run costs besides its samples is paid per batch, not per run: a task runs several runs of one (dataset,
method) in one worker (`tasks.runs.run_batch`): all orderings of an order-independent method under one seed (the
first computes the shared records, the others reorder them: nothing waits on another task), and an
order-dependent method's runs `sweep.runs_per_task` at a time. Each run is still stored, checkpointed,
fingerprinted, logged and reported on its own.

A lost worker (killed, out of memory) never fails the sweep. Under Dask its nanny starts a new worker and the
scheduler runs the lost task again; a process pool that breaks is replaced by a fresh one and the batches it
lost are submitted again, up to `sweep.lost_worker_retries` times. A run resumes from its last checkpoint.

One Prefect server per sweep (`tasks.server`): the one PREFECT_API_URL names, else one the sweep starts; its
workers never start their own. MLflow misses nothing and duplicates nothing (`tasks.tracking`): a sweep closes dead
sweeps' parents, logs finished results the store lacks, and logs each result once, by fingerprint.

Two sweeps may share a results folder at once (a scheduled run that outlasts its interval, a run by hand next to
a scheduled one): each holds its liveness lock for its whole life, so neither takes over the other's pending
orderings; a run both plan is computed by one while the other waits and reuses it (tasks.runs); each result is
logged to MLflow once (tasks.tracking), by the sweep that computed it while that sweep lives.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

import flows  # noqa: F401  (offline Prefect/MLflow defaults before prefect is imported)
from dynaprompt.config import load_settings
from dynaprompt.plan import expand_plan, ordering_table, seed_keys, view_seeds
from dynaprompt.registry import OrderingRegistry, with_registered
from dynaprompt.results import FileLock, ResultsLayout, RunKey
from dynaprompt.schema import ParamsError
from dynaprompt.specs import Settings
from tasks.evidence import draw_orderings
from tasks.gpu import dask_runner, process_runner
from tasks.runs import clear_caches, params_reference, run_batch
from tasks.server import sweep_api
from tasks.tracking import SweepTracker, mlflow_store


def task_runner(settings: Settings, runner: str | None = None, address: str | None = None):
    """Prefect's process pool (CPU runs hold the GIL between small ops: threads scale ~1.3-1.5x on 2 cores;
    on a GPU node one pinned process per GPU x workers_per_gpu) or thread pool locally; prefect-dask's
    DaskTaskRunner (a LocalCluster whose nanny restarts a lost worker, dask-cuda's LocalCUDACluster on a GPU node,
    or the cluster at `address`)."""
    config = settings.sweep
    runner = runner or config.runner
    if runner == "process":
        return process_runner(config, settings.model)
    if runner == "thread":
        return ThreadPoolTaskRunner(max_workers=config.workers)
    return dask_runner(config, settings.model, address)


@dataclass(frozen=True)
class Batch:
    """Runs of one (dataset, method) that one task runs in order."""

    dataset: str
    method: str
    keys: tuple

    def parameters(self, params: dict) -> dict:
        return {"params": params, "dataset": self.dataset, "method": self.method,
                "cells": [key.cell for key in self.keys]}


def plan_batches(plan: list, settings: Settings) -> list[Batch]:
    """The plan's runs as batches, in plan order: an order-independent method's orderings of one (dataset, seed)
    together (they share one computation), an order-dependent method's runs of one dataset `sweep.runs_per_task`
    at a time, and in at least `sweep.workers` batches where it has that many runs (a short plan still spreads
    one method's runs over the workers)."""
    groups: dict = {}
    for key, _group in plan:
        shared = settings.method(key.method).order_independent
        groups.setdefault((key.dataset, key.method, key.seed if shared else "any", shared), []).append(key)
    batches = []
    for (dataset, method, _seed, shared), keys in groups.items():
        size = len(keys) if shared else min(settings.sweep.runs_per_task, -(-len(keys) // settings.sweep.workers))
        batches += [Batch(dataset, method, tuple(keys[i:i + size])) for i in range(0, len(keys), size)]
    return batches


def lost_worker_errors() -> tuple:
    """What a task's future raises when its worker died under it: a broken process pool, or a task Dask gave up
    on after its workers died `distributed.scheduler.allowed-failures` times."""
    from concurrent.futures.process import BrokenProcessPool

    from distributed import KilledWorker

    return BrokenProcessPool, KilledWorker


def run_batches(batches: list[Batch], params: dict, make_runner, retries: int, record) -> int:
    """Run every batch on a runner from `make_runner()`, handing each run's outcome to `record(key, outcome)`.
    Batches lost with their worker go to a fresh runner, `retries` times at most, then are recorded as failed.
    How many times a runner was replaced."""
    lost_worker, pending = lost_worker_errors(), list(batches)
    for attempt in range(retries + 1):
        lost = []
        with started(make_runner()) as runner:
            futures = {runner.submit(run_batch, batch.parameters(params)): batch for batch in pending}
            for future in as_completed(list(futures)):
                batch = futures[future]
                try:
                    outcomes = future.result()
                except lost_worker as error:
                    lost.append((batch, error))
                    continue
                except Exception as error:  # noqa: BLE001 -- the task itself failed: each of its runs is reported
                    outcomes = [{"cell": key.cell, "error": f"{key.label}: {error}"} for key in batch.keys]
                for key, outcome in zip(batch.keys, outcomes):
                    record(key, outcome)
        if not lost:
            return attempt
        runs = sum(len(batch.keys) for batch, _ in lost)
        if attempt < retries:
            print(f"sweep: a worker was lost ({type(lost[0][1]).__name__}: {lost[0][1]}); {runs} runs of "
                  f"{len(lost)} tasks go to a fresh {type(runner).__name__} (retry {attempt + 1} of {retries})",
                  flush=True)
        pending = [batch for batch, _ in lost]
    for batch, error in lost:
        for key in batch.keys:
            record(key, {"cell": key.cell, "error": f"{key.label}: its worker was lost {retries + 1} times "
                                                    f"(sweep.lost_worker_retries: {retries}); last: {error}"})
    return retries


@contextmanager
def started(runner):
    """`runner`, started, and stopped at the end of the block. Stopping fails the sweep only when the block did:
    once every result is in, a cluster that does not close in time (a Dask worker its nanny restarted late, still
    starting) is reported and left behind."""
    runner.__enter__()
    try:
        yield runner
    except BaseException:
        if not runner.__exit__(*sys.exc_info()):
            raise
        return
    try:
        runner.__exit__(None, None, None)
    except Exception as error:  # noqa: BLE001 -- every result is in: a failed shutdown loses nothing
        print(f"sweep: the {type(runner).__name__} did not shut down cleanly ({type(error).__name__}: {error}); "
              "every result was already in", flush=True)


@dataclass
class SweepProgress:
    """What a sweep made of its runs: prints each as it finishes, logs results to MLflow, counts them."""

    tracker: SweepTracker
    layout: ResultsLayout
    sweep_id: str
    total: int
    done: int = 0
    computed: int = 0
    reused: int = 0
    recovered: int = 0
    failed: dict = field(default_factory=dict)

    def record(self, key: RunKey, outcome: dict) -> None:
        self.done += 1
        if "error" in outcome:
            self.failed[key] = outcome["error"]
            print(f"[{self.done}/{self.total}] {key.label} FAILED: {outcome['error']}", flush=True)
            return
        summary, records = outcome["summary"], Path(outcome["records"])
        if outcome["reused"]:
            self.reused += 1
            if not self.tracker.is_logged(summary["fingerprint"]) and alone(self.layout, self.sweep_id):
                # finished by a sweep that is gone (or by this sweep's lost worker) and never logged
                self.recovered += self.tracker.log_run(summary, records, records.with_suffix(".json"),
                                                       recovered=True) is not None
        else:
            self.computed += 1
            self.tracker.log_run(summary, records, records.with_suffix(".json"))
        how = "reused" if outcome["reused"] else f"{summary['wall_seconds']:.1f}s"
        print(f"[{self.done}/{self.total}] {key.label} accuracy={summary['accuracy']:.4f} ({how})", flush=True)

    def log_missing(self) -> None:
        """Log finished results the store lacks, unless another sweep on this folder lives (it logs its own)."""
        if alone(self.layout, self.sweep_id):
            found = self.tracker.log_missing(self.layout)
            if found:
                print(f"sweep: logged {found} finished runs that MLflow lacked (their sweep ended before logging "
                      "them)", flush=True)
            self.recovered += found


def alone(layout: ResultsLayout, sweep_id: str) -> bool:
    """Whether no other sweep on this results folder is alive (holds its sweep lock)."""
    folder = layout.sweep_lock(sweep_id).path.parent
    return not any(FileLock(lock).held() for lock in folder.glob("*.lock") if lock.stem != sweep_id)


def sweep_alive(tags: dict, layout: ResultsLayout) -> bool:
    """Whether the sweep behind an MLflow parent's tags is alive: its sweep lock is held. A lock on another host's
    folder that this host cannot see counts as alive (nothing here can tell)."""
    lock = Path(tags.get("sweep_lock") or layout.sweep_lock(tags.get("sweep_id", "")).path)
    if not lock.parent.is_dir() and tags.get("host", socket.gethostname()) != socket.gethostname():
        return True
    return FileLock(lock).held()


def mean_accuracy_metrics(layout: ResultsLayout, plan: list) -> dict:
    """The parent's summary: mean accuracy over orderings per dataset and method of the main plan."""
    planned = {key for key, group in plan if group in ("main", "added")}
    rows = [s for s in layout.summaries() if s.key in planned]
    out = {}
    for dataset, method in dict.fromkeys((s.dataset, s.method) for s in rows):
        values = [s.accuracy for s in rows if (s.dataset, s.method) == (dataset, method)]
        out[f"mean_accuracy/{dataset}/{method}"] = sum(values) / len(values)
    return out


@flow(name="sweep")
def sweep(params_file: str = "params.yaml", add_orderings: int = 0, runner: str | None = None,
          address: str | None = None) -> dict:
    """Run the planned runs (or, with add_orderings, new orderings until the intervals are tight) on `runner`
    (default: sweep.runner) at `address` (default: sweep.dask_address)."""
    params_path = Path(params_file).resolve()
    settings = load_settings(params_path)
    layout = ResultsLayout(settings.path("results"))
    sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with layout.sweep_lock(sweep_id) as liveness:  # held while this sweep lives: its pending orderings stay its own
        registry = OrderingRegistry(layout.orderings_registry)
        added = []
        if add_orderings:
            added = draw_orderings(settings, layout, add_orderings, sweep_id)
            if not added:
                print("sweep: every (dataset, method) interval is within sweep.schedule.target_half_width; "
                      "nothing to add")
                return {"runs": 0, "computed": 0, "reused": 0, "added": []}
            clear_caches()  # the run tasks must see the new registry entries
            settings = with_registered(settings, registry.entries())
            plan = [(key, "added") for entry in added for key in entry_runs(settings, entry)]
        else:
            plan = expand_plan(settings)
            orderings = ordering_table(settings, plan)  # each stream's orderings: kind, family, label correlation
            with layout.lock():  # another sweep may be rewriting the folder's shared files
                layout.write_plan(plan, orderings)

        tracker = SweepTracker(*mlflow_store(settings), settings.mlflow.experiment)
        for closed in tracker.close_dead_sweeps(lambda tags: sweep_alive(tags, layout), f"sweep {sweep_id}"):
            print(f"sweep: MLflow run {closed} was the parent of a sweep that died; closed as KILLED", flush=True)
        runner = runner or settings.sweep.runner
        description = (f"{len(plan)} runs of {params_path.name}"
                       + (f", new orderings {', '.join(e.name for e in added)}" if added else ", the params' plan"))
        tracker.start_sweep(f"sweep {sweep_id}", sweep_id, {
            "params_file": str(params_path), "runs": len(plan), "runner": runner, "workers": settings.sweep.workers,
            "runs_per_task": settings.sweep.runs_per_task,
            "added_orderings": ",".join(e.name for e in added) or "none",
            "model.arch": settings.model.arch, "model.pretrained": settings.model.pretrained,
        }, description, tags={"sweep_lock": str(liveness.path.resolve()), "host": socket.gethostname(),
                              "pid": str(os.getpid())})
        with layout.lock():
            layout.write_sweep_record({"sweep_id": sweep_id, "mlflow_run_id": tracker.parent_id})
        progress = SweepProgress(tracker, layout, sweep_id, total=len(plan))
        progress.log_missing()
        print_estimate(settings)
        start = time.perf_counter()
        replaced = run_batches(plan_batches(plan, settings), params_reference(params_path),
                               lambda: task_runner(settings, runner, address), settings.sweep.lost_worker_retries,
                               progress.record)
        progress.log_missing()  # runs this sweep reused while their own sweep still lived, if that one is gone now

        with layout.lock():  # the last sweep to end writes every run finished by then
            layout.write_runs_table(layout.summaries())
        failed = progress.failed
        if added:
            registry.complete([e.name for e in added if not any(k in failed for k in entry_runs(settings, e))])
        seconds = time.perf_counter() - start
        tracker.end_sweep("FAILED" if failed else "FINISHED", {
            "runs": len(plan), "computed": progress.computed, "reused": progress.reused,
            "recovered": progress.recovered, "failed": len(failed), "runners_replaced": replaced,
            "seconds": seconds, **mean_accuracy_metrics(layout, plan)})
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(plan)} runs failed (finished runs are kept):\n"
                               + "\n".join(failed.values()))
        print(f"sweep {sweep_id}: {len(plan)} runs ({progress.computed} computed, {progress.reused} reused) in "
              f"{seconds:.0f}s -> {layout.root}\nMLflow: mlflow ui --backend-store-uri {tracker.uri} --host "
              f"127.0.0.1 --port 5000 --workers 1, then http://127.0.0.1:5000/#/experiments/"
              f"{tracker.experiment_id}/runs?workflowType=machine_learning")
        return {"runs": len(plan), "computed": progress.computed, "reused": progress.reused,
                "recovered": progress.recovered, "added": [e.name for e in added]}


def print_estimate(settings: Settings) -> None:
    """`dynaprompt check`'s cost estimate of the plan, before the first run starts (never stops the sweep)."""
    from dynaprompt import check

    try:
        reports = check.check_datasets(settings, [d for d in settings.datasets if used(settings, d)])
        work = check.estimate(settings, reports, check.measured_selection(settings))
    except Exception as error:  # noqa: BLE001 -- an estimate is advice: the sweep goes on without it
        print(f"sweep: no cost estimate ({error})", flush=True)
        return
    print(f"sweep: {check.summary_line(work)}", flush=True)


def used(settings: Settings, dataset: str) -> bool:
    from dynaprompt.plan import needed_views

    return bool(needed_views(settings, dataset))


def entry_runs(settings: Settings, entry) -> list:
    """The runs a registered ordering was drawn for: its (dataset, method) pairs under each of its seeds."""
    seeds = seed_keys(settings, entry.seeds) if entry.seeds else view_seeds(settings)
    return [RunKey(dataset, method, entry.name, seed) for dataset, method in entry.runs for seed in seeds]


def run_sweep(params_file: str = "params.yaml", runner: str | None = None, address: str | None = None,
              add_orderings: int = 0) -> dict:
    """The sweep flow on the runner of params (or the one given here), with one Prefect server for all of it."""
    settings = load_settings(params_file)  # params checked here, before Prefect starts anything
    runner = runner or settings.sweep.runner
    address = (address or settings.sweep.dask_address) if runner == "dask" else None
    with sweep_api(remote_workers=address):
        return sweep(params_file, add_orderings, runner, address)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runner", choices=["process", "thread", "dask"], default=None, help="overrides sweep.runner")
    parser.add_argument("--address", default=None, help="Dask scheduler address (overrides sweep.dask_address)")
    parser.add_argument("--add-orderings", type=int, default=0, metavar="K",
                        help="a scheduled robustness sweep: K new orderings per order-dependent kind")
    args = parser.parse_args(argv)
    try:
        run_sweep(args.params, args.runner, args.address, args.add_orderings)
    except (ParamsError, RuntimeError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
