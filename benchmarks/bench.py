"""Benchmark: per-sample latency of every method, the library against its plain reference.

    python -m benchmarks.bench [--arch tiny-clip|ViT-B-16] [--classes 200] [--samples N] [--views 64]
        [--buffer-size 10] [--max-text-tokens 0] [--threads 2] [--device cpu|cuda] [--out reports/benchmark.json]

Everything runs in one process, on a random-weight CLIP (no download) and random images, so the numbers are
ratios measured side by side on the same machine at the same time. For each method:

- library: `dynaprompt.methods` over view features from a cache built once through the embed stage's path
  (`CachedViewSource.build`); truncated text context, in chunks of `--max-text-tokens` under activation
  checkpointing as runs have it (0, the default: one pass); DynaPrompt with carried text features, metrics
  without grad and forward+backward of the selected prompts only.
- reference: the same rule written the plain way (`benchmarks/reference.py`, also the library's test oracle):
  full padded text, the image encoder re-run over the views on every pass, DynaPrompt's backward pass through
  every buffered prompt, no features carried from sample to sample.
- the online peers (TDA, DMN, OnZeta, BoostAdapter, DPE, ECALP, TCA) and MTA: library only. They work over
  cached features, so there is no plain reference to race; their rows give ms/sample next to TPT's. C-TPT and
  R-TPT tune the prompt, and race their plain references as TPT does.

Both sides see the same views of the same images, so their predictions must agree; the table counts how many
do. It also times DynaPrompt's parts, each method against TPT, peak memory (CUDA: per method; CPU: the
process's peak RSS, once), the lockstep runner against one-by-one runs of several orderings, and how many
image-encoder passes the feature cache saves over a sweep.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dynaprompt.features import CachedViewSource
from dynaprompt.methods import build_method
from dynaprompt.methods.dynaprompt import Config as DynaPromptConfig
from dynaprompt.model import LoadedClip, ModelSpec, load_clip
from dynaprompt.objectives import TuningConfig, encode_for_prediction, rows_to_encode, tune_contexts
from dynaprompt.runner import run_stream
from dynaprompt.text import PromptTextEncoder, text_tower

from .clock import Clock
from .lockstep import lockstep_supported, run_lockstep
from .reference import PlainCLIP, build_plain
from .rss import peak_rss_mib
from .stream import Stream, benchmark_classnames

REFERENCED = ("zero_shot", "zero", "tpt", "online_tpt", "dynaprompt", "dynaprompt_official", "ctpt", "rtpt")
PEERS = ("tda", "dmn", "onzeta", "boostadapter", "dpe", "ecalp", "tca", "mta")
METHOD_NAMES = REFERENCED + PEERS
LOCKSTEP_METHODS = ("tpt", "online_tpt", "dynaprompt", "dynaprompt_official")
TUNING_KINDS = ("tpt", "online_tpt", "dynaprompt", "ctpt", "rtpt")
PAPER_KINDS = ("zero_shot", "zero_shot", "tpt", "online_tpt", "dynaprompt", "dynaprompt", "zero")
PAPER_ORDERINGS = 5
PEER_NOTE = "over cached features, no prompt tuning: no plain reference"


def method_specs(buffer_size: int) -> dict:
    """Benchmark name -> (kind, config), as `build_method` and `build_plain` take them."""
    specs = {name: (name, None) for name in METHOD_NAMES}
    specs["dynaprompt"] = ("dynaprompt", DynaPromptConfig(buffer_size=buffer_size))
    specs["dynaprompt_official"] = ("dynaprompt", DynaPromptConfig(buffer_size=buffer_size, selection="official"))
    return specs


# ----------------------------------------------------------------------------------------------- machine


def available_memory_gib(device: torch.device) -> float:
    """Free memory for the reference's autograd graphs: GPU free memory, or MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return float("inf")
    kib = [int(line.split()[1]) for line in lines if line.startswith("MemAvailable:")]
    return kib[0] / 2**20 if kib else float("inf")


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, where the system has them."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def reference_graph_gib(clip: LoadedClip, n_prompts: int, n_classes: int, length: int) -> float:
    """Rough size of the autograd graph of one text pass with grad (ViT-B-16, 1 x 200 x 77 tokens: 5.3 GiB)."""
    # ~12 floats per width per token per layer plus the attention maps; less under autocast
    tower = text_tower(clip.model)
    width = tower.token_embedding.weight.shape[1]
    blocks = tower.transformer.resblocks
    heads = blocks[0].attn.num_heads if hasattr(blocks[0].attn, "num_heads") else max(1, width // 64)
    per_token = len(blocks) * (12 * width + 2 * heads * length)
    bytes_per = 2.5 if clip.device.type == "cuda" else 4
    return n_prompts * n_classes * length * per_token * bytes_per / 2**30


def reference_prompts(name: str, n_samples: int, buffer_size: int) -> int:
    """The most prompts one reference pass with grad holds."""
    if name == "dynaprompt_official":
        return buffer_size
    if name == "dynaprompt":
        return 1 + min(buffer_size, max(0, n_samples - 1))
    return 1 if name in ("tpt", "online_tpt") else 0


# ----------------------------------------------------------------------------------------------- runs


@dataclass
class Bench:
    """What every method runs on: the model both ways, the stream both ways, the tuning."""

    clip: LoadedClip
    text: PromptTextEncoder
    plain: PlainCLIP
    tuning: TuningConfig
    cache: CachedViewSource
    views: dict  # sample id -> view images [n_views, 3, S, S] on the device
    ids: list  # the timed stream
    warmup: list  # untimed samples run first, never in the stream
    labels: dict
    cache_ms: float  # building the feature cache, per sample

    @property
    def device(self) -> torch.device:
        return self.clip.device


def prepare(args) -> Bench:
    """Load the model, draw the stream and build the library's feature cache (timed)."""
    clip = load_clip(ModelSpec(arch=args.arch, pretrained=None, init_seed=args.seed, device=args.device))
    classnames = benchmark_classnames(args.classes)
    tuning = TuningConfig(lr=args.lr)
    stream = Stream(clip, args.samples + args.warmup, args.views, args.seed, amp=tuning.amp)
    clock = Clock(clip.device)
    with clock("cache"):  # the embed stage: views + one image-encoder pass per sample, once per dataset
        cache = stream.build_cache()
    text = PromptTextEncoder(clip.model, clip.tokenizer, classnames, max_tokens=args.max_text_tokens)
    plain = PlainCLIP(clip, classnames)
    with torch.no_grad():  # first calls set up kernels
        text.encode(text.init_context.unsqueeze(0))
        plain.text_features(plain.v0.unsqueeze(0))
    ids = stream.ids[: args.samples]
    return Bench(clip, text, plain, tuning, cache, views={i: stream.views(i) for i in stream.ids}, ids=ids,
                 warmup=stream.ids[args.samples:], labels={i: k * 7919 % args.classes for k, i in enumerate(ids)},
                 cache_ms=1000 * clock.parts["cache"] / len(stream.ids))


class LibraryRunner:
    """The library's method, one sample per call, timed by part (tuning methods: selection, tuning, prediction)."""

    def __init__(self, kind: str, config, bench: Bench):
        self.method = build_method(kind, bench.text, bench.tuning, config)
        self.text = bench.text
        self.clock = Clock(bench.device)

    def reset(self, n_samples: int) -> None:
        """Start a stream of `n_samples`, as `run_stream` does."""
        if hasattr(self.method, "start_stream"):
            self.method.start_stream(n_samples)
        else:
            self.method.reset()

    def __call__(self, view_features):
        method, clock = self.method, self.clock
        if not lockstep_supported(method):
            with clock("predict"):
                return method(view_features)
        with clock("metrics"):  # objectives.tune_and_finish, a clock around each part
            request = method.begin(view_features)
        with clock("tune"):
            tuned = tune_contexts(self.text, request.contexts, request.view_features, method.tuning, method.scaler,
                                  request.mentions, request.base)
        with clock("predict"):
            return method.finish(request, tuned, encode_for_prediction(self.text, rows_to_encode(request, tuned),
                                                                        method.tuning))


def timed_call(runner, argument, device: torch.device) -> tuple:
    """One sample: (result, wall time, time per part, peak allocated GPU MiB or None on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = dict(runner.clock.parts)
    result = runner(argument)
    parts = {k: v - before.get(k, 0.0) for k, v in runner.clock.parts.items()}
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return result, sum(parts.values()), parts, peak


def new_series() -> dict:
    """An empty record of one side's run over the stream."""
    return {"preds": [], "entropy_after": [], "n_selected": [], "seconds": [], "parts": defaultdict(float),
            "peak_mib": None}


def add(series: dict, result, seconds: float, parts: dict, peak: float | None) -> None:
    """Append one sample's outcome and timing to `series`."""
    series["preds"].append(result.pred)
    series["entropy_after"].append(result.entropy_after)
    series["n_selected"].append(len(result.selected))
    series["seconds"].append(seconds)
    for part, value in parts.items():
        series["parts"][part] += value
    if peak is not None:
        series["peak_mib"] = max(series["peak_mib"] or 0.0, peak)


def warm_up(library: LibraryRunner, reference, bench: Bench) -> None:
    """Run the untimed warm-up samples through both sides, then reset them and their clocks."""
    library.reset(len(bench.warmup))
    for sample_id in bench.warmup:
        library(bench.cache(sample_id))
        if reference is not None:
            reference(bench.views[sample_id])
    library.clock.parts.clear()
    library.reset(len(bench.ids))
    if reference is not None:
        reference.clock.parts.clear()
        reference.reset()


def compare_method(spec: tuple, bench: Bench, with_reference: bool, reference_samples: int | None = None):
    """(library series, reference series or None) over the same stream, sample by sample, after a warm-up."""
    # Around each reference call (on the first `reference_samples` samples, all by default) the library runs in
    # two identical instances, just before and just after it. A sample's library time is the faster of the two,
    # so that a stall left behind by the reference's multi-GiB autograd graph (seen on CPU) is not charged to
    # the library; both must give the same outcome.
    kind, config = spec
    library = LibraryRunner(kind, config, bench)
    reference = build_plain(kind, bench.plain, bench.tuning, config, Clock(bench.device)) if with_reference else None
    twin = LibraryRunner(kind, config, bench) if with_reference else None
    warm_up(library, reference, bench)
    if twin is not None:
        twin.reset(len(bench.ids))
    lib, ref = new_series(), new_series()
    lib.update(twin_mismatches=0, seconds_pairs=[])
    for index, sample_id in enumerate(bench.ids):
        features = bench.cache(sample_id)
        call = timed_call(library, features, bench.device)
        if reference is not None and (reference_samples is None or index < reference_samples):
            add(ref, *timed_call(reference, bench.views[sample_id], bench.device))
        if twin is not None:
            second = timed_call(twin, features, bench.device)
            same = (second[0].pred, second[0].entropy_after) == (call[0].pred, call[0].entropy_after)
            lib["twin_mismatches"] += not same
            lib["seconds_pairs"].append([call[1], second[1]])
            call = min(call, second, key=lambda c: c[1])
        add(lib, *call)
    return lib, (ref if reference is not None else None)


def ms(values) -> float | None:
    """Mean of seconds, in milliseconds; None for no values."""
    return 1000 * float(np.mean(values)) if len(values) else None


def method_row(name: str, lib: dict, ref: dict | None, skipped: str | None) -> dict:
    """One row of the methods table (times in ms per sample)."""
    k = len(ref["seconds"]) if ref else 0
    return {
        "method": name,
        "library_ms": ms(lib["seconds"]),
        "library_median_ms": 1000 * float(np.median(lib["seconds"])),
        "reference_ms": ms(ref["seconds"]) if ref else None,
        "reference_median_ms": 1000 * float(np.median(ref["seconds"])) if ref else None,
        "library_ms_on_reference_samples": ms(lib["seconds"][:k]) if ref else None,
        "speedup": float(np.mean(ref["seconds"]) / np.mean(lib["seconds"][:k])) if ref else None,
        "identical": sum(a == b for a, b in zip(lib["preds"], ref["preds"])) if ref else None,
        "n": k if ref else len(lib["seconds"]),
        "max_entropy_diff": (float(np.max(np.abs(np.subtract(lib["entropy_after"][:k], ref["entropy_after"]))))
                             if ref else None),
        "library_peak_mib": lib["peak_mib"],
        "reference_peak_mib": ref["peak_mib"] if ref else None,
        "mean_selected": float(np.mean(lib["n_selected"])) if name.startswith("dynaprompt") else None,
        "skipped": skipped,
    }


def method_details(lib: dict, ref: dict | None) -> dict:
    """Per-sample times and predictions, and the time of each part in ms per sample."""
    per_sample = lambda series: {k: 1000 * v / max(1, len(series["seconds"])) for k, v in series["parts"].items()}
    return {
        "library_parts_ms": per_sample(lib), "reference_parts_ms": per_sample(ref) if ref else None,
        "library_seconds": lib["seconds"], "reference_seconds": ref["seconds"] if ref else None,
        "library_preds": lib["preds"], "reference_preds": ref["preds"] if ref else None,
        "n_selected": lib["n_selected"], "library_seconds_pairs": lib["seconds_pairs"],
        "library_twin_mismatches": lib["twin_mismatches"],
    }


def measure(name: str, spec: tuple, bench: Bench, args, budget_gib: float) -> tuple[dict, dict]:
    """The method's row and details: library and (when it has one and it fits in memory) reference."""
    skipped = None
    if name in PEERS:
        skipped = PEER_NOTE
    else:
        n_reference = min(args.reference_samples or args.samples, args.samples)
        need = reference_graph_gib(bench.clip, reference_prompts(name, n_reference, args.buffer_size),
                                   args.classes, bench.plain.context_length)
        if need > budget_gib:
            skipped = f"reference graph needs ~{need:.0f} GiB > {budget_gib:.0f} GiB free"
    lib, ref = compare_method(spec, bench, skipped is None, args.reference_samples)
    return method_row(name, lib, ref, skipped), method_details(lib, ref)


def compare_to_tpt(rows: list[dict]) -> dict:
    """Add each row's time over TPT's (library, reference); the DynaPrompt/TPT ratios."""
    tpt = next((row for row in rows if row["method"] == "tpt"), None)
    ratios = {}
    for row in rows:
        for side in ("library", "reference"):
            mine, base = row[f"{side}_ms"], tpt and tpt[f"{side}_ms"]
            row[f"{side}_vs_tpt"] = mine / base if mine and base else None
            if row["method"].startswith("dynaprompt") and row[f"{side}_vs_tpt"]:
                ratios[f"{row['method']}/tpt {side}"] = row[f"{side}_vs_tpt"]
    return ratios


def lockstep_comparison(name: str, spec: tuple, bench: Bench, n_orderings: int, seed: int, repeats: int = 2):
    """Several orderings one by one (`run_stream`) against `run_lockstep`; the same records, timed."""
    kind, config = spec
    ids, tuning = bench.ids, bench.tuning
    rng = np.random.default_rng(seed)
    orderings = [list(ids)] + [[ids[i] for i in rng.permutation(len(ids))] for _ in range(n_orderings - 1)]
    clock = Clock(bench.device)
    plan = ["one_by_one", "lockstep"] if repeats < 2 else ["one_by_one", "lockstep", "lockstep", "one_by_one"]
    for way in plan:
        with clock(way):
            if way == "one_by_one":
                alone = [run_stream(build_method(kind, bench.text, tuning, config), order, bench.labels, bench.cache)
                         for order in orderings]
            else:
                together = run_lockstep(kind, bench.text, tuning, config, orderings, bench.labels, bench.cache)
    same = sum(int((a["pred"] == b["pred"]).sum()) for a, b in zip(alone, together))
    drift = max(float(np.abs(a["entropy_after"].to_numpy() - b["entropy_after"].to_numpy()).max())
                for a, b in zip(alone, together))
    n = sum(len(order) for order in orderings) * len(plan) // 2
    return {
        "method": name, "orderings": n_orderings, "samples_total": sum(len(order) for order in orderings),
        "repeats": len(plan) // 2,
        "one_by_one_ms_per_sample": 1000 * clock.parts["one_by_one"] / n,
        "lockstep_ms_per_sample": 1000 * clock.parts["lockstep"] / n,
        "throughput_ratio": clock.parts["one_by_one"] / clock.parts["lockstep"],
        "identical_predictions": same, "max_entropy_diff": drift,
    }


# ----------------------------------------------------------------------------------------------- cache arithmetic


def passes_per_sample(kind: str, steps: int) -> int:
    """Image-encoder passes an uncached run makes per sample: one per tuning step plus one to predict."""
    return steps + 1 if kind in TUNING_KINDS else 1


def count_passes(runs: list[tuple[str, str, int]], sizes: dict, cached: int) -> dict:
    """Passes without the cache for `runs` of (dataset, method kind, tuning steps), against `cached` with it."""
    uncached = sum(sizes[dataset] * passes_per_sample(kind, steps) for dataset, kind, steps in runs)
    return {"runs": len(runs), "datasets": len({run[0] for run in runs}), "cached_passes": cached,
            "uncached_passes": uncached, "saved_passes": uncached - cached,
            "factor": uncached / cached if cached else float("nan")}


def image_encoder_passes(dataset_sizes: dict, method_kinds, n_orderings: int, steps: int) -> dict:
    """Image-encoder passes with and without the feature cache over every dataset x method x ordering."""
    # cached: one pass per sample per dataset; uncached: `passes_per_sample` for every sample of every run
    runs = [(d, kind, steps) for d in dataset_sizes for kind in method_kinds for _ in range(n_orderings)]
    return count_passes(runs, dataset_sizes, cached=sum(dataset_sizes.values()))


def stream_size(settings, name: str) -> int | None:
    """Samples in a dataset (its `n_samples`, its expected count or the paper's) or a mixture; None if unknown."""
    from dynaprompt.datasets import EXPECTED

    if name in settings.mixtures:
        mixture = settings.mixtures[name]
        sizes = [stream_size(settings, member) for member in mixture.members]
        return None if None in sizes else sum(min(s, mixture.per_member or s) for s in sizes)
    spec = settings.datasets[name]
    return spec.options.get("n_samples") or spec.expected_samples or EXPECTED.get(spec.kind, (None,))[0]


def plan_passes(settings) -> dict:
    """`count_passes` over every run of `expand_plan`; runs on streams of unknown size are left out and named."""
    # cached: each dataset a run reads (itself or as a mixture member), once per view setting it needs
    from dynaprompt.plan import expand_plan, needed_views
    from dynaprompt.resolve import resolve_run

    sizes = {name: stream_size(settings, name) for name in [*settings.datasets, *settings.mixtures]}
    runs, unsized = [], set()
    for key, _group in expand_plan(settings):
        if sizes[key.dataset] is None:
            unsized.add(key.dataset)
            continue
        steps = resolve_run(settings, key.dataset, key.method).tuning.steps
        runs.append((key.dataset, settings.method(key.method).kind, steps))
    read = {m for d, _, _ in runs for m in (settings.mixtures[d].members if d in settings.mixtures else [d])}
    cached = sum(sizes[d] * len(needed_views(settings, d)) for d in read)
    return {**count_passes(runs, sizes, cached), "left_out": sorted(unsized)}


def main_shape(settings) -> tuple[list[str], int]:
    """The method kinds and the number of orderings of the plan's main runs on datasets (mixtures aside)."""
    from dynaprompt.plan import main_runs

    runs = [key for key in main_runs(settings) if key.dataset not in settings.mixtures]
    methods = dict.fromkeys(key.method for key in runs)
    return [settings.method(m).kind for m in methods], len({key.ordering for key in runs})


def sweep_plans(params_path: str | None, steps: int) -> list[dict]:
    """Cache savings for every run the params file plans (if any) and for the paper's datasets, same main runs."""
    from dynaprompt.config import load_settings
    from dynaprompt.datasets import EXPECTED

    kinds, n_orderings, plans = PAPER_KINDS, PAPER_ORDERINGS, []
    if params_path and Path(params_path).is_file():
        settings = load_settings(params_path)
        plans.append({"plan": f"{params_path}: every planned run", **plan_passes(settings)})
        kinds, n_orderings = main_shape(settings)
    paper = {name: size for name, (size, _) in EXPECTED.items()}
    plans.append({"plan": f"paper's {len(paper)} datasets x {len(kinds)} methods x {n_orderings} orderings",
                  **image_encoder_passes(paper, kinds, n_orderings, steps)})
    return plans


# ----------------------------------------------------------------------------------------------- tables


FORMATS = {"x TPT": "{:.2g}", "ref x TPT": "{:.2g}", "speedup": "{:.1f}x", "max|dH|": "{:.1e}", "mean |S|": "{:.2f}",
           "throughput": "{:.2f}x", "cached": "{:,}", "uncached": "{:,}", "saved": "{:,}", "factor": "{:.0f}x"}


def show(frame: pd.DataFrame) -> str:
    """A table as text: pandas' layout, this module's number formats, '-' where there is no value."""
    formatters = {column: FORMATS[column].format for column in frame.columns if column in FORMATS}
    return frame.to_string(formatters=formatters, float_format="{:.1f}".format, na_rep="-")


def methods_table(report: dict) -> pd.DataFrame:
    """Per method: ms/sample both sides, each over TPT's, the speedup and how far the outcomes agree."""
    rows = report["methods"]
    table = pd.DataFrame({
        "library ms": [r["library_ms"] for r in rows], "x TPT": [r["library_vs_tpt"] for r in rows],
        "reference ms": [r["reference_ms"] for r in rows], "ref x TPT": [r["reference_vs_tpt"] for r in rows],
        "speedup": [r["speedup"] for r in rows],
        "identical": [None if r["identical"] is None else f"{r['identical']}/{r['n']}" for r in rows],
        "max|dH|": [r["max_entropy_diff"] for r in rows], "mean |S|": [r["mean_selected"] for r in rows],
    }, index=pd.Index([r["method"] for r in rows], name="method"))
    if report["config"]["device"].startswith("cuda"):
        table["lib MiB"] = [r["library_peak_mib"] for r in rows]
        table["ref MiB"] = [r["reference_peak_mib"] for r in rows]
    return table


def parts_table(report: dict) -> pd.DataFrame:
    """DynaPrompt's time per part, ms/sample, both sides."""
    rows = {}
    for name in ("dynaprompt", "dynaprompt_official"):
        parts = report["parts"].get(name)
        if parts:
            lib, ref = parts["library_parts_ms"], parts["reference_parts_ms"] or {}
            rows[name] = {"lib metrics": lib.get("metrics"), "lib fwd+bwd": lib.get("tune"),
                          "lib predict": lib.get("predict"), "ref metrics": ref.get("metrics"),
                          "ref fwd+bwd": ref.get("tune"), "ref predict": ref.get("predict")}
    return pd.DataFrame.from_dict(rows, orient="index")


def lockstep_table(report: dict) -> pd.DataFrame:
    """Per method: one-by-one against lockstep over the same orderings."""
    rows = {f"{r['method']} x{r['orderings']}": {
        "one-by-one ms": r["one_by_one_ms_per_sample"], "lockstep ms": r["lockstep_ms_per_sample"],
        "throughput": r["throughput_ratio"], "identical": f"{r['identical_predictions']}/{r['samples_total']}",
        "max|dH|": r["max_entropy_diff"]} for r in report["lockstep"]}
    return pd.DataFrame.from_dict(rows, orient="index")


def cache_table(report: dict) -> pd.DataFrame:
    """Per plan: image-encoder passes with and without the feature cache."""
    rows = {p["plan"]: {"runs": p["runs"], "datasets": p["datasets"], "cached": p["cached_passes"],
                        "uncached": p["uncached_passes"], "saved": p["saved_passes"], "factor": p["factor"]}
            for p in report["feature_cache"]}
    return pd.DataFrame.from_dict(rows, orient="index")


def memory_line(report: dict) -> str:
    """What the memory figures are: per method on CUDA, the process's peak RSS once on CPU."""
    if report["config"]["device"].startswith("cuda"):
        return ("peak memory (lib/ref MiB): torch.cuda.max_memory_allocated over each call, reset before it, "
                "max over the method's calls; model and cache included")
    return (f"peak memory: {report['peak_rss_mib']:.0f} MiB, the process's peak RSS at the end (getrusage), over the "
            "whole run (model, cache and every method); a CPU run gives no per-method figure")


def format_report(report: dict) -> str:
    """The report as text: a header, then the tables."""
    c = report["config"]
    load = report["load_average_start_end"]
    one_minute = [f"{x[0]:.1f}" if x else "-" for x in load]
    lines = [
        f"\n{c['arch']}, {c['classes']} classes, {c['samples']} samples x {c['views']} views, M={c['buffer_size']}, "
        f"{c['device']}, {c['threads']} threads, torch {c['torch']}",
        f"text tokens per sequence: library {c['text_tokens_library']} (truncated), reference "
        f"{c['text_tokens_reference']}; feature cache build {report['cache_build_ms_per_sample']:.1f} ms/sample "
        "(views + image encoder, once per dataset, not in the library times)",
    ]
    if c["reference_samples"] < c["samples"]:
        lines.append(f"reference on the first {c['reference_samples']} samples: speedup and identical compare those; "
                     f"library ms is the mean over all {c['samples']}")
    lines += ["", "ms per sample (mean); x TPT = over TPT's ms/sample on the same side; speedup = reference / library; "
              "identical = same prediction; max|dH| = largest difference of the final entropy",
              show(methods_table(report))]
    peers = [r["method"] for r in report["methods"] if r["method"] in PEERS]
    lines += [f"  {r['method']}: reference skipped, {r['skipped']}" for r in report["methods"]
              if r["skipped"] and r["method"] not in PEERS]
    lines += [f"  {', '.join(peers)}: library only, {PEER_NOTE}"] if peers else []
    if report["dynaprompt_tpt_ratio"]:
        lines.append("DynaPrompt/TPT per-sample time: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in report["dynaprompt_tpt_ratio"].items()))
    lines.append(memory_line(report))
    parts = parts_table(report)
    if not parts.empty:
        lines += ["", "DynaPrompt's parts, ms/sample (library metrics from carried features; reference metrics = "
                  "image encoder + grad forward over every prompt, fwd+bwd through every prompt)", show(parts)]
    if report["lockstep"]:
        lines += ["", "lockstep against one by one (same orderings)", show(lockstep_table(report))]
    lines += ["", "image-encoder passes over a sweep (one pass = the encoder over one sample's views)",
              show(cache_table(report))]
    lines += [f"  {p['plan']}: left out (size unknown): {', '.join(p['left_out'])}"
              for p in report["feature_cache"] if p.get("left_out")]
    lines.append(f"\nbenchmark wall time {report['wall_seconds']:.0f} s; 1-min load average at start {one_minute[0]}, "
                 f"at end {one_minute[1]} ({os.cpu_count()} CPUs)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny-clip", help="tiny-clip (bundled) or an open_clip config, e.g. ViT-B-16")
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--samples", type=int, default=8, help="test samples in the stream")
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--buffer-size", type=int, default=10, help="DynaPrompt's M")
    p.add_argument("--max-text-tokens", type=int, default=0,
                   help="the library's text-encoder tokens per pass, chunked above (run.max_text_tokens); 0: one pass")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--methods", default=",".join(METHOD_NAMES),
                   help="comma-separated subset of " + ",".join(METHOD_NAMES))
    p.add_argument("--lockstep-orderings", type=int, default=3,
                   help="orderings for the lockstep comparison; 0 skips it")
    p.add_argument("--max-reference-gib", type=float, default=None,
                   help="skip a reference whose autograd graph would need more (default: 80%% of free memory)")
    p.add_argument("--params", default="params.yaml", help="sweep plan for the feature-cache arithmetic (if present)")
    p.add_argument("--warmup", type=int, default=1, help="untimed samples each method runs first (then reset)")
    p.add_argument("--lockstep-repeats", type=int, default=1,
                   help="1: one-by-one then lockstep; 2: one-by-one, lockstep, lockstep, one-by-one (ABBA)")
    p.add_argument("--reference-samples", type=int, default=None,
                   help="run the reference on the first K samples only (speedup and identity over those K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/benchmark.json")
    return p


def chosen_methods(value: str) -> list[str]:
    """The names of `--methods`, checked."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(METHOD_NAMES))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {METHOD_NAMES}")
    return names


def run_config(args, bench: Bench) -> dict:
    """The settings the numbers were measured under."""
    device = bench.device
    return {
        "arch": args.arch, "classes": args.classes, "samples": args.samples, "views": args.views,
        "buffer_size": args.buffer_size, "threads": torch.get_num_threads(), "device": str(device),
        "reference_samples": min(args.reference_samples or args.samples, args.samples), "warmup": args.warmup,
        "tuning": asdict(bench.tuning), "text_tokens_library": bench.text.sequence_length,
        "max_text_tokens": args.max_text_tokens,
        "text_tokens_reference": bench.plain.context_length, "image_size": bench.clip.image_size,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def main(argv=None) -> dict:
    """Run the benchmark, print the report and write it as JSON; returns the report."""
    args = _parser().parse_args(argv)
    names = chosen_methods(args.methods)
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), load_average()
    bench = prepare(args)
    budget = args.max_reference_gib if args.max_reference_gib is not None else 0.8 * available_memory_gib(bench.device)
    specs = method_specs(args.buffer_size)
    rows, details = [], {}
    for name in names:
        row, details[name] = measure(name, specs[name], bench, args, budget)
        rows.append(row)
        side = f"reference {row['reference_ms']:.1f} ms/sample" if row["reference_ms"] else row["skipped"]
        print(f"  {name}: library {row['library_ms']:.1f} ms/sample; {side}", flush=True)
    ratios = compare_to_tpt(rows)
    lockstep = [lockstep_comparison(name, specs[name], bench, args.lockstep_orderings, args.seed, args.lockstep_repeats)
                for name in names if name in LOCKSTEP_METHODS and args.lockstep_orderings > 1]
    report = {
        "command": " ".join(["python -m benchmarks.bench", *(argv if argv is not None else sys.argv[1:])]),
        "config": run_config(args, bench),
        "cache_build_ms_per_sample": bench.cache_ms,
        "methods": rows,
        "parts": details,
        "dynaprompt_tpt_ratio": ratios,
        "lockstep": lockstep,
        "feature_cache": sweep_plans(args.params, bench.tuning.steps),
        "peak_rss_mib": peak_rss_mib(),
        "wall_seconds": time.perf_counter() - started,
        "load_average_start_end": [load_start, load_average()],
    }
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"\nwritten to {out}")
    return report


if __name__ == "__main__":
    main()
