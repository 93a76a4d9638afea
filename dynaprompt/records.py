"""Per-sample records of a run and the run's summary."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

RECORD_COLUMNS = [
    "position", "sample_id", "label", "pred", "correct", "entropy_before", "entropy_after",
    "selected", "n_selected", "appended", "deleted", "buffer_size", "seconds",
]


@dataclass
class Outcome:
    """What a method says about one test sample."""

    pred: int
    entropy_before: float  # of the prediction on the original view before any update
    entropy_after: float  # of the final prediction
    selected: list[int] = field(default_factory=list)  # prompt ids used, in selection order (may repeat)
    appended: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    buffer_size: int = 0


def make_record(position: int, sample_id: str, label: int, outcome: Outcome, seconds: float) -> dict:
    """One row of the records table."""
    return {
        "position": position,
        "sample_id": str(sample_id),
        "label": int(label),
        "pred": int(outcome.pred),
        "correct": bool(outcome.pred == label),
        "entropy_before": float(outcome.entropy_before),
        "entropy_after": float(outcome.entropy_after),
        "selected": [int(i) for i in outcome.selected],
        "n_selected": len(outcome.selected),
        "appended": [int(i) for i in outcome.appended],
        "deleted": [int(i) for i in outcome.deleted],
        "buffer_size": int(outcome.buffer_size),
        "seconds": float(seconds),
    }


def record_from_row(row: dict) -> dict:
    """A record read back from a records table, with the types `make_record` gives (lists of ints, not arrays)."""
    out = {"position": int(row["position"]), "sample_id": str(row["sample_id"]), "label": int(row["label"]),
           "pred": int(row["pred"]), "correct": bool(row["correct"]),
           "entropy_before": float(row["entropy_before"]), "entropy_after": float(row["entropy_after"]),
           "selected": [int(i) for i in row["selected"]], "n_selected": int(row["n_selected"]),
           "appended": [int(i) for i in row["appended"]], "deleted": [int(i) for i in row["deleted"]],
           "buffer_size": int(row["buffer_size"]), "seconds": float(row["seconds"])}
    return out


def records_frame(records: list[dict]) -> pd.DataFrame:
    """The records as a table with the stable column order (an empty run still has the columns)."""
    return pd.DataFrame(records, columns=RECORD_COLUMNS)


def block_accuracies(correct, block_size: int) -> list[float]:
    """Accuracy of consecutive blocks of `block_size` samples along the stream (the last may be shorter)."""
    correct = np.asarray(correct, dtype=float)
    return [float(correct[i : i + block_size].mean()) for i in range(0, len(correct), block_size)]


def summarize(records: pd.DataFrame, block_size: int) -> dict:
    """Run-level numbers: n, accuracy, per-block accuracy, timing."""
    n = len(records)
    return {
        "n": n,
        "accuracy": float(records["correct"].mean()) if n else float("nan"),
        "block_size": block_size,
        "block_accuracy": block_accuracies(records["correct"], block_size),
        "seconds_per_sample": float(records["seconds"].mean()) if n else float("nan"),
        "seconds_total": float(records["seconds"].sum()),
    }
