"""One run: a method over one ordering of one dataset -> per-sample records and a summary."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import Settings, project_path
from .datasets import ManifestDataset, open_dataset
from .datasets.base import MixtureDataset
from .features import (
    CachedViewSource,
    FeatureStore,
    ImageViewSource,
    MixtureViewSource,
    ViewEncoder,
    cache_identity,
    weights_fingerprint,
)
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


def lookup(table: dict, name: str, what: str) -> dict:
    """`table[name]`, or an error naming what is defined."""
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


def open_named_dataset(settings: Settings, name: str) -> ManifestDataset:
    """A dataset or a mixture of datasets, by its name in params (prepared copies preferred)."""
    if name in settings.mixtures:
        spec = dict(settings.mixtures[name])
        members = {m: open_named_dataset(settings, m) for m in spec.pop("members")}
        return MixtureDataset(name, members, **spec)
    spec = lookup(settings.datasets, name, "dataset")
    return open_dataset(name, spec, project_path(settings, "prepared"), settings.base_dir)


def tuning_for(settings: Settings, dataset: str):
    """The tuning config of a dataset: `datasets.<name>.lr` (3e-3 for the fine-grained sets) overrides the default."""
    spec = settings.datasets.get(dataset)
    if spec is None and dataset in settings.mixtures:
        spec = settings.datasets.get(settings.mixtures[dataset]["members"][0], {})
    lr = (spec or {}).get("lr")
    return replace(settings.tuning, lr=float(lr)) if lr is not None else settings.tuning


def views_for(settings: Settings, dataset: ManifestDataset):
    """The view config of a dataset: AugMix on for the fine-grained sets."""
    return replace(settings.views, augmix=bool(dataset.fine_grained))


def cached_features(settings: Settings, dataset: str, clip: LoadedClip, views) -> CachedViewSource | None:
    """The embed stage's cache of `dataset` when it is complete, else None (features come from images)."""
    root = project_path(settings, "features")
    if root is None or not (root / dataset / "meta.json").is_file():
        return None
    store = FeatureStore(root / dataset)
    if not store.read_meta().get("complete"):
        return None
    return store.load(clip.device, identity=cache_identity(clip, settings.model.arch, views))


def view_source_for(settings: Settings, dataset: ManifestDataset, clip: LoadedClip):
    """Cached view features where the embed stage wrote them, else the image encoder over the images."""
    if isinstance(dataset, MixtureDataset):
        return MixtureViewSource({m: view_source_for(settings, d, clip) for m, d in dataset.members.items()})
    views = views_for(settings, dataset)
    cached = cached_features(settings, dataset.name, clip, views)
    return cached or ImageViewSource(dataset, ViewEncoder(clip, views, amp=settings.tuning.amp))


RESULT_CODE = ("methods", "objectives.py", "text.py", "orderings.py", "records.py")  # what computes the records


def code_fingerprint() -> str:
    """A hash of the library code that computes records: a bug fix there invalidates finished runs."""
    package = Path(__file__).parent
    files = sorted(f for name in RESULT_CODE for f in ([package / name] if name.endswith(".py")
                                                       else (package / name).glob("*.py")))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(settings: Settings, dataset: str, method: str, ordering: str | None, clip: LoadedClip) -> str:
    """A hash of everything a run's records depend on; equal fingerprints mean the records can be reused.

    `ordering=None` fingerprints the manifest-order run that order-independent methods share.
    """
    relevant = {
        "model": asdict(settings.model) | {"weights": weights_fingerprint(clip.weights)},
        "prompt": asdict(settings.prompt), "views": asdict(settings.views), "tuning": asdict(settings.tuning),
        "dataset": settings.mixtures.get(dataset) or settings.datasets.get(dataset),
        "members": {m: settings.datasets.get(m) for m in (settings.mixtures.get(dataset) or {}).get("members", [])},
        "method": lookup(settings.methods, method, "method"),
        "ordering": lookup(settings.orderings, ordering, "ordering") if ordering else {"kind": "natural"},
        "block_size": settings.block_size,
        "code": code_fingerprint(),
    }
    relevant["model"].pop("device", None)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:20]


def execute(settings: Settings, clip: LoadedClip, dataset: str, method: str, ordering_spec: dict,
            limit: int | None = None, feature_cache=None, progress: bool = False, desc: str = ""):
    """Records of `method` over one ordering of `dataset`, and the method (for its final state)."""
    data = open_named_dataset(settings, dataset)
    stream = order_samples(data.manifest, ordering_spec)[:limit]
    labels = dict(zip(data.manifest["sample_id"], data.manifest["label"]))
    source = feature_cache or view_source_for(settings, data, clip)
    text = build_text_encoder(clip, data.classnames, settings)
    runner = build_method(lookup(settings.methods, method, "method"), text, tuning_for(settings, dataset))
    records = run_stream(runner, stream, labels, source, progress=progress, desc=desc)
    if "domain" in data.manifest.columns:
        records["domain"] = records["sample_id"].map(dict(zip(data.manifest["sample_id"], data.manifest["domain"])))
    return records, runner


def final_state(runner) -> dict:
    """What a method leaves at the end of a stream worth keeping in the summary (DynaPrompt's buffer)."""
    return {"final_buffer": runner.final_buffer()} if hasattr(runner, "final_buffer") else {}


def run_one(
    settings: Settings, dataset: str, method: str, ordering: str,
    limit: int | None = None, feature_cache=None, progress: bool = False, clip: LoadedClip | None = None,
) -> RunResult:
    """Run `method` on `ordering` of `dataset`, all named in `settings`."""
    method_spec = lookup(settings.methods, method, "method")
    ordering_spec = lookup(settings.orderings, ordering, "ordering")
    clip = clip or load_clip(settings.model)
    records, runner = execute(settings, clip, dataset, method, ordering_spec, limit, feature_cache, progress,
                              desc=f"{dataset}/{method}/{ordering}")
    summary = {**summarize(records, settings.block_size), **final_state(runner)}
    meta = {
        "dataset": dataset, "method": method, "method_kind": method_spec.get("kind"), "ordering": ordering,
        "ordering_kind": ordering_spec.get("kind"), "order_independent": bool(runner.order_independent),
        "weights": clip.weights, "device": str(clip.device), "torch_threads": torch.get_num_threads(),
    }
    return RunResult(records=records, summary=summary, meta=meta)
