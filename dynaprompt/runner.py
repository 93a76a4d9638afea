"""One run: a method over one ordering of one dataset -> per-sample records and a summary, stored once.

`store_run` is the one executor: the CLI and the sweep's task both call it with a run resolved once
(`dynaprompt.resolve.resolve`), so a run gives the same records from either entry point (same settings, same
torch thread count, same code). Every `run.checkpoint_every` samples a run writes its records so far and its
method's state (`RunCheckpoint`); a run killed in between resumes there with the same records.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from .checkpoint import RunCheckpoint
from .datasets import ManifestDataset, open_dataset
from .datasets.base import MixtureDataset
from .devices import describe_device, device_line
from .features import (
    FeatureStore,
    ImageViewSource,
    LastBitPerturbation,
    MixtureViewSource,
    ViewEncoder,
    ViewPixelSource,
    cache_identity,
)
from .methods import build_method
from .model import LoadedClip, ModelSpec, load_clip
from .objectives import NonFiniteError
from .orderings import label_correlation, needs_difficulty, order_samples
from .provenance import weights_fingerprint
from .records import make_record, records_frame, summarize
from .resolve import ResolvedRun, resolve
from .results import ResultsLayout, RunKey, RunSummary
from .specs import Settings
from .text import PromptTextEncoder, TemplateCache
from .views import ViewGenerator


class RunFailed(RuntimeError):
    """A run stopped on a sample it could not process; the message names the run, the sample and its position."""


class SampleError(RuntimeError):
    """A sample whose features could not be had (unreadable image, missing cache row)."""


@dataclass
class RunResult:
    """The records table of one run and its summary."""

    records: pd.DataFrame
    summary: RunSummary


def start_method(method, n_samples: int) -> None:
    """A new stream: `start_stream(n)` for a method that needs the stream's length (OnZeta), else `reset()`."""
    if hasattr(method, "start_stream"):
        method.start_stream(n_samples)
    else:
        method.reset()


def run_stream(method, sample_ids, labels: dict, view_source, progress: bool = False, desc: str = "",
               checkpoint: RunCheckpoint | None = None) -> pd.DataFrame:
    """Feed `sample_ids` in order to `method` (reset first); one record per sample.

    With a `checkpoint`, a stream killed earlier resumes after the last sample it saved (its records and the
    method's state), and every `checkpoint.every` samples the records so far and the state are saved again.
    Non-finite view features, logits, losses or contexts stop the stream with a NonFiniteError naming the
    sample and its position: a NaN must not become "predicted class 0" and poison the samples after it.
    """
    start_method(method, len(sample_ids))
    records, first = [], 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        records, state = saved
        method.load_state_dict(state)
        first = len(records)
        print(f"{desc}: resuming at sample {first} of {len(sample_ids)} from its checkpoint {checkpoint.folder}",
              flush=True)
    bar = tqdm(total=len(sample_ids), initial=first, desc=desc, disable=not progress, unit="sample")
    for position in range(first, len(sample_ids)):
        sample_id = sample_ids[position]
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
        if checkpoint is not None and checkpoint.due(len(records), len(sample_ids)):
            checkpoint.save(records, method.state_dict())
        bar.update(1)
        if progress and position % 20 == 0:
            bar.set_postfix(acc=f"{sum(r['correct'] for r in records) / len(records):.3f}")
    bar.close()
    return records_frame(records)


def build_text_encoder(clip: LoadedClip, classnames, settings: Settings, max_tokens: int = 0) -> PromptTextEncoder:
    """The prompt encoder of `settings.prompt` over `classnames`, `max_tokens` per text-encoder pass, its template
    features kept in `paths.cache`."""
    prompt = settings.prompt
    return PromptTextEncoder(clip.model, clip.tokenizer, classnames, n_ctx=prompt.n_ctx, ctx_init=prompt.ctx_init,
                             truncate=prompt.truncate, init_seed=prompt.init_seed, max_tokens=max_tokens,
                             template_cache=template_cache(clip, settings))


def template_cache(clip: LoadedClip, settings: Settings) -> TemplateCache:
    """Where the text features of templates are kept, keyed by this model."""
    identity = {"weights": weights_fingerprint(clip.weights), "arch": settings.model.arch,
                "activation": clip.activation, "device": clip.device.type}
    return TemplateCache(settings.path("cache") / "text", identity)


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


def view_source_for(run: ResolvedRun, data: ManifestDataset, clip: LoadedClip, pixels: bool = False):
    """Cached view features where the embed stage wrote them, else the image encoder over the images; with
    `pixels`, the views themselves (for a method that `reads_images`).

    A mixture reads only the rows of its chosen samples from each member's cache.
    """
    views = run.run.views_by_member
    if isinstance(data, MixtureDataset):
        source = MixtureViewSource({m: member_source(run.settings, d, clip, views[m], pixels)
                                    for m, d in data.members.items()})
    else:
        source = member_source(run.settings, data, clip, views[data.name], pixels)
    if pixels or run.run.perturbation == "none":
        return source
    return LastBitPerturbation(source, run.settings.embed.dtype, run.run.views.view_seed, run.key.replicate)


def member_source(settings: Settings, data: ManifestDataset, clip: LoadedClip, views, pixels: bool = False):
    if pixels:
        return ViewPixelSource(data, ViewGenerator(views, clip.image_size, clip.image_mean, clip.image_std),
                               clip.device)
    store = feature_store(settings, data.name, views)
    if store.is_complete():
        return store.open(clip.device, identity=cache_identity(clip, settings.model.arch, views, settings.embed.dtype))
    print(f"{data.name}: feature cache {store.folder} {store.state()}: making views on the fly on {clip.device.type}; "
          f"run `dvc repro embed@{data.name}` first", flush=True)  # once per run and member: the image encoder
    #   now runs for every sample, every run
    return ImageViewSource(data, ViewEncoder(clip, views, amp=settings.tuning.amp, dtype=settings.embed.dtype))


def execute(run: ResolvedRun, clip: LoadedClip, limit: int | None = None, view_source=None,
            progress: bool = False, checkpoint: RunCheckpoint | None = None) -> RunResult:
    """Run `run.key.method` over its ordering of its dataset (`__shared__`: the manifest order)."""
    if clip.device.type != run.run.device:  # the device type is part of the run's identity
        raise RunFailed(f"{run.label}: resolved for {run.run.device} but the model is on {clip.device}")
    data = open_stream(run.settings, run.key.dataset)
    stream = order_samples(ordering_manifest(run, data, clip), run.ordering)[:limit]
    labels = dict(zip(data.manifest["sample_id"], data.manifest["label"]))
    text = build_text_encoder(clip, data.classnames, run.settings, run.run.max_text_tokens)
    started = time.time()
    # the run's thread count is part of its identity (sums are split by thread); every run of a process uses
    # the same `run.threads`, so concurrent runs in one process never set it differently
    torch.set_num_threads(run.run.threads)
    device = describe_device(clip.device)
    print(f"{run.label}: {device_line(device)}", flush=True)  # every run's first line: where it runs
    method = build_method(run.method.kind, text, run.run.tuning, run.run.options, run.run.templates,
                          **method_models(run, clip))
    source = view_source or view_source_for(run, data, clip, pixels=getattr(method, "reads_images", False))
    try:
        records = run_stream(method, stream, labels, source, progress=progress, desc=run.label,
                             checkpoint=checkpoint)
    except NonFiniteError as error:
        raise RunFailed(f"{run.label}: non-finite {error}") from None
    except SampleError as error:
        raise RunFailed(f"{run.label}: {error}") from None
    if "domain" in data.manifest.columns:
        records["domain"] = records["sample_id"].map(dict(zip(data.manifest["sample_id"], data.manifest["domain"])))
    summary = make_summary(run, records, started, method, device)
    return RunResult(records, summary)


def method_models(run: ResolvedRun, clip: LoadedClip) -> dict:
    """The models a method needs besides the run's CLIP: RLCF's reward CLIP where its `teacher` names one."""
    teacher = getattr(run.run.options, "teacher", None)
    if teacher is None or teacher.arch is None:
        return {}
    return {"teacher": load_teacher(run, teacher, clip)}


def load_teacher(run: ResolvedRun, teacher, clip: LoadedClip) -> LoadedClip:
    """The reward CLIP of `methods.<m>.teacher`, on the run's device, its paths taken from the params' folder.

    It reads the views the run's CLIP is given, so both must normalise images alike (OpenAI's statistics for the
    authors' ViT-B/16 policy and ViT-L/14 teacher); a teacher of another resolution gets the views resized.
    """
    spec = ModelSpec(arch=teacher.arch, pretrained=teacher.pretrained, cache_dir=teacher.cache_dir,
                     allow_download=run.settings.model.allow_download, init_seed=teacher.init_seed,
                     device=str(clip.device), quick_gelu=teacher.quick_gelu)
    loaded = load_clip(spec, run.settings.base_dir)
    if (tuple(loaded.image_mean), tuple(loaded.image_std)) != (tuple(clip.image_mean), tuple(clip.image_std)):
        raise RunFailed(f"{run.label}: methods.{run.key.method}.teacher {teacher.arch!r} normalises images with mean "
                        f"{loaded.image_mean} and std {loaded.image_std}, but the views are normalised for "
                        f"{run.settings.model.arch!r} (mean {clip.image_mean}, std {clip.image_std})")
    return loaded


def ordering_manifest(run: ResolvedRun, data: ManifestDataset, clip: LoadedClip) -> pd.DataFrame:
    """The manifest the run's ordering reads: with the zero-shot `difficulty` column for the kinds that sort by it."""
    if not needs_difficulty(run.ordering_kind):
        return data.manifest
    from .difficulty import with_difficulty

    return with_difficulty(run.settings, data, clip)


def stream_labels(run: ResolvedRun, records: pd.DataFrame) -> dict:
    """The stream's family and how correlated its labels are (the fraction of consecutive same-label pairs)."""
    correlation = label_correlation(records["label"].to_numpy())
    return {"ordering_family": run.ordering_family,
            "label_correlation": None if math.isnan(correlation) else correlation}


def make_summary(run: ResolvedRun, records: pd.DataFrame, started: float, method, device: dict) -> RunSummary:
    final = {"final_buffer": method.final_buffer()} if hasattr(method, "final_buffer") else {}
    return RunSummary(
        dataset=run.key.dataset, method=run.key.method, method_kind=run.method.kind, ordering=run.key.ordering,
        ordering_kind=run.ordering_kind, order_independent=run.order_independent, **stream_labels(run, records),
        **summarize(records, run.run.block_size), fingerprint=run.fingerprint, weights=run.weights,
        seed=run.key.seed, replicate=run.key.replicate, view_seed=run.run.views.view_seed,
        device=device_name(device), device_info=device, wall_seconds=time.time() - started, started_at=started,
        ended_at=time.time(), settings=run.run.describe(), final_state=final,
    )


def device_name(device: dict) -> str:
    """'cpu' or 'cuda:<physical index>' (the index on the node, whatever the process sees)."""
    return "cpu" if device["type"] == "cpu" else f"cuda:{device['physical_index']}"


def reorder(shared: pd.DataFrame, stream: list[str]) -> pd.DataFrame:
    """The shared records of an order-independent method, in another ordering's sequence."""
    reordered = shared.set_index("sample_id").loc[stream].reset_index()
    reordered["position"] = range(len(reordered))
    return reordered[shared.columns]


def compute(run: ResolvedRun, clip: LoadedClip, layout: ResultsLayout, progress: bool = False) -> RunSummary:
    """Execute `run` with checkpoints next to its records, store it, drop the checkpoint; its summary."""
    checkpoint = layout.checkpoint(run.key, run.fingerprint, run.settings.run.checkpoint_every)
    result = execute(run, clip, progress=progress, checkpoint=checkpoint)
    layout.write_run(run.key, result.records, result.summary)
    checkpoint.clear()
    return result.summary


def store_run(run: ResolvedRun, clip: LoadedClip, layout: ResultsLayout,
              progress: bool = False) -> tuple[RunSummary, bool]:
    """Compute and store one run unless it is already finished with the same fingerprint; (summary, reused).

    Order-independent methods compute their records once per dataset, in manifest order, and every ordering
    gets them reordered.
    """
    done = layout.finished(run.key, run.fingerprint)
    if done is not None:
        return done, True
    if not run.order_independent:
        return compute(run, clip, layout, progress), False
    shared, started = run.shared(), time.time()
    if layout.finished(shared.key, shared.fingerprint) is None:
        try:
            compute(shared, clip, layout, progress)
        except RunFailed as error:  # name the run that was asked for; the shared run is how it is computed
            raise RunFailed(f"{run.label} (computed once per dataset, in manifest order, as {error})") from None
    data = open_stream(run.settings, run.key.dataset)
    records = reorder(layout.read_records(shared.key), order_samples(ordering_manifest(run, data, clip), run.ordering))
    base = layout.read_summary(shared.key)
    summary = RunSummary(**{**vars(base), **summarize(records, run.run.block_size), "ordering": run.key.ordering,
                            "ordering_kind": run.ordering_kind, **stream_labels(run, records),
                            "fingerprint": run.fingerprint,
                            "started_at": started, "ended_at": time.time(), "wall_seconds": time.time() - started})
    layout.write_run(run.key, records, summary)
    return summary, False


__all__ = ["RunFailed", "RunKey", "RunResult", "SampleError", "execute", "open_stream", "resolve", "run_stream",
           "store_run"]
