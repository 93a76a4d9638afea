"""Command line: `dynaprompt run --params params.yaml --dataset D --method M --ordering O`; `dynaprompt ui`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import load_settings
from .model import WeightsNotFoundError
from .results import ResultsLayout, RunKey, write_atomically


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynaprompt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one method on one ordering of one dataset")
    run.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    run.add_argument("--dataset", required=True, help="a key of `datasets` or `mixtures` in params")
    run.add_argument("--method", required=True, help="a key of `methods` in params (or a derived variant)")
    run.add_argument("--ordering", required=True, help="a key of `orderings` in params")
    run.add_argument("--seed", type=int, default=None,
                     help="view (augmentation) seed; default: views.view_seed of params")
    run.add_argument("--limit", type=int, default=None,
                     help="only the first N samples of the stream (needs --out: a partial run is not a result)")
    run.add_argument("--out", default=None,
                     help="records file (.parquet, summary next to it); default: the results folder of params")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    ui = commands.add_parser("ui", help="MLflow's UI on the project's database; its root page opens the runs")
    ui.add_argument("--params", default="params.yaml", help="params file (default: params.yaml): mlflow.db, "
                    "mlflow.artifacts, mlflow.experiment")
    ui.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")
    ui.add_argument("--open", action="store_true", help="open the experiment's runs in the web browser")
    check = commands.add_parser("check", help="before GPU-hours are spent: the datasets found, their caches, and "
                                "the plan's estimated cost")
    check.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    check.add_argument("--top", type=int, default=20, help="rows of the estimate (most expensive first)")
    return parser


def run_command(args) -> int:
    from .model import load_model
    from .resolve import resolve
    from .runner import execute, store_run

    settings = load_settings(args.params)
    from .plan import seed_keys

    key = RunKey(args.dataset, args.method, args.ordering, seed_keys(settings, [args.seed])[0])
    settings.stream(key.dataset), settings.method(key.method), settings.ordering(key.ordering)  # names first
    if args.limit is not None and args.out is None:
        raise ValueError("--limit needs --out: a partial stream is not stored as the run's result")
    clip = load_model(settings)
    run = resolve(settings, key, clip.weights)
    if args.out is None:
        layout = ResultsLayout(settings.path("results"))
        summary, reused = store_run(run, clip, layout, progress=not args.no_progress)
        target = layout.records(key)
    else:
        result = execute(run, clip, limit=args.limit, progress=not args.no_progress)
        target, summary, reused = Path(args.out), result.summary, False
        write_atomically(result.records, target)
        write_atomically(summary.to_json(), target.with_suffix(".json"))
    blocks = " ".join(f"{a:.3f}" for a in summary.block_accuracy)
    how = "reused, same fingerprint" if reused else f"{summary.seconds_per_sample * 1000:.1f} ms/sample"
    print(f"{key.label}: n={summary.n} accuracy={summary.accuracy:.4f} blocks[{summary.block_size}]=[{blocks}] "
          f"({how}) -> {target}")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def ui_command(args) -> int:
    import signal
    import webbrowser

    from .ui import MlflowUi

    settings = load_settings(args.params)
    base, tracking = settings.base_dir, settings.mlflow
    server = MlflowUi(base / tracking.db, base / tracking.artifacts, tracking.experiment, args.host, args.port,
                      cwd=base)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops mlflow too, as Ctrl-C does
    try:
        url = server.start()
        print(f"MLflow UI on {base / tracking.db}, experiment '{tracking.experiment}': {url}\n"
              f"({server.url}/ opens the same runs; Ctrl-C stops)", flush=True)
        if args.open:
            webbrowser.open(url)
        code = server.wait()
        raise RuntimeError(f"mlflow ui stopped with code {code}: {server.log_tail()}")
    except KeyboardInterrupt:
        return 0
    finally:
        server.close()


def check_command(args) -> int:
    """The datasets table, the estimate, and one line per missing dataset root (then a non-zero exit)."""
    from . import check

    settings = load_settings(args.params)
    reports = check.check_datasets(settings)
    print(check.datasets_table(reports))
    missing = check.missing_lines(reports)
    if any(report.estimable for report in reports):
        work = check.estimate(settings, reports, check.measured_selection(settings))
        print()
        print(check.estimate_table(work, args.top))
        print(check.summary_line(work))
        memory = check.memory_table_rows(settings, reports)
        print()
        print(check.memory_table(memory))
        print(check.memory_line(memory))
    for line in missing:
        print(f"dynaprompt check: missing: {line}", file=sys.stderr)
    return 1 if missing else 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    commands = {"ui": ui_command, "check": check_command, "run": run_command}
    try:
        return commands[args.command](args)
    except (WeightsNotFoundError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"dynaprompt: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
