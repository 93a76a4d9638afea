"""Checkpoint and resume on one device: a stateful method killed mid-stream resumes with the same predictions.

    python -m benchmarks.resume [--arch ViT-B-16] [--classes 200] [--samples 9] [--every 3] [--die-at 7]
        [--device cuda] [--max-text-tokens 8192] [--budget-s 60] [--out reports/benchmark-gpu/resume.json]

For every kind in `dynaprompt.methods.METHODS` that is not order-independent (its state carries from sample to
sample), on the stream of `benchmarks.coverage`: one uninterrupted `run_stream`; one with a `RunCheckpoint` every
`--every` samples whose view source raises at sample `--die-at` (a worker lost there); and a fresh method over the
same checkpoint, which resumes after the last save. A row gives where the resumed run started, how many of its
predictions equal the uninterrupted run's and the largest difference of their final entropies. The tests check
the same on CPU (tests/test_checkpoint.py); this is the check on the GPU, where kernels may differ.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dynaprompt.checkpoint import RunCheckpoint
from dynaprompt.methods import METHODS, build_method
from dynaprompt.runner import run_stream

from .coverage import Setup, guarded, parser, prepare, write


class Killed(Exception):
    """The stream's worker is lost at this sample."""


def stateful_kinds() -> list[str]:
    """The kinds whose prediction of a sample depends on the samples before it: those a checkpoint must restore."""
    return [kind for kind, cls in METHODS.items() if not cls.order_independent]


def check_resume(kind: str, setup: Setup, every: int, die_at: int, folder: Path) -> dict:
    """Uninterrupted against killed-and-resumed over the same stream: the row."""
    fresh = lambda: build_method(kind, setup.text, setup.tuning, None)  # noqa: E731
    source, ids, labels = setup.source(fresh()), setup.ids, setup.labels
    uninterrupted = run_stream(fresh(), ids, labels, source)

    def dies(sample_id):
        if ids.index(sample_id) == die_at:
            raise Killed
        return source(sample_id)

    try:
        run_stream(fresh(), ids, labels, dies, checkpoint=RunCheckpoint(folder, "gpu-benchmark", every))
    except Killed:
        pass
    computed = []
    resumed = run_stream(fresh(), ids, labels, lambda s: computed.append(s) or source(s), desc=kind,
                         checkpoint=RunCheckpoint(folder, "gpu-benchmark", every))
    same = int((resumed["pred"].to_numpy() == uninterrupted["pred"].to_numpy()).sum())
    gap = np.abs(resumed["entropy_after"].to_numpy() - uninterrupted["entropy_after"].to_numpy())
    expected_start = die_at // every * every
    start = ids.index(computed[0]) if computed else len(ids)
    ok = same == len(ids) and start == expected_start
    return {"method": kind, "status": "ok" if ok else "differs", "samples": len(ids), "killed_at": die_at,
            "resumed_at": start, "expected_resume": expected_start, "identical_predictions": same,
            "max_entropy_diff": float(gap.max())}


def run(args) -> dict:
    started = time.monotonic()
    setup = prepare(args.arch, args.classes, args.samples, args.views, args.device, args.max_text_tokens,
                    warmup=0)
    out = Path(args.out)
    report = {"config": {"arch": args.arch, "classes": args.classes, "samples": args.samples, "every": args.every,
                         "die_at": args.die_at, "device": str(setup.clip.device),
                         "max_text_tokens": args.max_text_tokens}, "rows": [], "complete": False}
    with tempfile.TemporaryDirectory(prefix="resume-") as tmp:
        for kind in stateful_kinds():
            measure = lambda k: check_resume(k, setup, args.every, args.die_at, Path(tmp) / k)  # noqa: E731
            row = guarded(kind, measure, setup, started, args.budget_s)
            report["rows"].append(row)
            print(f"  {kind}: {row['status']}" + (f", resumed at {row['resumed_at']}, {row['identical_predictions']}/"
                                                  f"{row['samples']} identical" if "resumed_at" in row else
                                                  f": {row['error']}"), flush=True)
            write(out, report)
    report["complete"] = True
    write(out, report)
    return report


def main(argv=None) -> dict:
    p = parser("python -m benchmarks.resume", __doc__)
    p.set_defaults(classes=200, samples=9, budget_s=60.0)
    p.add_argument("--every", type=int, default=3, help="samples between checkpoints")
    p.add_argument("--die-at", type=int, default=7, help="the stream position where the run is lost")
    p.add_argument("--out", default="reports/benchmark-gpu/resume.json")
    args = p.parse_args(argv)
    if not 0 < args.every <= args.die_at < args.samples:
        raise SystemExit(f"need 0 < --every ({args.every}) <= --die-at ({args.die_at}) < --samples ({args.samples})")
    torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    main()
