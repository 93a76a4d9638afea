"""A run's progress on disk, so that a lost worker resumes where it was instead of at sample 0.

    results/runs/<dataset>/<method>/<ordering>.checkpoint/
        records-00000.parquet, records-00001.parquet, ...   the records, one part per save, each written atomically
        state.pt                                             written last: fingerprint, how many records and parts
                                                             are valid, and the method's state (`state_dict()`)

`state.pt` is the commit point: a part written after it (a save killed half-way) is ignored and overwritten,
and a checkpoint made under another fingerprint (other params, weights or code) is discarded.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import torch

from .records import record_from_row


class RunCheckpoint:
    """Saves a run's records so far and its method's state every `every` samples; loads them back."""

    def __init__(self, folder: Path, fingerprint: str, every: int):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.every = every
        self.saved_records = 0
        self.parts = 0

    @property
    def state_file(self) -> Path:
        return self.folder / "state.pt"

    def part_file(self, index: int) -> Path:
        return self.folder / f"records-{index:05d}.parquet"

    def due(self, done: int, total: int) -> bool:
        """Save after every `every` samples, except after the last one (the run is then written whole)."""
        return self.every > 0 and done % self.every == 0 and done < total

    def save(self, records: list[dict], state: dict) -> None:
        """The records not yet saved as one more part, then the state naming it: atomically, in that order."""
        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.part_file(self.parts)
        partial = part.with_name(part.name + ".partial")
        pd.DataFrame(records[self.saved_records:]).to_parquet(partial, index=False)
        os.replace(partial, part)
        self.parts += 1
        self.saved_records = len(records)
        payload = {"fingerprint": self.fingerprint, "records": self.saved_records, "parts": self.parts,
                   "state": state}
        partial = self.state_file.with_name("state.pt.partial")
        torch.save(payload, partial)
        os.replace(partial, self.state_file)

    def load(self) -> tuple[list[dict], dict] | None:
        """(records, method state) of the last save under this fingerprint, or None (nothing, or stale: removed)."""
        if not self.state_file.is_file():
            return None
        payload = torch.load(self.state_file, map_location="cpu", weights_only=True)
        if payload["fingerprint"] != self.fingerprint:
            print(f"{self.folder}: a checkpoint of other params, weights, code or device: discarded, the run starts "
                  f"at sample 0", flush=True)
            self.clear()
            return None
        frames = [pd.read_parquet(self.part_file(i)) for i in range(payload["parts"])]
        records = [record_from_row(row) for row in pd.concat(frames, ignore_index=True).to_dict("records")]
        if len(records) != payload["records"]:
            raise RuntimeError(f"checkpoint {self.folder}: {len(records)} records in its parts, "
                               f"{payload['records']} in state.pt; remove the folder to restart the run")
        self.parts, self.saved_records = payload["parts"], payload["records"]
        return records, payload["state"]

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.parts = self.saved_records = 0
