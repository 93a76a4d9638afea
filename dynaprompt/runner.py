"""One run: a method over one ordering of one dataset -> per-sample records and a summary."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import Settings, project_path
from .datasets import open_dataset
from .features import CachedViewSource, FeatureStore, ImageViewSource, ViewEncoder, cache_identity
from .methods import build_method
from .model import LoadedClip, load_clip
from .orderings import order_samples
from .records import make_record, records_frame, summarize
from .text import PromptTextEncoder


@dataclass
class RunResult:
    """The records table of one run, its summary, and what describes the run."""

    records: pd.DataFrame
    summary: dict
    meta: dict = field(default_factory=dict)


def run_stream(method, sample_ids, labels: dict, view_source, progress: bool = False, desc: str = "") -> pd.DataFrame:
    """Feed `sample_ids` in order to `method` (reset first); one record per sample."""
    method.reset()
    records = []
    bar = tqdm(total=len(sample_ids), desc=desc, disable=not progress, unit="sample")
    for position, sample_id in enumerate(sample_ids):
        view_features = view_source(sample_id)
        start = time.perf_counter()
        outcome = method(view_features)
        seconds = time.perf_counter() - start
        records.append(make_record(position, sample_id, labels[sample_id], outcome, seconds))
        bar.update(1)
        if progress:
            bar.set_postfix(acc=f"{sum(r['correct'] for r in records) / len(records):.3f}")
    bar.close()
    return records_frame(records)


def _lookup(table: dict, name: str, what: str) -> dict:
    if name not in table:
        raise KeyError(f"{what} {name!r} is not defined in params (defined: {sorted(table)})")
    return table[name]


def build_text_encoder(clip: LoadedClip, classnames, settings: Settings) -> PromptTextEncoder:
    """The prompt encoder of `settings.prompt` over `classnames`."""
    prompt = settings.prompt
    return PromptTextEncoder(
        clip.model, clip.tokenizer, classnames,
        n_ctx=prompt.n_ctx, ctx_init=prompt.ctx_init, truncate=prompt.truncate, init_seed=prompt.init_seed,
    )


def cached_features(settings: Settings, dataset: str, clip: LoadedClip, views) -> CachedViewSource | None:
    """The embed stage's cache of `dataset` when it is complete, else None (features come from images)."""
    root = project_path(settings, "features")
    if root is None or not (root / dataset / "meta.json").is_file():
        return None
    store = FeatureStore(root / dataset)
    if not store.read_meta().get("complete"):
        return None
    return store.load(clip.device, identity=cache_identity(clip, settings.model.arch, views))


def run_one(
    settings: Settings, dataset: str, method: str, ordering: str,
    limit: int | None = None, feature_cache: CachedViewSource | None = None, progress: bool = False,
    clip: LoadedClip | None = None,
) -> RunResult:
    """Run `method` on `ordering` of `dataset`, all named in `settings`."""
    dataset_spec = _lookup(settings.datasets, dataset, "dataset")
    method_spec = _lookup(settings.methods, method, "method")
    ordering_spec = _lookup(settings.orderings, ordering, "ordering")
    clip = clip or load_clip(settings.model)
    data = open_dataset(dataset, dataset_spec, project_path(settings, "prepared"), settings.base_dir)
    views = replace(settings.views, augmix=bool(dataset_spec.get("augmix", data.fine_grained)))
    stream = order_samples(data.manifest, ordering_spec)[:limit]
    labels = dict(zip(data.manifest["sample_id"], data.manifest["label"]))
    source = feature_cache or cached_features(settings, dataset, clip, views)
    source = source or ImageViewSource(data, ViewEncoder(clip, views, amp=settings.tuning.amp))
    text = build_text_encoder(clip, data.classnames, settings)
    runner = build_method(method_spec, text, settings.tuning)
    records = run_stream(runner, stream, labels, source, progress=progress, desc=f"{dataset}/{method}/{ordering}")
    summary = summarize(records, settings.block_size)
    if hasattr(runner, "final_buffer"):
        summary["final_buffer"] = runner.final_buffer()
    meta = {
        "dataset": dataset, "method": method, "ordering": ordering, "weights": clip.weights,
        "device": str(clip.device), "torch_threads": torch.get_num_threads(),
    }
    return RunResult(records=records, summary=summary, meta=meta)
