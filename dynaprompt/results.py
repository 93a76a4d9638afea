"""A sweep's results on disk: the run key, the file layout under `results/`, the run summary, the runs table.

Every entry point (the CLI, the sweep's task, the MLflow tracker, the report) reads and writes through this
module; no other file spells a results path.

    results/plan.json                                   the runs the params plan, with their group, and each
                                                        (stream, ordering) pair's kind, family, label correlation
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

import errno
import fcntl
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd

SHARED_ORDERING = "__shared__"  # an order-independent method's records in manifest order, reordered per ordering


@dataclass(frozen=True)
class RunKey:
    """One run: a method over one ordering of one dataset (or mixture), under one augmentation seed.

    `seed` None is the params' `views.view_seed`; an integer is another view seed (the views, and so the feature
    cache, of every sample change with it; the ordering does not). `replicate` > 0 is the same ordering and view
    seed under another last-bit perturbation of the features (`dynaprompt.features.LastBitPerturbation`): the runs
    that measure a method's chaos.
    """

    dataset: str
    method: str
    ordering: str
    seed: int | None = None
    replicate: int = 0

    @property
    def cell(self) -> str:
        """The ordering, seed and replicate as one name: `shuffle-0`, `shuffle-0~seed2` under view seed 2,
        `shuffle-0~rep1` for the first last-bit replicate (`shuffle-0~seed2~rep1` under both)."""
        seed = "" if self.seed is None else f"~seed{self.seed}"
        replicate = f"~rep{self.replicate}" if self.replicate else ""
        return f"{self.ordering}{seed}{replicate}"

    @property
    def label(self) -> str:
        """How a run is named everywhere: dataset/method/cell."""
        return f"{self.dataset}/{self.method}/{self.cell}"

    def shared(self) -> "RunKey":
        """The manifest-order run an order-independent method computes once per dataset, seed and replicate."""
        return RunKey(self.dataset, self.method, SHARED_ORDERING, self.seed, self.replicate)

    @classmethod
    def from_cell(cls, dataset: str, method: str, cell: str) -> "RunKey":
        rest, _, replicate = cell.partition("~rep")
        ordering, _, seed = rest.partition("~seed")
        return cls(dataset, method, ordering, int(seed) if seed else None, int(replicate) if replicate else 0)


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
    replicate: int = 0  # the key's last-bit replicate (0: the grid's own run)
    view_seed: int = 0  # the view seed the run saw
    settings: dict = field(default_factory=dict)  # the effective settings, flat (RunSettings.describe)
    final_state: dict = field(default_factory=dict)  # what the method leaves at the end (DynaPrompt's buffer)
    ordering_family: str = ""  # the kind of stream: ordering kind + defining options (`dirichlet0.1`); "" in older
    #   summaries (read as the ordering kind)
    label_correlation: float | None = None  # fraction of consecutive same-label pairs along the stream

    @property
    def key(self) -> RunKey:
        return RunKey(self.dataset, self.method, self.ordering, self.seed, self.replicate)

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
                "device_name": self.device_info.get("name", self.device), "cell": self.key.cell,
                "ordering_family": self.ordering_family or self.ordering_kind,
                "label_correlation": math.nan if self.label_correlation is None else self.label_correlation}


RUN_COLUMNS = [
    "dataset", "method", "method_kind", "ordering", "view_seed", "replicate", "cell", "ordering_kind",
    "ordering_family", "label_correlation", "order_independent", "n", "accuracy",
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

    def write_plan(self, planned: list, orderings: list = ()) -> None:
        """planned: (RunKey, group) pairs; orderings: the plan's (stream, ordering) rows (`plan.ordering_table`)."""
        rows = [{**asdict(key), "cell": key.cell, "group": group} for key, group in planned]
        write_atomically(json.dumps({"runs": rows, "orderings": list(orderings)}, indent=2), self.plan_file)

    def read_plan(self) -> pd.DataFrame:
        rows = json.loads(self.plan_file.read_text()).get("runs", [])
        frame = pd.DataFrame(rows, columns=PLAN_COLUMNS)
        frame["replicate"] = frame["replicate"].fillna(0).astype(int)  # plans written before replicates
        frame["cell"] = [RunKey(r.dataset, r.method, r.ordering, none_if_nan(r.seed), r.replicate).cell
                         for r in frame.itertuples(index=False)]
        return frame

    def read_plan_orderings(self) -> pd.DataFrame:
        """The plan's (stream, ordering) table, PLAN_ORDERING_COLUMNS (empty for a plan written without it)."""
        rows = json.loads(self.plan_file.read_text()).get("orderings", [])
        return pd.DataFrame(rows, columns=PLAN_ORDERING_COLUMNS)

    def write_runs_table(self, summaries: list[RunSummary]) -> pd.DataFrame:
        table = runs_table(summaries)
        table.to_parquet(self.runs_table, index=False)
        return table


PLAN_COLUMNS = ["dataset", "method", "ordering", "seed", "replicate", "cell", "group"]
PLAN_ORDERING_COLUMNS = ["dataset", "ordering", "kind", "family", "options", "seed", "n", "label_correlation"]


def none_if_nan(value):
    """A seed read back from a table: None for the params' seed (stored as null / NaN), else an int."""
    return None if value is None or value != value else int(value)


def runs_table(summaries: list[RunSummary]) -> pd.DataFrame:
    """One row per run, RUN_COLUMNS, sorted by run key."""
    table = pd.DataFrame([s.row() for s in summaries], columns=RUN_COLUMNS)
    return table.sort_values(["dataset", "method", "ordering", "view_seed", "replicate"], ignore_index=True)


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


LOCK_UNSUPPORTED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)  # flock / fcntl on a filesystem without them
#   (Lustre mounted without -o flock: ENOSYS; an NFS mount without a lock manager: ENOLCK)


@dataclass(frozen=True)
class LockFileTiming:
    """How lock files are kept and taken over where the filesystem has no kernel locks (see `FileLock`)."""

    heartbeat_seconds: float = 10.0  # a holder refreshes its lock file's mtime this often
    stale_seconds: float = 120.0  # a lock file not refreshed for this long is a dead holder's: it is taken over
    poll_seconds: float = 0.2  # a waiter looks again this often


class FileLock:
    """An exclusive lock on a path, between processes, hosts sharing the folder, and threads of one process.

    Threads of one process first take an in-process lock keyed by the path: NFS emulates `flock` with per-process
    POSIX locks, and POSIX locks never exclude two threads of one process. Between processes the lock is the
    kernel's, chosen once per filesystem (`lock_mode`): `flock`; where the filesystem has none (Lustre without
    `-o flock`), POSIX record locks (`fcntl.lockf`); where it has neither, a lock file created with O_EXCL that
    names its holder (host, pid), refreshed by a heartbeat and taken over when its holder is gone (same host, pid
    dead) or has not refreshed it for `stale_seconds`. A kernel lock is dropped when its holder dies, even on
    kill -9. `release` removes the file; a waiter that locked the removed file sees that it is no longer the one
    at the path and locks the new one.
    """

    def __init__(self, path: Path, timing: LockFileTiming = LockFileTiming()):
        self.path = Path(path)
        self.timing = timing
        self._handle = None  # kernel locks: the open file that holds the lock
        self._owner: dict | None = None  # lock files: what our file says
        self._local: threading.Lock | None = None  # the in-process lock, while held or being taken

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock (waiting for it, or False at once when another holds it and not `blocking`)."""
        local = _local_lock(self.path)  # looked up at each use: a forked child gets its own
        if not local.acquire(blocking):
            return False
        self._local = local
        try:
            taken = self._acquire_shared(blocking)
        except BaseException:
            self._release_local()
            raise
        if not taken:
            self._release_local()
        return taken

    def _release_local(self) -> None:
        local, self._local = self._local, None
        local.release()

    def _acquire_shared(self, blocking: bool) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = lock_mode(self.path.parent)
        if mode == "files":
            return self._acquire_file(blocking)
        while True:
            handle = open(self.path, "a")
            try:
                taken = _kernel_lock(handle, mode, blocking)
            except BaseException:
                handle.close()
                raise
            if not taken:
                handle.close()
                return False
            if _is_file_at(handle, self.path):
                self._handle = handle
                return True
            handle.close()  # its holder removed it while we waited: lock the file now at the path

    def _acquire_file(self, blocking: bool) -> bool:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "token": uuid.uuid4().hex}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _take_over_if_stale(self.path, self.timing):
                    continue
                if not blocking:
                    return False
                time.sleep(self.timing.poll_seconds)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(owner, handle)
            self._owner = owner
            _HEARTBEAT.add(self.path, self.timing.heartbeat_seconds)
            return True

    def release(self) -> None:
        if self._handle is None and self._owner is None:
            return
        try:
            if self._owner is not None:
                _HEARTBEAT.discard(self.path)
                if _read_owner(self.path).get("token") == self._owner["token"]:
                    self.path.unlink(missing_ok=True)
            else:
                try:
                    self.path.unlink(missing_ok=True)  # still holding it: no one else holds this file
                finally:
                    self._handle.close()  # closing drops the lock
        finally:
            self._handle = self._owner = None
            self._release_local()

    def held(self) -> bool:
        """Whether someone holds the lock now; takes nothing and creates nothing (a stale file is removed)."""
        local = _local_lock(self.path)
        if not local.acquire(blocking=False):
            return True  # a thread of this process holds it
        try:  # probing under the in-process lock: closing a probe never drops a POSIX lock of this process
            if not self.path.exists():
                return False
            mode = lock_mode(self.path.parent)
            if mode == "files":
                return not _take_over_if_stale(self.path, self.timing)
            return self._held_by_kernel(mode)
        finally:
            local.release()

    def _held_by_kernel(self, mode: str) -> bool:
        try:
            handle = open(self.path, "r" if mode == "flock" else "r+")  # POSIX write locks need a writable file
        except FileNotFoundError:
            return False
        with handle:
            if not _kernel_lock(handle, mode, blocking=False):
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


def _kernel_lock(handle, mode: str, blocking: bool) -> bool:
    """Take an exclusive kernel lock on `handle` (`flock` or POSIX `lockf`); False when busy and not `blocking`."""
    take = fcntl.flock if mode == "flock" else fcntl.lockf
    try:
        take(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):  # held by another (lockf may say either)
            return False
        raise
    return True


# ---------------------------------------------------------------- which lock a filesystem gets

_LOCK_MODES: dict = {}  # st_dev -> "flock" | "posix" | "files", probed once per filesystem and process
_LOCAL_LOCKS: dict = {}  # resolved path -> threading.Lock: threads of one process exclude each other
_REGISTRY = threading.Lock()


def _local_lock(path: Path) -> threading.Lock:
    key = os.path.realpath(path)
    with _REGISTRY:
        return _LOCAL_LOCKS.setdefault(key, threading.Lock())


def lock_mode(folder: Path) -> str:
    """How locks are taken under `folder`: 'flock', 'posix' (fcntl.lockf, where flock is missing) or 'files' (a
    lock file, where the filesystem has neither); probed once per filesystem, and said once when not flock."""
    device = os.stat(folder).st_dev
    with _REGISTRY:
        if device not in _LOCK_MODES:
            _LOCK_MODES[device] = _probe_lock_mode(Path(folder))
            if _LOCK_MODES[device] != "flock":
                print(fallback_message(Path(folder), _LOCK_MODES[device]), file=sys.stderr, flush=True)
        return _LOCK_MODES[device]


def _probe_lock_mode(folder: Path) -> str:
    probe = folder / f".lock-probe-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(probe, "a") as handle:
            for mode in ("flock", "posix"):
                try:
                    _kernel_lock(handle, mode, blocking=False)
                except OSError as error:
                    if error.errno not in LOCK_UNSUPPORTED:
                        raise
                    continue
                (fcntl.flock if mode == "flock" else fcntl.lockf)(handle, fcntl.LOCK_UN)
                return mode
        return "files"
    finally:
        probe.unlink(missing_ok=True)


def mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, filesystem type, mount options) of `path`, from /proc/mounts (the longest matching point)."""
    real, found = os.path.realpath(path), ("/", "unknown", "")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields_ = line.split()
        if len(fields_) < 4:
            continue
        point = fields_[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(found[0]):
            found = (point, fields_[2], fields_[3])
    return found


def fallback_message(folder: Path, mode: str) -> str:
    point, fstype, options = mount_of(folder)
    where = f"locks under {folder}: the filesystem ({fstype} at {point}, mounted {options or 'with defaults'})"
    if mode == "posix":
        return f"{where} has no flock: using POSIX locks (fcntl.lockf) instead"
    timing = LockFileTiming()
    return (f"{where} has neither flock nor POSIX locks: using lock files (created with O_EXCL, naming host and "
            f"pid, refreshed every {timing.heartbeat_seconds:g} s, taken over after {timing.stale_seconds:g} s "
            "without a refresh or when their process is gone). Every host must mount it the same way; for kernel "
            "locks mount it with -o flock (Lustre) or keep results/ on a filesystem that has them")


# ---------------------------------------------------------------- lock files (no kernel locks)


def _read_owner(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return {}  # gone, or being written


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # another user's process, or no pid written yet: not known to be dead
    return True


def _take_over_if_stale(path: Path, timing: LockFileTiming) -> bool:
    """Remove a lock file whose holder is gone (same host, pid dead) or silent for `stale_seconds`; True if removed
    (or already gone). The file is renamed aside first and removed only if it is still the stale one, so a breaker
    never removes a lock that a new holder took in between (one it moved by mistake is linked back)."""
    try:
        before = os.stat(path)
    except FileNotFoundError:
        return True
    owner = _read_owner(path)
    dead = owner.get("host") == socket.gethostname() and not _pid_alive(owner.get("pid"))
    if not dead and time.time() - before.st_mtime <= timing.stale_seconds:
        return False
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    if os.stat(aside).st_ino != before.st_ino:
        try:
            os.link(aside, path)  # a live holder's file: put it back
        except FileExistsError:
            pass
    os.unlink(aside)
    return True


class _Heartbeat:
    """One daemon thread per process that refreshes the mtime of every lock file the process holds."""

    def __init__(self):
        self.held: dict = {}  # path -> heartbeat seconds
        self.guard = threading.Lock()
        self.wake = threading.Event()  # a new lock may want a shorter interval than the one being slept
        self.thread = None

    def add(self, path: Path, seconds: float) -> None:
        with self.guard:
            self.held[Path(path)] = seconds
            self.wake.set()
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)
                self.thread.start()

    def discard(self, path: Path) -> None:
        with self.guard:
            self.held.pop(Path(path), None)

    def _beat(self) -> None:
        while True:
            with self.guard:
                paths, pause = list(self.held), min(self.held.values(), default=1.0)
            for path in paths:
                try:
                    os.utime(path)
                except FileNotFoundError:
                    pass
            self.wake.wait(pause)
            self.wake.clear()

    def forget(self) -> None:
        """In a forked child: it holds none of its parent's locks, and has no heartbeat thread."""
        self.held, self.guard, self.wake, self.thread = {}, threading.Lock(), threading.Event(), None


_HEARTBEAT = _Heartbeat()


def _after_fork_in_child() -> None:
    global _REGISTRY
    _LOCAL_LOCKS.clear()  # a lock a parent's thread held at the fork would never be released in the child
    _REGISTRY = threading.Lock()
    _HEARTBEAT.forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
