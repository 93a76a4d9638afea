"""One run: a method over one ordering of one dataset -> per-sample records and a summary, stored once.

`store_run` is the one executor: the CLI and the sweep's task both call it, so a run gives the same records
from either entry point (same settings, same torch thread count, same code).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import RunSettings, Settings, member_views, resolve_run
from .datasets import ManifestDataset, open_dataset
from .datasets.base import MixtureDataset
from .features import FeatureStore, ImageViewSource, MixtureViewSource, ViewEncoder, cache_identity
from .methods import build_method
from .model import LoadedClip
from .objectives import NonFiniteError
from .orderings import order_samples
from .provenance import run_fingerprint
from .records import make_record, records_frame, summarize
from .results import SHARED_ORDERING, ResultsLayout, RunKey, RunSummary
from .text import PromptTextEncoder


class RunFailed(RuntimeError):
    """A run stopped on a sample it could not process; the message names the run, the sample and its position."""


class SampleError(RuntimeError):
    """A sample whose features could not be had (unreadable image, missing cache row)."""


@dataclass
class RunResult:
    """The records table of one run and its summary."""

    records: pd.DataFrame
    summary: RunSummary


def run_stream(method, sample_ids, labels: dict, view_source, progress: bool = False, desc: str = "") -> pd.DataFrame:
    """Feed `sample_ids` in order to `method` (reset first); one record per sample.

    Non-finite view features, logits, losses or contexts stop the stream with a NonFiniteError naming the
    sample and its position: a NaN must not become "predicted class 0" and poison the samples after it.
    """
    if hasattr(method, "start_stream"):  # a method that needs the stream's length (OnZeta's schedule)
        method.start_stream(len(sample_ids))
    else:
        method.reset()
    records = []
    bar = tqdm(total=len(sample_ids), desc=desc, disable=not progress, unit="sample")
    for position, sample_id in enumerate(sample_ids):
        try:
            view_features = view_source(sample_id)
            if not torch.isfinite(view_features).all():
                raise NonFiniteError("view features")
            start = time.perf_counter()
            outcome = method(view_features)
            seconds = time.perf_counter() - start
            if not (math.isfinite(outcome.entropy_before) and math.isfinite(outcome.entropy_after)):
                raise NonFiniteError("logits")
        except NonFiniteError as error:
            raise NonFiniteError(f"{error} at sample {sample_id!r} (stream position {position})") from None
        except (OSError, ValueError, KeyError) as error:
            raise SampleError(f"{error} at sample {sample_id!r} (stream position {position})") from error
        records.append(make_record(position, sample_id, labels[sample_id], outcome, seconds))
        bar.update(1)
        if progress and position % 20 == 0:
            bar.set_postfix(acc=f"{sum(r['correct'] for r in records) / len(records):.3f}")
    bar.close()
    return records_frame(records)


def build_text_encoder(clip: LoadedClip, classnames, settings: Settings) -> PromptTextEncoder:
    """The prompt encoder of `settings.prompt` over `classnames`."""
    prompt = settings.prompt
    return PromptTextEncoder(clip.model, clip.tokenizer, classnames, n_ctx=prompt.n_ctx, ctx_init=prompt.ctx_init,
                             truncate=prompt.truncate, init_seed=prompt.init_seed)


def open_stream(settings: Settings, name: str) -> ManifestDataset:
    """A dataset or a mixture of datasets, by its name in params (prepared copies preferred)."""
    if name in settings.mixtures:
        spec = settings.mixtures[name]
        members = {m: open_stream(settings, m) for m in spec.members}
        return MixtureDataset(name, members, per_member=spec.per_member, seed=spec.seed)
    spec = settings.stream(name)
    return open_dataset(name, spec.kind, dict(spec.options), settings.path("prepared"), settings.base_dir)


def feature_store(settings: Settings, dataset: str, views) -> FeatureStore:
    """Where the embed stage keeps `dataset`'s view features for these views."""
    return FeatureStore.for_views(settings.path("features") / dataset, views)


def view_source_for(settings: Settings, data: ManifestDataset, clip: LoadedClip, method: str):
    """Cached view features where the embed stage wrote them, else the image encoder over the images."""
    views = member_views(settings, data.name, method)
    if isinstance(data, MixtureDataset):
        return MixtureViewSource({m: member_source(settings, d, clip, views[m]) for m, d in data.members.items()})
    return member_source(settings, data, clip, views[data.name])


def member_source(settings: Settings, data: ManifestDataset, clip: LoadedClip, views):
    store = feature_store(settings, data.name, views)
    if store.is_complete():
        return store.load(clip.device, identity=cache_identity(clip, settings.model.arch, views))
    return ImageViewSource(data, ViewEncoder(clip, views, amp=settings.tuning.amp))


def execute(settings: Settings, key: RunKey, clip: LoadedClip, limit: int | None = None, view_source=None,
            progress: bool = False) -> RunResult:
    """Run `key.method` over `key.ordering` of `key.dataset` (`__shared__`: the manifest order)."""
    run = resolve_run(settings, key.dataset, key.method)
    method_spec = settings.method(key.method)
    data = open_stream(settings, key.dataset)
    ordering = {"kind": "natural"} if key.ordering == SHARED_ORDERING else settings.ordering(key.ordering)
    stream = order_samples(data.manifest, ordering)[:limit]
    labels = dict(zip(data.manifest["sample_id"], data.manifest["label"]))
    source = view_source or view_source_for(settings, data, clip, key.method)
    text = build_text_encoder(clip, data.classnames, settings)
    started = time.time()
    # the run's thread count is part of its identity (sums are split by thread); every run of a process uses
    # the same `run.threads`, so concurrent runs in one process never set it differently
    torch.set_num_threads(run.threads)
    method = build_method(method_spec.kind, text, run.tuning, run.options, run.templates)
    try:
        records = run_stream(method, stream, labels, source, progress=progress, desc=key.label)
    except NonFiniteError as error:
        raise RunFailed(f"{key.label}: non-finite {error}") from None
    except SampleError as error:
        raise RunFailed(f"{key.label}: {error}") from None
    if "domain" in data.manifest.columns:
        records["domain"] = records["sample_id"].map(dict(zip(data.manifest["sample_id"], data.manifest["domain"])))
    summary = make_summary(settings, key, run, records, clip, started, method)
    return RunResult(records, summary)


def make_summary(settings: Settings, key: RunKey, run: RunSettings, records: pd.DataFrame, clip: LoadedClip,
                 started: float, method) -> RunSummary:
    method_spec = settings.method(key.method)
    ordering_kind = "natural" if key.ordering == SHARED_ORDERING else settings.ordering(key.ordering).kind
    final = {"final_buffer": method.final_buffer()} if hasattr(method, "final_buffer") else {}
    return RunSummary(
        dataset=key.dataset, method=key.method, method_kind=method_spec.kind, ordering=key.ordering,
        ordering_kind=ordering_kind, order_independent=method_spec.order_independent,
        **summarize(records, run.block_size), fingerprint=run_fingerprint(settings, key, clip.weights),
        weights=clip.weights, device=str(clip.device), wall_seconds=time.time() - started, started_at=started,
        ended_at=time.time(), settings=run.describe(), final_state=final,
    )


def reorder(shared: pd.DataFrame, stream: list[str]) -> pd.DataFrame:
    """The shared records of an order-independent method, in another ordering's sequence."""
    reordered = shared.set_index("sample_id").loc[stream].reset_index()
    reordered["position"] = range(len(reordered))
    return reordered[shared.columns]


def store_run(settings: Settings, key: RunKey, clip: LoadedClip, layout: ResultsLayout,
              progress: bool = False) -> tuple[RunSummary, bool]:
    """Compute and store one run unless it is already finished with the same fingerprint; (summary, reused).

    Order-independent methods compute their records once per dataset, in manifest order, and every ordering
    gets them reordered.
    """
    fingerprint = run_fingerprint(settings, key, clip.weights)
    done = layout.finished(key, fingerprint)
    if done is not None:
        return done, True
    if not settings.method(key.method).order_independent:
        result = execute(settings, key, clip, progress=progress)
        layout.write_run(key, result.records, result.summary)
        return result.summary, False
    shared, started = key.shared(), time.time()
    if layout.finished(shared, run_fingerprint(settings, shared, clip.weights)) is None:
        try:
            result = execute(settings, shared, clip, progress=progress)
        except RunFailed as error:  # name the run that was asked for; the shared run is how it is computed
            raise RunFailed(f"{key.label} (computed once per dataset, in manifest order, as {error})") from None
        layout.write_run(shared, result.records, result.summary)
    data = open_stream(settings, key.dataset)
    records = reorder(layout.read_records(shared), order_samples(data.manifest, settings.ordering(key.ordering)))
    base = layout.read_summary(shared)
    summary = RunSummary(**{**vars(base), **summarize(records, settings.run.block_size), "ordering": key.ordering,
                            "ordering_kind": settings.ordering(key.ordering).kind, "fingerprint": fingerprint,
                            "started_at": started, "ended_at": time.time(), "wall_seconds": time.time() - started})
    layout.write_run(key, records, summary)
    return summary, False
