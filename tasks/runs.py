"""The run task: one (dataset, method, ordering) -> records + summary on disk, skipped when already done."""
from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch
from prefect import task

from dynaprompt.config import load_settings
from dynaprompt.methods import is_order_independent
from dynaprompt.model import load_clip
from dynaprompt.orderings import order_samples
from dynaprompt.plan import RunKey
from dynaprompt.records import summarize
from dynaprompt.runner import execute, final_state, lookup, open_named_dataset, run_fingerprint
from tasks.gpu import gpu_slot

SHARED_ORDERING = "__natural__"  # order-independent methods run once, in manifest order, then get reordered


@lru_cache(maxsize=4)
def _settings(params_file: str):
    return load_settings(params_file)


@lru_cache(maxsize=2)
def _clip(params_file: str):
    """One frozen CLIP per process, shared by every run it executes."""
    return load_clip(_settings(params_file).model)


def write_atomically(frame_or_text, target: Path) -> None:
    """Write then rename, so a killed run never leaves a file that looks finished."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    if isinstance(frame_or_text, pd.DataFrame):
        frame_or_text.to_parquet(partial, index=False)
    else:
        partial.write_text(frame_or_text)
    os.replace(partial, target)


def finished_summary(key: RunKey, results: Path, fingerprint: str) -> dict | None:
    """The saved summary of `key` when its records exist for the same fingerprint, else None."""
    summary_file, records_file = key.summary_path(results), key.records_path(results)
    if not (summary_file.is_file() and records_file.is_file()):
        return None
    summary = json.loads(summary_file.read_text())
    return summary if summary.get("fingerprint") == fingerprint else None


def shared_key(key: RunKey) -> RunKey:
    return RunKey(key.dataset, key.method, SHARED_ORDERING)


def _execute(params_file: str, key: RunKey, stream_ordering: str | None):
    """Run the method over the ordering's stream (or the manifest order for a shared run)."""
    settings, clip = _settings(params_file), _clip(params_file)
    ordering_spec = {"kind": "natural"} if stream_ordering is None else lookup(settings.orderings, key.ordering,
                                                                                "ordering")
    records, method = execute(settings, clip, key.dataset, key.method, ordering_spec)
    return records, final_state(method)


def reorder(shared: pd.DataFrame, stream: list[str]) -> pd.DataFrame:
    """The shared records of an order-independent method, in another ordering's sequence."""
    reordered = shared.set_index("sample_id").loc[stream].reset_index()
    reordered["position"] = range(len(reordered))
    return reordered[shared.columns]


@task(retries=1, retry_delay_seconds=2, task_run_name="{dataset}/{method}/{ordering}")
def run_task(params_file: str, results: str, dataset: str, method: str, ordering: str, threads: int = 1) -> dict:
    """One run of the sweep; returns its summary (with `reused: true` when the records were already there)."""
    torch.set_num_threads(threads)
    settings, clip = _settings(params_file), _clip(params_file)
    key, results = RunKey(dataset, method, ordering), Path(results)
    fingerprint = run_fingerprint(settings, dataset, method, ordering, clip)
    done = finished_summary(key, results, fingerprint)
    if done:
        return {**done, "reused": True}
    start = time.perf_counter()
    method_spec = lookup(settings.methods, method, "method")
    with gpu_slot(settings.model.device):
        if is_order_independent(method_spec):
            records, extra = _shared_records(params_file, key, results)
            data = open_named_dataset(settings, dataset)
            records = reorder(records, order_samples(data.manifest, lookup(settings.orderings, ordering, "ordering")))
        else:
            records, extra = _execute(params_file, key, ordering)
    summary = {
        **summarize(records, settings.block_size), **extra, "dataset": dataset, "method": method,
        "method_kind": method_spec["kind"], "ordering": ordering,
        "ordering_kind": settings.orderings[ordering]["kind"], "order_independent": is_order_independent(method_spec),
        "fingerprint": fingerprint, "wall_seconds": time.perf_counter() - start, "weights": clip.weights,
    }
    write_atomically(records, key.records_path(results))
    write_atomically(json.dumps(summary, indent=2, default=str), key.summary_path(results))
    return {**summary, "reused": False}


def _shared_records(params_file: str, key: RunKey, results: Path):
    """The manifest-order records of an order-independent method, computed once per dataset and method."""
    settings, clip = _settings(params_file), _clip(params_file)
    shared = shared_key(key)
    fingerprint = run_fingerprint(settings, key.dataset, key.method, None, clip)
    done = finished_summary(shared, results, fingerprint)
    if done:
        return pd.read_parquet(shared.records_path(results)), {}
    records, extra = _execute(params_file, key, None)
    write_atomically(records, shared.records_path(results))
    write_atomically(json.dumps({"fingerprint": fingerprint}), shared.summary_path(results))
    return records, extra
