"""Every method kind through `run_stream` on one device: ms/sample, peak memory and mean selected prompts.

    python -m benchmarks.coverage [--arch ViT-B-16] [--classes 1000] [--samples 8] [--views 64] [--device cuda]
        [--max-text-tokens 8192] [--budget-s 120] [--out reports/benchmark-gpu/coverage.json]

A random-weight CLIP of `--arch` (nothing is downloaded), `--classes` ImageNet class names, the prompt encoder in
chunks of `--max-text-tokens` as runs have it (`run.max_text_tokens`), and a stream of random images whose views
the embed stage's path encodes once (`benchmarks.stream.Stream`). Every kind in `dynaprompt.methods.METHODS`, with
its default options, runs over the stream through `dynaprompt.runner.run_stream` after one untimed warm-up sample;
a kind whose class says `reads_images` gets the pixel views instead of their features.

Per method: ms/sample (the stream's wall time, GPU synchronised, view source included), the method's own ms
(the records' `seconds`), peak memory (CUDA: `torch.cuda.max_memory_allocated` over the stream, model and cache
included; none on CPU) and the mean of `n_selected`. A method that fails has its error in its row and the others
go on; once `--budget-s` is spent the rest are listed as skipped. The file is rewritten after every method.

From TPT's row comes the effective TFLOP/s that `check.tflops_per_second` takes: `dynaprompt.check.tpt_text_flops`
over these class names, counting checkpointing's recomputed forward where the step runs in chunks
(`check.step_is_chunked`), divided by TPT's own ms per sample.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from dynaprompt.features import CachedViewSource, ViewPixelSource
from dynaprompt.methods import METHODS, build_method
from dynaprompt.model import LoadedClip, ModelSpec, load_clip
from dynaprompt.objectives import TuningConfig
from dynaprompt.runner import run_stream
from dynaprompt.text import PromptTextEncoder

from .stream import Stream, benchmark_classnames


@dataclass
class Setup:
    """What every method runs on: the model, the prompt encoder, the stream as features and as pixel views."""

    arch: str
    clip: LoadedClip
    text: PromptTextEncoder
    tuning: TuningConfig
    stream: Stream
    cache: CachedViewSource
    ids: list  # the timed samples
    warmup: list  # untimed samples run first
    labels: dict

    def source(self, method):
        """The views' pixels for a method that reads images (as the runner gives them), else the cached features."""
        if getattr(method, "reads_images", False):
            return ViewPixelSource(self.stream.images, self.stream.generator, self.clip.device)
        return self.cache

    def sync(self) -> None:
        if self.clip.device.type == "cuda":
            torch.cuda.synchronize(self.clip.device)


def prepare(arch: str, classes: int, samples: int, views: int, device: str, max_tokens: int, warmup: int = 1,
            seed: int = 0) -> Setup:
    """Load the model, encode the prompts' class names and the views of `warmup` + `samples` samples once."""
    clip = load_clip(ModelSpec(arch=arch, pretrained=None, init_seed=seed, device=device))
    text = PromptTextEncoder(clip.model, clip.tokenizer, benchmark_classnames(classes), max_tokens=max_tokens)
    tuning = TuningConfig()
    stream = Stream(clip, warmup + samples, views, seed, amp=tuning.amp)
    labels = {sample_id: k * 7919 % classes for k, sample_id in enumerate(stream.ids)}
    return Setup(arch, clip, text, tuning, stream, stream.build_cache(), stream.ids[warmup:], stream.ids[:warmup],
                 labels)


def error_text(error: BaseException) -> str:
    """The error and the line of this project's code that raised it."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "site-packages" not in f.filename]
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {str(error)[:500]}{where}"


def free_cuda(setup: Setup) -> None:
    """Give back what a failed method left allocated, so the next one starts clean."""
    if setup.clip.device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(kind: str, measure, setup: Setup, started: float, budget_s: float) -> dict:
    """`measure(kind)`'s row, or the error it raised (the other methods go on), or 'skipped' past the budget."""
    if time.monotonic() - started > budget_s:
        return {"method": kind, "status": "skipped", "error": f"the part's {budget_s:.0f} s budget was spent"}
    try:
        return measure(kind)
    except Exception as error:  # noqa: BLE001 -- recorded in the row
        free_cuda(setup)
        return {"method": kind, "status": "failed", "error": error_text(error)}


def measure_method(kind: str, setup: Setup) -> dict:
    """One kind over the stream after a warm-up sample: its row."""
    method, cuda = build_method(kind, setup.text, setup.tuning, None), setup.clip.device.type == "cuda"
    source = setup.source(method)
    run_stream(method, setup.warmup, setup.labels, source)  # kernels, template classifiers; run_stream resets
    setup.sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(setup.clip.device)
    start = time.perf_counter()
    records = run_stream(method, setup.ids, setup.labels, source)
    setup.sync()
    seconds = time.perf_counter() - start
    return {"method": kind, "status": "ok", "reads_images": bool(getattr(method, "reads_images", False)),
            "samples": len(records), "ms_per_sample": round(1000 * seconds / len(records), 2),
            "method_ms": round(1000 * float(records["seconds"].mean()), 2),
            "peak_mib": round(torch.cuda.max_memory_allocated(setup.clip.device) / 2**20, 1) if cuda else None,
            "mean_selected": round(float(records["n_selected"].mean()), 3)}


def effective_tflops(setup: Setup, tpt_row: dict, max_tokens: int) -> dict:
    """TPT's text FLOPs per sample, as `dynaprompt check` counts them on this path, over its measured time."""
    from dynaprompt.check import step_is_chunked, tpt_text_flops

    classnames, length = setup.text.classnames, setup.text.sequence_length
    chunked = step_is_chunked(1, len(classnames), length, max_tokens)
    flops = tpt_text_flops(setup.arch, classnames, steps=setup.tuning.steps, chunked=chunked)
    return {"tflops_per_second": round(flops / (tpt_row["method_ms"] / 1000) / 1e12, 3),
            "tflop_per_sample": round(flops / 1e12, 4), "chunked": chunked, "sequence_length": length,
            "tpt_method_ms": tpt_row["method_ms"]}


def write(path: Path, report: dict) -> None:
    """The report so far, replaced atomically: a part killed later leaves the rows it finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)


def run(args) -> dict:
    started = time.monotonic()
    setup = prepare(args.arch, args.classes, args.samples, args.views, args.device, args.max_text_tokens)
    out = Path(args.out)
    report = {"config": {"arch": args.arch, "classes": args.classes, "samples": args.samples, "views": args.views,
                         "device": str(setup.clip.device), "max_text_tokens": args.max_text_tokens,
                         "sequence_length": setup.text.sequence_length,
                         "sequences_per_chunk": setup.text.sequences_per_chunk if args.max_text_tokens else None},
              "rows": [], "tflops": None, "complete": False}
    for kind in METHODS:
        row = guarded(kind, lambda k: measure_method(k, setup), setup, started, args.budget_s)
        report["rows"].append(row)
        if kind == "tpt" and row["status"] == "ok":
            report["tflops"] = effective_tflops(setup, row, args.max_text_tokens)
        ok = row["status"] == "ok"
        print(f"  {kind}: " + (f"{row['ms_per_sample']:.1f} ms/sample, peak {row['peak_mib']} MiB, mean selected "
                               f"{row['mean_selected']}" if ok else f"{row['status']}: {row['error']}"), flush=True)
        write(out, report)
    report["complete"] = True
    write(out, report)
    return report


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The arguments this part and the resume part share."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-16")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-text-tokens", type=int, default=8192, help="run.max_text_tokens (params.yaml)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (run.threads)")
    p.add_argument("--budget-s", type=float, default=120.0, help="start no method after this many seconds")
    return p


def main(argv=None) -> dict:
    p = parser("python -m benchmarks.coverage", __doc__)
    p.add_argument("--out", default="reports/benchmark-gpu/coverage.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    main()
