"""The sweep flow: every planned (dataset, method, ordering) as one Prefect task, lineage in MLflow.

    python -m flows.sweep [--params params.yaml] [--runner thread|dask] [--address tcp://host:8786]
    python -m flows.sweep --add-orderings K      # a scheduled robustness sweep: K new orderings per kind

Without --add-orderings it runs the fixed plan of params.yaml (what `dvc repro` reproduces). Finished runs are
skipped (same fingerprint, records on disk), so a sweep killed mid-way completes on the next start without
recomputing anything; order-independent methods compute once per dataset and are reordered.
With --add-orderings it first finishes orderings a killed scheduled sweep left pending, then draws new ones
(seeds no ordering used) for the (dataset, method) pairs whose interval is still wider than
`sweep.schedule.target_half_width`, runs them, and marks them complete; with every pair on target it does nothing.

Two sweeps may share a results folder at once (a scheduled run that outlasts its interval, a run by hand next to
a scheduled one): each holds its liveness lock for its whole life, so neither takes over the other's pending
orderings; a run both plan is computed by one while the other waits and reuses it (tasks.runs); each result is
logged to MLflow once (tasks.tracking).
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

from prefect import flow
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

import flows  # noqa: F401  (offline Prefect/MLflow defaults before prefect is imported)
from dynaprompt.config import load_settings
from dynaprompt.plan import expand_plan, seed_keys, view_seeds
from dynaprompt.registry import OrderingRegistry, with_registered
from dynaprompt.results import ResultsLayout, RunKey
from dynaprompt.schema import ParamsError
from dynaprompt.specs import Settings
from tasks.evidence import draw_orderings
from tasks.gpu import dask_runner, process_runner
from tasks.runs import clear_caches, run_task
from tasks.tracking import SweepTracker


def task_runner(settings: Settings, runner: str | None = None, address: str | None = None):
    """Prefect's process pool (CPU runs hold the GIL between small ops: threads scale ~1.3-1.5x on 2 cores;
    on a GPU node one pinned process per GPU x workers_per_gpu) or thread pool locally; prefect-dask's
    DaskTaskRunner on a cluster (dask-cuda's LocalCUDACluster on a GPU node without an address)."""
    config = settings.sweep
    runner = runner or config.runner
    if runner == "process":
        return process_runner(config, settings.model)
    if runner == "thread":
        return ThreadPoolTaskRunner(max_workers=config.workers)
    return dask_runner(config, settings.model, address)


def submission_order(plan: list, settings: Settings) -> list:
    """Each run with the run it waits for: an order-independent method's later orderings wait for its first,
    which computes the records they all share."""
    first_of, ordered = {}, []
    for key, _group in plan:
        wait_for = None
        if settings.method(key.method).order_independent:
            wait_for = first_of.get((key.dataset, key.method, key.seed))
            first_of.setdefault((key.dataset, key.method, key.seed), key)
        ordered.append((key, wait_for))
    return ordered


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
def sweep(params_file: str = "params.yaml", add_orderings: int = 0) -> dict:
    """Run the planned runs (or, with add_orderings, new orderings until the intervals are tight)."""
    params_path = Path(params_file).resolve()
    settings = load_settings(params_path)
    layout = ResultsLayout(settings.path("results"))
    sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with layout.sweep_lock(sweep_id):  # held while this sweep lives: its pending orderings stay its own
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
            with layout.lock():  # another sweep may be rewriting the folder's shared files
                layout.write_plan(plan)

        tracker = SweepTracker(settings.base_dir / settings.mlflow.db,
                               settings.base_dir / settings.mlflow.artifacts, settings.mlflow.experiment)
        description = (f"{len(plan)} runs of {params_path.name}"
                       + (f", new orderings {', '.join(e.name for e in added)}" if added else ", the params' plan"))
        tracker.start_sweep(f"sweep {sweep_id}", sweep_id, {
            "params_file": str(params_path), "runs": len(plan), "runner": settings.sweep.runner,
            "workers": settings.sweep.workers, "added_orderings": ",".join(e.name for e in added) or "none",
            "model.arch": settings.model.arch, "model.pretrained": settings.model.pretrained,
        }, description)
        with layout.lock():
            layout.write_sweep_record({"sweep_id": sweep_id, "mlflow_run_id": tracker.parent_id})
        print_estimate(settings)
        futures, by_key = {}, {}
        for key, wait_for in submission_order(plan, settings):
            future = run_task.submit(str(params_path), key.dataset, key.method, key.cell,
                                     wait_for=[by_key[wait_for]] if wait_for else None)
            futures[future], by_key[key] = key, future

        failed, computed, reused, start = {}, 0, 0, time.perf_counter()
        for done, future in enumerate(as_completed(list(futures)), start=1):
            key = futures[future]
            try:
                outcome = future.result()
            except Exception as error:  # noqa: BLE001 -- a failed run is reported, the others go on
                failed[key] = f"{key.label}: {error}"
                print(f"[{done}/{len(plan)}] {key.label} FAILED: {error}", flush=True)
                continue
            summary = outcome["summary"]
            if outcome["reused"]:
                reused += 1
            else:
                computed += 1
                tracker.log_run(summary, Path(outcome["records"]), Path(outcome["records"]).with_suffix(".json"))
            how = "reused" if outcome["reused"] else f"{summary['wall_seconds']:.1f}s"
            print(f"[{done}/{len(plan)}] {key.label} accuracy={summary['accuracy']:.4f} ({how})", flush=True)

        with layout.lock():  # the last sweep to end writes every run finished by then
            layout.write_runs_table(layout.summaries())
        if added:
            registry.complete([e.name for e in added if not any(k in failed for k in entry_runs(settings, e))])
        seconds = time.perf_counter() - start
        tracker.end_sweep("FAILED" if failed else "FINISHED", {
            "runs": len(plan), "computed": computed, "reused": reused, "failed": len(failed), "seconds": seconds,
            **mean_accuracy_metrics(layout, plan)})
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(plan)} runs failed (finished runs are kept):\n"
                               + "\n".join(failed.values()))
        print(f"sweep {sweep_id}: {len(plan)} runs ({computed} computed, {reused} reused) in {seconds:.0f}s "
              f"-> {layout.root}\nMLflow: mlflow ui --backend-store-uri {tracker.uri} --host 127.0.0.1 "
              f"--port 5000 --workers 1, then http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs"
              "?workflowType=machine_learning")
        return {"runs": len(plan), "computed": computed, "reused": reused, "added": [e.name for e in added]}


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
    """The sweep flow with the task runner of params (or the one given here)."""
    settings = load_settings(params_file)  # params checked here, before Prefect starts anything
    return sweep.with_options(task_runner=task_runner(settings, runner, address))(params_file, add_orderings)


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
