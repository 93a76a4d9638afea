"""What a run of the sweep costs besides its samples: one Prefect task per run against batches, per runner.

    python -m benchmarks.overhead [--params params.yaml] [--dataset fmnist-pixelate-5] [--methods tda ...]
        [--orderings NAME ...] [--view-seeds 0 ...] [--configs before process dask] [--runs-per-task 10]
        [--workers 1]

Each configuration sweeps the same runs (a training-free method by default: ~1 ms per sample, so a run's samples
are a fraction of a second and everything else shows) from scratch into its own temporary results folder and
MLflow store, as a fresh `python -m flows.sweep` process, reading the data, feature caches and model of
`--params` (run `dvc repro embed` first):

- before: what the sweep did until now, one Prefect task per run on the process pool, with no server of its own
  (every process, the flow and each worker, starts Prefect's temporary server);
- process / dask / thread: the sweep as it is now, on that runner: one Prefect server for the sweep, an
  order-dependent method's runs `--runs-per-task` to a task.

It prints, side by side: the wall time of the whole command, its start-up (launch to the first run's start) and
tail (last run's end to exit), and per run: its samples, and its overhead beyond them on the workers (the
worker-seconds from the first run's start to the last run's end, less the samples), split into what the run
spends outside its samples (model, stream and cache opened, records written: `wall_seconds - seconds_total` of its
summary; an order-independent method's samples are those of its shared run) and what passes between runs (the
Prefect task, scheduling, a worker's start). One worker by default, so that no worker waits for another.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from dynaprompt.schema import with_on_keys

BEFORE = ("import sys; from flows.sweep import sweep; "
          "sweep(sys.argv[1], 0, 'process', None)")  # the flow alone: Prefect's temporary server in every process


def benchmark_params(params_file: Path, folder: Path, args, runner: str, runs_per_task: int) -> Path:
    """`params_file` reading its own data, caches and model (absolute paths), sweeping only the benchmark's runs
    into `folder`."""
    base, params = params_file.resolve().parent, with_on_keys(yaml.safe_load(params_file.read_text()))
    paths = params.setdefault("paths", {})
    for name in ("prepared", "features", "models", "cache"):
        paths[name] = str(base / paths.get(name, f"data/{name}"))
    paths["results"] = str(folder / "results")
    pretrained = params.get("model", {}).get("pretrained")
    if pretrained and (base / pretrained).exists():
        params["model"]["pretrained"] = str(base / pretrained)
    params["mlflow"] = {**params.get("mlflow", {}), "db": str(folder / "mlflow.db"),
                        "artifacts": str(folder / "mlartifacts")}
    params["calibration"] = {**params.get("calibration", {}), "dataset": None}
    params["ablations"] = {**params.get("ablations", {}), "dataset": None}
    params["sweep"] = {**params.get("sweep", {}), "datasets": [args.dataset], "methods": args.methods,
                       "orderings": args.orderings, "view_seeds": args.view_seeds, "runner": runner,
                       "runs_per_task": runs_per_task, "workers": args.workers}
    target = folder / "params.yaml"
    target.write_text(yaml.safe_dump(params, sort_keys=False))
    return target


def check_caches(params: Path) -> None:
    """Stop unless every feature cache the runs read is complete: without one every run makes its views on the
    fly, and that, not the overhead, is what would be measured."""
    from dynaprompt.config import load_settings
    from dynaprompt.plan import needed_views
    from dynaprompt.runner import feature_store

    settings = load_settings(params)
    stores = [feature_store(settings, dataset, views) for dataset in settings.datasets
              for views in needed_views(settings, dataset)]
    missing = [str(store.folder) for store in stores if not store.is_complete()]
    if missing:
        raise SystemExit(f"incomplete feature caches: {', '.join(missing)}; run `dvc repro` (embed) first")


def measure(config: str, args, root: Path) -> dict:
    """Sweep the benchmark's runs under `config` in a fresh process; its timings."""
    from dynaprompt.results import SHARED_ORDERING, ResultsLayout, RunSummary

    folder = root / config
    folder.mkdir()
    runner = "process" if config == "before" else config
    params = benchmark_params(Path(args.params), folder, args, runner, 1 if config == "before" else args.runs_per_task)
    check_caches(params)
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "flows.sweep", "--params", str(params)]
    if config == "before":
        environment.pop("PREFECT_API_URL", None)
        command = [sys.executable, "-c", BEFORE, str(params)]
    launched = time.time()
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"{config}: the sweep failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    layout = ResultsLayout(folder / "results")
    runs = layout.summaries()
    shared = [RunSummary.from_json(file.read_text())  # what an order-independent method computed, once per seed
              for file in (layout.root / "runs").glob(f"*/*/{SHARED_ORDERING}*.json")]
    computed = [s for s in runs if not s.order_independent] + shared  # the runs that went through their samples
    first, last = min(s.started_at for s in runs + shared), max(s.ended_at for s in runs + shared)
    samples = sum(s.seconds_total for s in computed)
    in_runs = sum(s.wall_seconds for s in computed) + sum(s.wall_seconds for s in runs if s.order_independent)
    span = (last - first) * args.workers  # worker-seconds from the first run's start to the last run's end
    return {"runs": len(runs), "wall": ended - launched, "startup": first - launched, "tail": ended - last,
            "samples": samples / len(runs), "in_run": (in_runs - samples) / len(runs),
            "between": (span - in_runs) / len(runs), "overhead": (span - samples) / len(runs)}


def table(results: dict, runs_per_task: int) -> str:
    names = {"before": "before: a task per run", "process": f"process, {runs_per_task}/task",
             "dask": f"dask, {runs_per_task}/task", "thread": f"thread, {runs_per_task}/task"}
    rows = [("runs", "{runs:d}"), ("wall, whole command (s)", "{wall:.1f}"),
            ("  start-up: launch to first run (s)", "{startup:.1f}"),
            ("  tail: last run to exit (s)", "{tail:.1f}"),
            ("per run: its samples (s)", "{samples:.3f}"),
            ("per run: overhead beyond samples (s)", "{overhead:.3f}"),
            ("  in the run: load, open, write (s)", "{in_run:.3f}"),
            ("  between runs: task, scheduling (s)", "{between:.3f}")]
    width = max(len(names[c]) for c in results) + 2
    lines = [f"{'':40}" + "".join(f"{names[c]:>{width}}" for c in results)]
    for label, pattern in rows:
        lines.append(f"{label:40}" + "".join(f"{pattern.format(**r):>{width}}" for r in results.values()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", default="fmnist-pixelate-5")
    parser.add_argument("--methods", nargs="+", default=["tda"])
    parser.add_argument("--orderings", nargs="+", default=None, help="orderings or families (default: all)")
    parser.add_argument("--view-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--configs", nargs="+", default=["before", "process", "dask"],
                        choices=["before", "process", "dask", "thread"])
    parser.add_argument("--runs-per-task", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="one worker: the runs' span is all theirs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="overhead-") as root:
        results = {}
        for config in args.configs:
            results[config] = measure(config, args, Path(root))
            print(f"{config}: {results[config]['runs']} runs in {results[config]['wall']:.1f} s", flush=True)
    print(f"\n{', '.join(args.methods)} on {args.dataset}, {args.workers} worker(s)\n"
          + table(results, args.runs_per_task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
