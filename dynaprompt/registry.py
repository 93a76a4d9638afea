"""The orderings registry: orderings that scheduled sweeps drew, kept with the results (results/orderings.json).

Each entry is reproducible by name and seed, says when and by which sweep it was added, and lists the runs
(dataset, method) it was drawn for and the view seeds they run under (its cells of the ordering x seed grid). An
entry is `pending` from the moment it is drawn (written atomically before any of its runs start) until all its
runs are finished. A new ordering extends a family (an ordering kind with its defining options: `shuffle`,
`dirichlet0.1`): same kind and options, named `<family>-<seed>`, its seed above every seed any ordering of that
family has used, so a half-finished seed is never handed out twice.

A pending entry belongs to the sweep that holds it (`owner`, with its pid and host): that sweep holds its liveness
lock (`ResultsLayout.sweep_lock`) for its whole life, and a later sweep takes over only the pending entries of a
sweep whose lock can be taken (it died, or ended with failed runs), never those of a sweep still running. Every
read-modify-write of the file holds the registry's own lock (`orderings.json.lock`), so two sweeps drawing at once
draw one after the other.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import parse_ordering
from .results import FileLock, write_atomically
from .specs import OrderingSpec, Settings, default_family


@dataclass
class RegisteredOrdering:
    """One drawn ordering and the runs it was drawn for."""

    name: str
    kind: str
    seed: int
    options: dict  # the ordering's other options (cyclic: block; dirichlet: delta)
    added_at: str
    sweep_id: str
    runs: list = field(default_factory=list)  # [dataset, method] pairs
    status: str = "pending"  # pending | complete
    seeds: list | None = None  # the view seeds its runs run under (null: the params' main grid)
    owner: str | None = None  # the sweep that holds it now (null in older registries: sweep_id)
    pid: int | None = None  # the owner's process and host
    host: str | None = None
    family: str | None = None  # the family it extends (null in older registries: the kind's default family)
    on: str | list | None = None  # the streams its family runs on (null: the kind's default)

    @property
    def holder(self) -> str:
        return self.owner or self.sweep_id

    @property
    def family_name(self) -> str:
        return self.family or default_family(self.kind, self.options)

    @property
    def spec(self) -> OrderingSpec:
        return parse_ordering(self.name, {"kind": self.kind, "seed": self.seed, **self.options,
                                          "family": self.family_name, "on": self.on or ""})


class OrderingRegistry:
    """results/orderings.json, read and written whole (it is small); written under its lock only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file_lock = FileLock(self.path.with_name(self.path.name + ".lock"))
        self._guard, self._depth = threading.RLock(), 0

    @contextmanager
    def lock(self):
        """Hold the registry against other processes (and threads) for a read-modify-write; re-entrant on this
        object, so `draw` and `complete` inside a caller's `with registry.lock():` run under the same hold."""
        with self._guard:
            if self._depth == 0:
                self._file_lock.acquire()
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._file_lock.release()

    def entries(self) -> list[RegisteredOrdering]:
        if not self.path.is_file():
            return []
        return [RegisteredOrdering(**entry) for entry in json.loads(self.path.read_text())["orderings"]]

    def save(self, entries: list[RegisteredOrdering]) -> None:
        write_atomically(json.dumps({"orderings": [asdict(e) for e in entries]}, indent=2), self.path)

    def pending(self) -> list[RegisteredOrdering]:
        return [e for e in self.entries() if e.status == "pending"]

    def next_seed(self, settings: Settings, family: str) -> int:
        """One above every seed an ordering of `family` has used, in params or in the registry."""
        used = [o.seed or 0 for o in settings.orderings.values() if o.family == family]
        used += [e.seed for e in self.entries() if e.family_name == family]
        return max(used, default=-1) + 1

    def draw(self, settings: Settings, template: OrderingSpec, runs: list, sweep_id: str,
             seeds: list | None = None) -> RegisteredOrdering:
        """Register a new ordering of `template`'s family (its kind and options, the family's next seed) for `runs`
        ([dataset, method] pairs) under the view `seeds` (its cells), pending until they finish."""
        with self.lock():
            seed = self.next_seed(settings, template.family)
            on = list(template.on) if isinstance(template.on, tuple) else template.on
            entry = RegisteredOrdering(name=f"{template.family}-{seed}", kind=template.kind, seed=seed,
                                       options=template.defining_options,
                                       added_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), sweep_id=sweep_id,
                                       runs=[list(r) for r in runs], seeds=None if seeds is None else list(seeds),
                                       family=template.family, on=on, **owned_by(sweep_id))
            if entry.name in settings.orderings:
                raise ValueError(f"ordering {entry.name!r} is already defined in params; rename it there")
            self.save(self.entries() + [entry])
        return entry

    def claim_pending(self, sweep_id: str, alive: Callable[[str], bool]) -> list[RegisteredOrdering]:
        """The pending entries `sweep_id` resumes: its own, and those of a sweep no longer `alive` (sweep id ->
        whether it still runs), now owned by `sweep_id`; a live sweep's pending entries are left to it."""
        with self.lock():
            entries, claimed = self.entries(), []
            verdict: dict[str, bool] = {}
            for entry in entries:
                if entry.status != "pending":
                    continue
                holder = entry.holder
                if holder != sweep_id and holder not in verdict:
                    verdict[holder] = alive(holder)
                if holder != sweep_id and verdict[holder]:
                    continue  # its sweep still runs them
                vars(entry).update(owned_by(sweep_id))
                claimed.append(entry)
            if claimed:
                self.save(entries)
        return claimed

    def complete(self, names: list[str]) -> None:
        with self.lock():
            entries = self.entries()
            for entry in entries:
                if entry.name in names:
                    entry.status = "complete"
            self.save(entries)


def owned_by(sweep_id: str) -> dict:
    """The owner fields of an entry this process's sweep `sweep_id` holds."""
    return {"owner": sweep_id, "pid": os.getpid(), "host": socket.gethostname()}


def with_registered(settings: Settings, entries: list[RegisteredOrdering]) -> Settings:
    """Settings whose orderings also hold the registered ones (runs look their ordering up by name)."""
    from dataclasses import replace

    return replace(settings, orderings={**settings.orderings, **{e.name: e.spec for e in entries}})
