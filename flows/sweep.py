"""The sweep flow: datasets x methods x orderings, one Prefect task per run, lineage in MLflow.

    python -m flows.sweep [--params params.yaml] [--runner thread|dask] [--address tcp://host:8786]

Finished runs are skipped (same fingerprint, records on disk), so a sweep killed mid-way and started again
completes without recomputing anything; order-independent methods run once per dataset and are reordered.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

import flows  # noqa: F401  (offline Prefect/MLflow defaults before prefect is imported)
from dynaprompt.config import load_params, settings_from_params
from dynaprompt.methods import is_order_independent
from dynaprompt.plan import RunKey, expand_plan
from tasks.runs import run_task
from tasks.tracking import SweepTracker

RUN_COLUMNS = [
    "dataset", "method", "method_kind", "ordering", "ordering_kind", "n", "accuracy", "block_size",
    "block_accuracy", "first_block_accuracy", "last_block_accuracy", "seconds_per_sample", "seconds_total",
    "order_independent", "reused",
]


@dataclass
class SweepConfig:
    """The `sweep:` block of params.yaml."""

    datasets: list | None = None  # default: every dataset and mixture
    methods: list | None = None  # default: every method
    orderings: list | None = None  # default: every ordering
    runner: str = "thread"  # thread | dask
    workers: int = 2  # parallel runs (thread runner; LocalCluster workers for dask without an address)
    threads_per_run: int = 1  # torch threads per run: workers x threads should not exceed the cores
    dask_address: str | None = None  # tcp://scheduler:8786 for an existing Dask cluster
    gpu_slots: int = 1  # runs sharing one GPU at a time (a Prefect global concurrency limit)
    schedule: dict | None = None  # {name, cron}: the deployment of flows/schedule.py


def sweep_config(params: dict) -> SweepConfig:
    from dynaprompt.config import dataclass_from

    return dataclass_from(SweepConfig, params.get("sweep"), "sweep")


def project_paths(params_file: Path, params: dict) -> dict:
    base, paths = params_file.resolve().parent, params.get("paths") or {}
    mlflow_block = params.get("mlflow") or {}
    return {
        "results": base / paths.get("results", "results"),
        "mlflow_db": base / mlflow_block.get("db", "mlflow.db"),
        "mlflow_artifacts": base / mlflow_block.get("artifacts", "mlartifacts"),
        "experiment": mlflow_block.get("experiment", "dynaprompt"),
    }


def task_runner(config: SweepConfig, address: str | None = None):
    """Prefect's thread pool locally; prefect-dask's DaskTaskRunner on a cluster (or a LocalCluster)."""
    if config.runner == "thread":
        return ThreadPoolTaskRunner(max_workers=config.workers)
    if config.runner == "dask":
        from prefect_dask import DaskTaskRunner

        address = address or config.dask_address
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": config.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    raise ValueError(f"sweep.runner must be 'thread' or 'dask', got {config.runner!r}")


def submission_order(plan: list[RunKey], settings) -> list[tuple[RunKey, RunKey | None]]:
    """Each run with the run it must wait for: an order-independent method's later orderings wait for its first,
    which computes the records they all share."""
    first_of: dict[tuple[str, str], RunKey] = {}
    ordered = []
    for key in plan:
        wait_for = None
        if is_order_independent(settings.methods[key.method]):
            group = (key.dataset, key.method)
            wait_for = first_of.get(group)
            first_of.setdefault(group, key)
        ordered.append((key, wait_for))
    return ordered


def runs_table(summaries: list[dict]) -> pd.DataFrame:
    """results/runs.parquet: one row per run."""
    rows = []
    for s in summaries:
        blocks = s["block_accuracy"]
        rows.append({**{k: s.get(k) for k in RUN_COLUMNS}, "first_block_accuracy": blocks[0] if blocks else None,
                     "last_block_accuracy": blocks[-1] if blocks else None})
    return pd.DataFrame(rows, columns=RUN_COLUMNS).sort_values(["dataset", "method", "ordering"], ignore_index=True)


@flow(name="sweep")
def sweep(params_file: str = "params.yaml", address: str | None = None) -> dict:
    """Run every planned (dataset, method, ordering); skip the finished ones; log each to MLflow."""
    from tasks.gpu import gpu_concurrency_limit

    params_path = Path(params_file).resolve()
    params = load_params(params_path)
    settings = settings_from_params(params, base_dir=params_path.parent)
    config = sweep_config(params)
    paths = project_paths(params_path, params)
    plan = expand_plan(settings, {"datasets": config.datasets, "methods": config.methods,
                                  "orderings": config.orderings})
    results = paths["results"]
    results.mkdir(parents=True, exist_ok=True)
    (results / "plan.json").write_text(json.dumps({"runs": [vars(k) for k in plan]}, indent=2))
    gpu_concurrency_limit(settings.model.device, config.gpu_slots)

    tracker = SweepTracker(paths["mlflow_db"], paths["mlflow_artifacts"], paths["experiment"])
    tracker.start_sweep(f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}", {
        "params_file": str(params_path), "runs": len(plan), "runner": config.runner,
        "datasets": sorted({k.dataset for k in plan}), "methods": sorted({k.method for k in plan}),
        "orderings": sorted({k.ordering for k in plan}), "model.arch": settings.model.arch,
        "model.pretrained": settings.model.pretrained,
    })
    futures, by_key = {}, {}
    for key, wait_for in submission_order(plan, settings):
        future = run_task.submit(str(params_path), str(results), key.dataset, key.method, key.ordering,
                                 config.threads_per_run, wait_for=[by_key[wait_for]] if wait_for else None)
        futures[future], by_key[key] = key, future

    summaries, failed, start = [], [], time.perf_counter()
    for done, future in enumerate(as_completed(list(futures)), start=1):
        key = futures[future]
        try:
            summary = future.result()
        except Exception as error:  # noqa: BLE001 -- a failed run is reported, the others go on
            failed.append(f"{key.label}: {error}")
            print(f"[{done}/{len(plan)}] {key.label} FAILED: {error}")
            continue
        summaries.append(summary)
        tracker.log_run(summary, key.records_path(results))
        how = "reused" if summary["reused"] else f"{summary['wall_seconds']:.1f}s"
        print(f"[{done}/{len(plan)}] {key.label} accuracy={summary['accuracy']:.4f} ({how})", flush=True)

    table = runs_table(summaries)
    table.to_parquet(results / "runs.parquet", index=False)
    seconds = time.perf_counter() - start
    tracker.end_sweep("FAILED" if failed else "FINISHED",
                      {"runs": len(plan), "completed": len(summaries), "reused": int(table["reused"].sum()),
                       "seconds": seconds})
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(plan)} runs failed (finished runs are kept):\n" + "\n".join(failed))
    print(f"sweep: {len(plan)} runs ({int(table['reused'].sum())} reused) in {seconds:.0f}s -> {results}")
    return {"runs": len(plan), "reused": int(table["reused"].sum()), "seconds": seconds}


def run_sweep(params_file: str = "params.yaml", runner: str | None = None, address: str | None = None) -> dict:
    """The sweep flow with the task runner named in params (or overridden here)."""
    config = sweep_config(load_params(params_file))
    if runner:
        config.runner = runner
    return sweep.with_options(task_runner=task_runner(config, address))(params_file, address)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runner", choices=["thread", "dask"], default=None, help="overrides sweep.runner")
    parser.add_argument("--address", default=None, help="Dask scheduler address (overrides sweep.dask_address)")
    args = parser.parse_args(argv)
    try:
        run_sweep(args.params, args.runner, args.address)
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
