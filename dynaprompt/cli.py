"""Command line: `dynaprompt run --params params.yaml --dataset D --method M --ordering O`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import load_settings
from .model import WeightsNotFoundError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynaprompt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one method on one ordering of one dataset")
    run.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    run.add_argument("--dataset", required=True, help="a key of `datasets` in params")
    run.add_argument("--method", required=True, help="a key of `methods` in params")
    run.add_argument("--ordering", required=True, help="a key of `orderings` in params")
    run.add_argument("--limit", type=int, default=None, help="only the first N samples of the stream")
    run.add_argument("--out", default=None, help="records file (.parquet); default results/runs/<d>/<m>/<o>.parquet")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_command(args) -> int:
    from .runner import run_one

    settings = load_settings(args.params)
    result = run_one(
        settings, args.dataset, args.method, args.ordering, limit=args.limit, progress=not args.no_progress
    )
    out = Path(args.out or Path("results/runs") / args.dataset / args.method / f"{args.ordering}.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    result.records.to_parquet(out, index=False)
    out.with_suffix(".json").write_text(json.dumps({**result.meta, **result.summary}, indent=2))
    s = result.summary
    blocks = " ".join(f"{a:.3f}" for a in s["block_accuracy"])
    print(
        f"{args.dataset}/{args.method}/{args.ordering}: n={s['n']} accuracy={s['accuracy']:.4f} "
        f"blocks[{s['block_size']}]=[{blocks}] {s['seconds_per_sample'] * 1000:.1f} ms/sample -> {out}"
    )
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run_command(args)
    except (WeightsNotFoundError, FileNotFoundError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"dynaprompt: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
