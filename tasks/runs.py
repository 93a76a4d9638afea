"""The run task: several runs of one (dataset, method) in one worker, each through the library's one executor.

A task runs a batch of cells (orderings, each under a view seed) one after another in the same process, so the
worker's start, its model and the task's bookkeeping are paid once per batch, not once per run. Each run is still
checked, locked, computed, checkpointed, fingerprinted and stored on its own, and reported on its own: one that
fails (a non-finite sample, a missing file) is named with its error and the batch goes on. An order-independent
method's batch holds every ordering of one (dataset, seed): its first run computes the shared manifest-order
records and the others reorder them, in the same task, so no task waits on another (no head-of-line blocking).

A worker on another host may see the checkout at another path (a shared filesystem mounted elsewhere): the task
gets the params file as a reference (`params_reference`): its path, its path inside the checkout, and a digest of
its content. The worker takes the first of those paths that holds the same content, its own checkout's copy
included, and stops with one error naming the host and the paths when none does (a stale copy is never used).

Two sweeps on one results folder may plan the same run: the task holds the run's lock (`ResultsLayout.lock`, a
file next to its records) while the executor checks, computes and stores it, so the second waits, then finds it
finished with the same fingerprint and reuses it. An order-independent method's shared manifest-order run is
locked first, for the same reason.
"""
from __future__ import annotations

import hashlib
import socket
import threading
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from prefect import task

from dynaprompt.config import load_settings
from dynaprompt.model import load_model
from dynaprompt.registry import OrderingRegistry, with_registered
from dynaprompt.resolve import ResolvedRun, resolve
from dynaprompt.results import ResultsLayout, RunKey
from dynaprompt.runner import RunFailed, store_run
from tasks.environment import PROJECT_ROOT


def run_settings(params_file: str):
    """The params, with the orderings scheduled sweeps registered (a run looks its ordering up by name); read again
    when the file or the registry changed (a worker of a Dask cluster outlives sweeps)."""
    digest = content_digest(params_file)
    registry = registry_file(params_file, digest)
    return _settings(params_file, digest, registry.stat().st_mtime_ns if registry.is_file() else 0)


@lru_cache(maxsize=4)
def registry_file(params_file: str, _digest: str) -> Path:
    """The registry of the orderings scheduled sweeps added, in the results folder of these params."""
    return ResultsLayout(load_settings(params_file).path("results")).orderings_registry


@lru_cache(maxsize=4)
def _settings(params_file: str, digest: str, _registry_version: int):
    return with_registered(load_settings(params_file), OrderingRegistry(registry_file(params_file, digest)).entries())


_loading = threading.Lock()


def shared_clip(params_file: str):
    """One frozen CLIP per process, shared by every run it executes (its files found from the params file's
    folder, whatever the worker's working directory). Loaded by one thread at a time: runs of a thread runner ask
    for it at once, and a model built from a seed seeds torch's global generator while it is built."""
    with _loading:
        return _clip(params_file, content_digest(params_file))


@lru_cache(maxsize=2)
def _clip(params_file: str, _digest: str):
    return load_model(load_settings(params_file))


def params_reference(params_file: str | Path) -> dict:
    """How a worker finds `params_file`: its path here, its path inside the checkout (None outside it), and the
    digest of its content."""
    path = Path(params_file).resolve()
    inside = path.relative_to(PROJECT_ROOT).as_posix() if path.is_relative_to(PROJECT_ROOT) else None
    return {"path": str(path), "in_checkout": inside, "digest": content_digest(path)}


def content_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@lru_cache(maxsize=4)
def located_params(path: str, in_checkout: str | None, digest: str) -> str:
    """The params file on this worker: the sweep's path, else the same file in this worker's checkout, whichever
    holds the sweep's params (same digest)."""
    candidates = [Path(path)] + ([PROJECT_ROOT / in_checkout] if in_checkout else [])
    for candidate in candidates:
        if candidate.is_file() and content_digest(candidate) == digest:
            return str(candidate)
    seen = ", ".join(f"{c} ({'different content' if c.is_file() else 'missing'})" for c in candidates)
    raise FileNotFoundError(f"the sweep's params file is not on {socket.gethostname()}: {seen}; share the checkout, "
                            "or copy the same params file to one of these paths")


def batch_name() -> str:
    """A task run's name in Prefect's UI: dataset/method and its cells."""
    from prefect.runtime import task_run

    given = task_run.parameters
    cells = given["cells"]
    return f"{given['dataset']}/{given['method']}/{cells[0]}" + (f" +{len(cells) - 1}" if len(cells) > 1 else "")


@task(task_run_name=batch_name)
def run_batch(params: dict, dataset: str, method: str, cells: list[str]) -> list[dict]:
    """The runs `cells` of (dataset, method), in order, under the params `params_reference` names; one outcome per
    run (`run_one`), failures included."""
    params_file = located_params(params["path"], params["in_checkout"], params["digest"])
    return [run_one(params_file, dataset, method, cell) for cell in cells]


def run_one(params_file: str, dataset: str, method: str, cell: str) -> dict:
    """One run: {cell, summary, reused, records} when it finished (now or earlier: `reused`), {cell, error} when
    it failed; a failure is reported, never raised, so the rest of its batch runs."""
    try:
        settings, clip = run_settings(params_file), shared_clip(params_file)
        layout = ResultsLayout(settings.path("results"))
        run = resolve(settings, RunKey.from_cell(dataset, method, cell), clip.weights)
        with computing(run, layout):
            summary, reused = store_run(run, clip, layout)
    except RunFailed as error:  # a bad sample: the message names the run, the sample and its position
        return {"cell": cell, "error": str(error)}
    except Exception as error:  # noqa: BLE001 -- any other failure of this run is reported with it, not raised
        traceback.print_exc()
        return {"cell": cell, "error": f"{dataset}/{method}/{cell}: {type(error).__name__}: {error}"}
    return {"cell": cell, "summary": asdict(summary), "reused": reused, "records": str(layout.records(summary.key))}


@contextmanager
def computing(run: ResolvedRun, layout: ResultsLayout):
    """Hold the run's lock (an order-independent method's shared run's first, always in that order): another
    sweep computing it now is waited for."""
    keys = ([run.shared().key] if run.order_independent else []) + [run.key]
    with ExitStack() as held:
        for key in keys:
            lock = layout.lock(key)
            if not lock.acquire(blocking=False):
                print(f"{run.label}: another sweep is computing {key.label}; waiting for it", flush=True)
                lock.acquire()
            held.callback(lock.release)
        yield


def clear_caches() -> None:
    """Forget loaded settings and models (the registry changes between scheduled sweeps in one process)."""
    _settings.cache_clear()
    registry_file.cache_clear()
    _clip.cache_clear()
    located_params.cache_clear()


__all__ = ["clear_caches", "params_reference", "run_batch", "run_one"]
