"""The run task: one (dataset, method, ordering) through the library's one executor, skipped when already done.

Two sweeps on one results folder may plan the same run: the task holds the run's lock (`ResultsLayout.lock`, a
file next to its records) while the executor checks, computes and stores it, so the second waits, then finds it
finished with the same fingerprint and reuses it. An order-independent method's shared manifest-order run, which
every ordering of it reorders, is locked first, for the same reason.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from functools import lru_cache

from prefect import task

from dynaprompt.config import load_settings
from dynaprompt.model import load_clip
from dynaprompt.registry import OrderingRegistry, with_registered
from dynaprompt.resolve import ResolvedRun, resolve
from dynaprompt.results import ResultsLayout, RunKey
from dynaprompt.runner import RunFailed, store_run


@lru_cache(maxsize=4)
def run_settings(params_file: str):
    """The params, with the orderings scheduled sweeps registered (a run looks its ordering up by name)."""
    settings = load_settings(params_file)
    return with_registered(settings, OrderingRegistry(ResultsLayout(settings.path("results")).orderings_registry)
                           .entries())


@lru_cache(maxsize=2)
def shared_clip(params_file: str):
    """One frozen CLIP per process, shared by every run it executes."""
    return load_clip(run_settings(params_file).model)


def retry_unless_deterministic(task, task_run, state) -> bool:
    """A run that failed on a bad sample fails the same way again: no retry for RunFailed."""
    try:
        state.result()
    except RunFailed:
        return False
    except Exception:  # noqa: BLE001 -- anything else (a lost worker, a full disk) may pass on retry
        return True
    return True


@task(retries=1, retry_delay_seconds=2, retry_condition_fn=retry_unless_deterministic,
      task_run_name="{dataset}/{method}/{cell}")
def run_task(params_file: str, dataset: str, method: str, cell: str) -> dict:
    """One run of the sweep (`cell`: its ordering, ~seed<k> under another view seed); returns its summary and
    whether it was reused from an earlier sweep."""
    settings, clip = run_settings(params_file), shared_clip(params_file)
    layout = ResultsLayout(settings.path("results"))
    run = resolve(settings, RunKey.from_cell(dataset, method, cell), clip.weights)
    with computing(run, layout):
        summary, reused = store_run(run, clip, layout)
    return {"summary": asdict(summary), "reused": reused, "records": str(layout.records(summary.key))}


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
    run_settings.cache_clear()
    shared_clip.cache_clear()


__all__ = ["clear_caches", "run_task"]
