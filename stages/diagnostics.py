"""diagnostics: the diagnostics behind two findings, per swept stream -> reports/diagnostics.json (issue 27).

For every stream of the sweep and each of its methods of kind `ecalp` or `ctpt`, from the view features the runs
read (the embed stage's cache; the image encoder where it is missing) and the model, with the method's settings as
its run resolves them (`dynaprompt.resolve`: templates, options, tuning):
- ECALP, over every sample of the stream: the share of negative top-k text edges and the share of nodes whose
  heaviest text edge is not their zero-shot top-1 (`dynaprompt.diagnostics.ecalp_text_edges`), on the text
  classifier ECALP builds;
- C-TPT, over `report.diagnostic_samples` samples drawn with `report.seed` (its first step costs a text-encoder pass
  and its backward per sample): the median ratio of the dispersion term's gradient to the entropy's and the share
  of the step's coordinates that follow the dispersion (`ctpt_gradients`).
The report puts them next to the methods' accuracy and C-TPT's agreement with zero-shot (from the records).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from dynaprompt.diagnostics import ctpt_gradients, ecalp_text_edges
from dynaprompt.methods import build_method
from dynaprompt.methods.ecalp import node_feature
from dynaprompt.plan import main_runs
from dynaprompt.resolve import ResolvedRun, resolve
from dynaprompt.results import SHARED_ORDERING, RunKey
from dynaprompt.runner import build_text_encoder, open_stream, view_source_for
from dynaprompt.specs import Settings

from .common import settings, write_json

DIAGNOSED = ("ecalp", "ctpt")  # method kinds with a diagnostic


def diagnosed_methods(config: Settings) -> dict:
    """stream -> method kind -> the sweep's methods of that kind on the stream, in plan order."""
    out: dict = {}
    for key in main_runs(config):
        kind = config.method(key.method).kind
        if kind in DIAGNOSED:
            methods = out.setdefault(key.dataset, {k: [] for k in DIAGNOSED})[kind]
            methods += [] if key.method in methods else [key.method]
    return out


def sample_subset(sample_ids: list, n: int, seed: int) -> list:
    """`n` samples of the stream drawn with `seed`, in manifest order (all of them when the stream is shorter)."""
    chosen = np.random.default_rng(seed).choice(len(sample_ids), size=min(n, len(sample_ids)), replace=False)
    return [sample_ids[i] for i in sorted(chosen)]


def ecalp_diagnostic(run: ResolvedRun, text, source, sample_ids: list) -> dict:
    """ECALP's text edges over every sample, on the classifier and options its run builds."""
    method = build_method(run.method.kind, text, run.run.tuning, run.run.options, run.run.templates)
    nodes = torch.stack([node_feature(source(s), method.config.view) for s in sample_ids])
    return ecalp_text_edges(nodes, method.text_features, method.config)


def ctpt_diagnostic(run: ResolvedRun, text, source, sample_ids: list, config: Settings) -> dict | None:
    """C-TPT's first step on a seeded subset of the stream, at its run's tuning and lambda."""
    chosen = sample_subset(sample_ids, config.report.diagnostic_samples, config.report.seed)
    if not chosen:
        return None
    return ctpt_gradients(text, (source(s) for s in chosen), run.run.tuning, run.run.options.lambda_term)


def stream_diagnostics(config: Settings, clip, stream: str, methods: dict) -> dict:
    """Every diagnosed method of one stream."""
    data = open_stream(config, stream)
    sample_ids = list(data.manifest["sample_id"])
    out = {"n_samples": len(sample_ids), "ecalp": {}, "ctpt": {}}
    for kind, names in methods.items():
        for name in names:
            started = time.perf_counter()
            run = resolve(config, RunKey(stream, name, SHARED_ORDERING), clip.weights)
            text = build_text_encoder(clip, data.classnames, config, run.run.max_text_tokens)
            source = view_source_for(run, data, clip)
            found = (ecalp_diagnostic(run, text, source, sample_ids) if kind == "ecalp"
                     else ctpt_diagnostic(run, text, source, sample_ids, config))
            if found is not None:
                out[kind][name] = found
            print(f"diagnostics {stream}/{name}: {found} ({time.perf_counter() - started:.1f}s)", flush=True)
    return out


def main() -> None:
    config = settings()
    torch.set_num_threads(config.run.threads)
    targets = diagnosed_methods(config)
    out = {"model": config.model.arch, "diagnostic_samples": config.report.diagnostic_samples,
           "seed": config.report.seed, "streams": {}}
    if targets:  # the model only where a diagnosed method runs
        from dynaprompt.model import load_model

        clip = load_model(config)
        with torch.no_grad():
            out["streams"] = {stream: stream_diagnostics(config, clip, stream, methods)
                              for stream, methods in targets.items()}
    write_json(config.path("reports") / "diagnostics.json", out)


if __name__ == "__main__":
    main()
