"""A sweep plan: datasets x methods x orderings, expanded from params, and where each run's files live."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Settings


@dataclass(frozen=True, order=True)
class RunKey:
    """One run of a sweep."""

    dataset: str
    method: str
    ordering: str

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.method}/{self.ordering}"

    def records_path(self, results: Path) -> Path:
        return Path(results) / "runs" / self.dataset / self.method / f"{self.ordering}.parquet"

    def summary_path(self, results: Path) -> Path:
        return self.records_path(results).with_suffix(".json")


def _names(requested, defined: dict, what: str) -> list[str]:
    """The requested names (all defined ones when none are requested), each checked."""
    names = list(requested) if requested else list(defined)
    unknown = [n for n in names if n not in defined]
    if unknown:
        raise KeyError(f"sweep names {what} {unknown} that params does not define (defined: {sorted(defined)})")
    return names


def expand_plan(settings: Settings, sweep: dict | None = None) -> list[RunKey]:
    """Every (dataset, method, ordering) of the sweep.

    Cyclic orderings need a mixture of domains, and a mixture is only meaningful in recurring domain blocks:
    they pair with each other only.
    """
    sweep = sweep or {}
    datasets = _names(sweep.get("datasets"), {**settings.datasets, **settings.mixtures}, "datasets")
    methods = _names(sweep.get("methods"), settings.methods, "methods")
    orderings = _names(sweep.get("orderings"), settings.orderings, "orderings")
    plan = []
    for dataset in datasets:
        is_mixture = dataset in settings.mixtures
        for method in methods:
            for ordering in orderings:
                if (settings.orderings[ordering].get("kind") == "cyclic") == is_mixture:
                    plan.append(RunKey(dataset, method, ordering))
    return plan
