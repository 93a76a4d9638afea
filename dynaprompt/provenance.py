"""What a run's records depend on: the one list of result-changing code, and the run fingerprint built on it.

`RESULT_CODE` is every file whose edit can change a run's records (given the same features): a fix there
changes every fingerprint, so finished runs are recomputed. `SWEEP_CODE` decides which runs a sweep makes and
how it stores them, without changing any one run's records. The sweep stage in dvc.yaml depends on exactly
these two lists (DVC cannot expand a list into `deps`, so tests/test_provenance.py holds dvc.yaml to them and
checks that editing any listed file makes `dvc status` call the sweep changed).

What is in a run's fingerprint, and what stays out (tests/test_fingerprint.py holds each line):
- in: the params a run reads (model arch, tag or weights file as written, quick_gelu, init_seed; prompt; the
  run's effective views, tuning and method options; templates; the stream and its members; the ordering), the
  weights' identity (file name, size, hash of the first MiB: not the path), the features' storage dtype and the
  code of RESULT_CODE;
- in: the device type and precision (`cpu/fp32`, `cuda/fp16-autocast`, `cpu/bf16-autocast` with
  `tuning.amp_on_cpu`): GPU results are not CPU results, and autocast's are not fp32's;
- in, on the CPU: `run.threads`. Under the CPU-kernel pins the thread count still splits reductions: at ViT-B/16
  over 200 classes, TPT's and DynaPrompt's entropies differ in the last bits between 1 and 2 threads. On a GPU
  torch's CPU threads compute nothing of the run, and the thread count stays out;
- in: `run.max_text_tokens` (memory only, but not bit-neutral): a chunked gradient pass runs the text tower's
  backward over fewer sequences at a time, whose kernels give other last bits (its forward is bit-identical), and
  sums each prompt's gradient over chunks in another order. Two budgets give equal records only where neither
  chunks a gradient pass;
- in: `run.block_size` (the summary's per-block accuracies);
- out: `run.checkpoint_every` (a resumed run's records equal an uninterrupted run's), `model.device`'s index
  (`cuda:3` or `cuda:0`: the same type), `model.cache_dir` and `model.allow_download` (where weights are
  looked for, not which: the weights' identity is in), and every path's spelling (relative to the params file).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding dynaprompt/ (the repository root)

RESULT_CODE = (
    "dynaprompt/methods",
    "dynaprompt/objectives.py",
    "dynaprompt/text.py",
    "dynaprompt/blocks.py",
    "dynaprompt/orderings.py",
    "dynaprompt/difficulty.py",
    "dynaprompt/records.py",
    "dynaprompt/runner.py",
    "dynaprompt/config.py",
    "dynaprompt/specs.py",
    "dynaprompt/resolve.py",
    "dynaprompt/features.py",
    "dynaprompt/model.py",
    "dynaprompt/views.py",
)
SWEEP_CODE = (
    "dynaprompt/plan.py",
    "dynaprompt/results.py",
    "dynaprompt/provenance.py",
    "flows/sweep.py",
    "tasks",
)


WHERE_NOT_WHAT = ("device", "cache_dir", "allow_download")  # model keys that say where, not what: the device's
#   type (in the run's identity) is what matters, not its index; the weights are identified by their content


def code_files(entries=RESULT_CODE, root: Path = PACKAGE_ROOT) -> list[Path]:
    """The Python files of `entries` (files, or folders taken whole), sorted."""
    files = []
    for entry in entries:
        path = root / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def code_fingerprint(root: Path = PACKAGE_ROOT) -> str:
    """A hash of RESULT_CODE's files, by path and content."""
    digest = hashlib.sha256()
    for file in code_files(RESULT_CODE, root):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def weights_fingerprint(weights: str) -> str:
    """Identifies weights: a file's name, size and the hash of its first MiB; else the random-init description."""
    file = Path(weights)
    if not file.is_file():
        return weights
    with file.open("rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()[:16]
    return f"{file.name}:{file.stat().st_size}:{head}"


def fingerprint_run(settings, key, method, run, ordering: dict, weights: str) -> str:
    """A hash of everything a run's records depend on; equal fingerprints mean the records can be reused.

    `run` is the run's resolved settings and `ordering` its ordering as data (natural for the `__shared__`
    manifest-order run that order-independent methods share); `dynaprompt.resolve.resolve` is the one caller.
    """
    stream = settings.stream(key.dataset)
    members = getattr(stream, "members", ())
    relevant = {
        "model": {k: v for k, v in asdict(settings.model).items() if k not in WHERE_NOT_WHAT},
        "weights": weights_fingerprint(weights),
        "prompt": asdict(settings.prompt),
        "run": run.identity(),  # the effective settings, with the device type and precision
        "views": {m: asdict(v) for m, v in run.member_views},
        "features": settings.embed.dtype,  # the precision the view features are stored (and computed) in
        "templates": run.templates,
        "stream": _plain(stream),
        "members": {m: _plain(settings.datasets[m]) for m in members},
        "method_kind": method.kind,
        "ordering": ordering,
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:20]


def run_fingerprint(settings, key, weights: str) -> str:
    """The fingerprint of `key` under `settings` (a shorthand for `resolve(settings, key, weights).fingerprint`)."""
    from .resolve import resolve

    return resolve(settings, key, weights).fingerprint


def _plain(spec) -> dict:
    """A dataset or mixture spec as plain JSON-able data (its name excluded: renaming changes nothing)."""
    return {k: dict(v) if hasattr(v, "items") else v for k, v in asdict(spec).items() if k != "name"}
