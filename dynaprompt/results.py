"""A sweep's results on disk: the run key, the file layout under `results/`, the run summary, the runs table.

Every entry point (the CLI, the sweep's task, the MLflow tracker, the report) reads and writes through this
module; no other file spells a results path.

    results/plan.json                                   the runs the params plan, with their group
    results/sweep.json                                  the latest sweep's id and MLflow parent run
    results/orderings.json                              orderings added by scheduled sweeps (the registry)
    results/runs.parquet                                one row per finished run (RUN_COLUMNS)
    results/runs/<dataset>/<method>/<cell>.parquet      one row per test sample, in stream order
    results/runs/<dataset>/<method>/<cell>.json         the run's summary (RunSummary), written last

A cell is an ordering under one augmentation seed: `<ordering>` under the params' `views.view_seed`,
`<ordering>~seed<k>` under view seed k (the runs of `sweep.view_seeds`).
    results/runs/<dataset>/<method>/<ordering>.checkpoint/  a run in progress (dynaprompt.checkpoint)

Locks between sweeps sharing the folder (`FileLock`, present only while held):
    results/runs/<dataset>/<method>/<cell>.lock         a run being computed (`ResultsLayout.lock(key)`)
    results/results.lock                                 plan.json, sweep.json, runs.parquet being rewritten
    results/orderings.json.lock                          the registry being read-modified-written (its own)
    results/sweeps/<sweep_id>.lock                       held by a live sweep for its whole life
"""
from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd

SHARED_ORDERING = "__shared__"  # an order-independent method's records in manifest order, reordered per ordering


@dataclass(frozen=True)
class RunKey:
    """One run: a method over one ordering of one dataset (or mixture), under one augmentation seed.

    `seed` None is the params' `views.view_seed`; an integer is another view seed (the views, and so the feature
    cache, of every sample change with it; the ordering does not).
    """

    dataset: str
    method: str
    ordering: str
    seed: int | None = None

    @property
    def cell(self) -> str:
        """The ordering and seed as one name: `shuffle-0`, or `shuffle-0~seed2` under view seed 2."""
        return self.ordering if self.seed is None else f"{self.ordering}~seed{self.seed}"

    @property
    def label(self) -> str:
        """How a run is named everywhere: dataset/method/ordering (~seed<k> under another view seed)."""
        return f"{self.dataset}/{self.method}/{self.cell}"

    def shared(self) -> "RunKey":
        """The manifest-order run an order-independent method computes once per dataset and seed."""
        return RunKey(self.dataset, self.method, SHARED_ORDERING, self.seed)

    @classmethod
    def from_cell(cls, dataset: str, method: str, cell: str) -> "RunKey":
        ordering, _, seed = cell.partition("~seed")
        return cls(dataset, method, ordering, int(seed) if seed else None)


@dataclass
class RunSummary:
    """What a run is and what it measured; its JSON file marks the run finished."""

    dataset: str
    method: str
    method_kind: str
    ordering: str
    ordering_kind: str
    order_independent: bool
    n: int
    accuracy: float
    block_size: int
    block_accuracy: list
    seconds_per_sample: float
    seconds_total: float
    fingerprint: str
    weights: str = ""
    device: str = "cpu"  # cpu, or cuda:<the GPU's index on its node>
    device_info: dict = field(default_factory=dict)  # dynaprompt.devices.describe_device: name, CUDA, driver, ...
    wall_seconds: float = 0.0
    started_at: float = 0.0  # unix time
    ended_at: float = 0.0
    seed: int | None = None  # the key's view seed (None: the params' views.view_seed)
    view_seed: int = 0  # the view seed the run saw
    settings: dict = field(default_factory=dict)  # the effective settings, flat (RunSettings.describe)
    final_state: dict = field(default_factory=dict)  # what the method leaves at the end (DynaPrompt's buffer)

    @property
    def key(self) -> RunKey:
        return RunKey(self.dataset, self.method, self.ordering, self.seed)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> "RunSummary":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def row(self) -> dict:
        """This run's row of the runs table."""
        blocks = self.block_accuracy
        return {**{c: getattr(self, c) for c in RUN_COLUMNS if hasattr(self, c)},
                "first_block_accuracy": blocks[0] if blocks else math.nan,
                "last_block_accuracy": blocks[-1] if blocks else math.nan,
                "device_name": self.device_info.get("name", self.device), "cell": self.key.cell}


RUN_COLUMNS = [
    "dataset", "method", "method_kind", "ordering", "view_seed", "cell", "ordering_kind", "order_independent", "n",
    "accuracy",
    "block_size", "block_accuracy", "first_block_accuracy", "last_block_accuracy", "seconds_per_sample",
    "seconds_total", "wall_seconds", "fingerprint", "device", "device_name",
]


@dataclass(frozen=True)
class ResultsLayout:
    """Where everything under a results folder lives."""

    root: Path

    @property
    def plan_file(self) -> Path:
        return self.root / "plan.json"

    @property
    def runs_table(self) -> Path:
        return self.root / "runs.parquet"

    @property
    def orderings_registry(self) -> Path:
        return self.root / "orderings.json"

    @property
    def sweep_record(self) -> Path:
        """The latest sweep: its id and its MLflow parent run (the report stage attaches the report there)."""
        return self.root / "sweep.json"

    def lock(self, key: RunKey | None = None) -> "FileLock":
        """The lock of run `key`, next to its records (held while it computes), or, without a key, of the folder's
        shared files (plan.json, sweep.json, runs.parquet) while one is rewritten."""
        return FileLock(self.root / "results.lock" if key is None else self.records(key).with_suffix(".lock"))

    def sweep_lock(self, sweep_id: str) -> "FileLock":
        """The liveness lock a sweep holds for its whole life: taken, the sweep is gone."""
        return FileLock(self.root / "sweeps" / f"{sweep_id}.lock")

    def write_sweep_record(self, record: dict) -> None:
        write_atomically(json.dumps(record, indent=2), self.sweep_record)

    def read_sweep_record(self) -> dict | None:
        return json.loads(self.sweep_record.read_text()) if self.sweep_record.is_file() else None

    def records(self, key: RunKey) -> Path:
        return self.root / "runs" / key.dataset / key.method / f"{key.cell}.parquet"

    def summary(self, key: RunKey) -> Path:
        return self.records(key).with_suffix(".json")

    def checkpoint(self, key: RunKey, fingerprint: str, every: int):
        """The run's checkpoint folder next to its records (dynaprompt.checkpoint.RunCheckpoint)."""
        from .checkpoint import RunCheckpoint

        return RunCheckpoint(self.records(key).with_suffix(".checkpoint"), fingerprint, every)

    def read_summary(self, key: RunKey) -> RunSummary | None:
        """The run's summary when both its files exist, else None."""
        summary, records = self.summary(key), self.records(key)
        if not (summary.is_file() and records.is_file()):
            return None
        return RunSummary.from_json(summary.read_text())

    def finished(self, key: RunKey, fingerprint: str) -> RunSummary | None:
        """The run's summary when it finished with this fingerprint (same params, weights, code), else None."""
        summary = self.read_summary(key)
        return summary if summary is not None and summary.fingerprint == fingerprint else None

    def read_records(self, key: RunKey) -> pd.DataFrame:
        return pd.read_parquet(self.records(key))

    def write_run(self, key: RunKey, records: pd.DataFrame, summary: RunSummary) -> None:
        """Records first, the summary last: a run without its summary is not finished."""
        write_atomically(records, self.records(key))
        write_atomically(summary.to_json(), self.summary(key))

    def summaries(self) -> list[RunSummary]:
        """Every finished run under the folder (shared manifest-order runs excluded)."""
        found = []
        for file in sorted((self.root / "runs").glob("*/*/*.json")):
            if not file.stem.startswith(SHARED_ORDERING) and file.with_suffix(".parquet").is_file():
                found.append(RunSummary.from_json(file.read_text()))
        return found

    def write_plan(self, planned: list) -> None:
        """planned: (RunKey, group) pairs."""
        rows = [{**asdict(key), "cell": key.cell, "group": group} for key, group in planned]
        write_atomically(json.dumps({"runs": rows}, indent=2), self.plan_file)

    def read_plan(self) -> pd.DataFrame:
        rows = json.loads(self.plan_file.read_text()).get("runs", [])
        frame = pd.DataFrame(rows, columns=PLAN_COLUMNS)
        frame["cell"] = [RunKey(r.dataset, r.method, r.ordering, none_if_nan(r.seed)).cell
                         for r in frame.itertuples(index=False)]
        return frame

    def write_runs_table(self, summaries: list[RunSummary]) -> pd.DataFrame:
        table = runs_table(summaries)
        table.to_parquet(self.runs_table, index=False)
        return table


PLAN_COLUMNS = ["dataset", "method", "ordering", "seed", "cell", "group"]


def none_if_nan(value):
    """A seed read back from a table: None for the params' seed (stored as null / NaN), else an int."""
    return None if value is None or value != value else int(value)


def runs_table(summaries: list[RunSummary]) -> pd.DataFrame:
    """One row per run, RUN_COLUMNS, sorted by run key."""
    table = pd.DataFrame([s.row() for s in summaries], columns=RUN_COLUMNS)
    return table.sort_values(["dataset", "method", "ordering", "view_seed"], ignore_index=True)


def write_atomically(content, target: Path) -> None:
    """Write then rename, so a killed writer never leaves a file that looks finished."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    if isinstance(content, pd.DataFrame):
        content.to_parquet(partial, index=False)
    else:
        partial.write_text(content)
    os.replace(partial, target)


class FileLock:
    """An exclusive OS lock (`flock`) on a file, between processes and between threads (each holder opens the file
    itself). The kernel drops it when its holder dies, even on kill -9. `release` removes the file; a waiter that
    locked the removed file sees that it is no longer the one at the path and locks the new one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock (waiting for it, or False at once when another holds it and not `blocking`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                handle.close()
                return False
            if _is_file_at(handle, self.path):
                self._handle = handle
                return True
            handle.close()  # its holder removed it while we waited: lock the file now at the path

    def release(self) -> None:
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        try:
            self.path.unlink(missing_ok=True)  # still holding it: no one else holds this file
        finally:
            handle.close()  # closing drops the lock

    def held(self) -> bool:
        """Whether someone holds the lock now; takes nothing and creates nothing (a stale file is removed)."""
        try:
            handle = open(self.path)
        except FileNotFoundError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            if _is_file_at(handle, self.path):
                self.path.unlink(missing_ok=True)  # left by a holder that died
            return False

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _is_file_at(handle, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False
