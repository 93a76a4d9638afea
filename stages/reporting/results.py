"""The sweep's results as the report reads them, and the checks they must pass before any statistic is computed."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dynaprompt.records import RECORD_COLUMNS
from dynaprompt.registry import OrderingRegistry
from dynaprompt.results import PLAN_COLUMNS, PLAN_ORDERING_COLUMNS, RUN_COLUMNS, ResultsLayout, RunKey, runs_table

from ..checks import run_suite, summarize_failures

MAX_NAMED = 40  # missing runs named in the error line; the validation report lists all
LIST_COLUMNS = ("selected", "appended", "deleted")  # lists per sample: checked through n_selected


class InvalidResults(Exception):
    """The sweep's results are incomplete or inconsistent (the validation report says how)."""


@dataclass
class Results:
    """Everything the report reads: the plan (params plan + registered orderings), the runs, their records, and the
    plan's (stream, ordering) table (kind, family, options, label correlation)."""

    plan: pd.DataFrame  # dataset, method, ordering, seed, replicate, cell, group
    runs: pd.DataFrame  # RUN_COLUMNS + run, group
    records: dict  # RunKey -> records table
    registry: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    orderings: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PLAN_ORDERING_COLUMNS))

    def group(self, name: str) -> pd.DataFrame:
        return self.runs[self.runs["group"] == name]

    def records_of(self, dataset: str, method: str, cell: str) -> pd.DataFrame | None:
        """The records of one run, by its cell (`shuffle-0`, or `shuffle-0~seed2` under another view seed)."""
        return self.records.get(RunKey.from_cell(dataset, method, cell))

    def order(self, column: str, runs: pd.DataFrame | None = None) -> list:
        """Names in the order the plan first mentions them (then any only the runs have)."""
        runs = self.runs if runs is None else runs
        names = [n for n in dict.fromkeys(self.plan[column]) if n in set(runs[column])]
        return names + [n for n in dict.fromkeys(runs[column]) if n not in names]


def load_results(layout: ResultsLayout, settings) -> Results:
    """The params' plan and the registry's runs (each cell of ordering x seed), and every finished run on disk
    with its records."""
    from dynaprompt.plan import seed_keys, view_seeds

    problems = []
    if layout.plan_file.is_file():
        plan, orderings = layout.read_plan(), layout.read_plan_orderings()
    else:
        problems.append(f"missing {layout.plan_file} (run the sweep)")
        plan, orderings = pd.DataFrame(columns=PLAN_COLUMNS), pd.DataFrame(columns=PLAN_ORDERING_COLUMNS)
    registry = [e for e in OrderingRegistry(layout.orderings_registry).entries() if e.status == "complete"]
    added = [RunKey(d, m, e.name, s) for e in registry for d, m in e.runs
             for s in (seed_keys(settings, e.seeds) if e.seeds else view_seeds(settings))]
    added = pd.DataFrame([{"dataset": k.dataset, "method": k.method, "ordering": k.ordering, "seed": k.seed,
                           "cell": k.cell, "group": "added"} for k in added], columns=PLAN_COLUMNS)
    plan = pd.concat([plan, added], ignore_index=True) if len(added) else plan
    keys = [RunKey.from_cell(*k) for k in plan[["dataset", "method", "cell"]].itertuples(index=False)]
    planned = dict(zip(keys, plan["group"]))
    summaries = [s for s in layout.summaries() if s.key in planned]
    runs = runs_table(summaries)
    run_keys = [RunKey.from_cell(*k) for k in runs[["dataset", "method", "cell"]].itertuples(index=False)]
    runs["run"] = [k.label for k in run_keys]
    runs["group"] = [planned[k] for k in run_keys]
    records = {s.key: layout.read_records(s.key) for s in summaries}
    return Results(plan, runs, records, registry, problems, orderings)


def runs_expectations() -> list:
    """The suite the runs table must pass."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=[c for c in RUN_COLUMNS if c != "block_accuracy"],
                                         exact_match=False),
        gxe.ExpectColumnValuesToBeBetween(column="accuracy", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToNotBeNull(column="accuracy"),
        gxe.ExpectColumnValuesToNotBeNull(column="n"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["dataset", "method", "cell"]),
    ]


def records_expectations() -> list:
    """The suite all records tables pass together: complete, in stream order, agreeing with their summaries."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=[c for c in RECORD_COLUMNS if c not in LIST_COLUMNS] + ["run"],
                                         exact_match=False),
        gxe.ExpectColumnValuesToNotBeNull(column="correct"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="position", column_B="row_in_run"),  # 0..n-1, in order
        gxe.ExpectColumnPairValuesToBeEqual(column_A="rows_in_run", column_B="summary_n"),
        gxe.ExpectColumnValuesToBeInSet(column="accuracy_agrees", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="domain_present", value_set=[True]),  # cyclic streams need domains
    ]


def records_table(results: Results) -> pd.DataFrame:
    """Every run's records in one table, with the per-run facts each row is checked against."""
    frames = []
    for row in results.runs.itertuples(index=False):
        records = results.records[RunKey.from_cell(row.dataset, row.method, row.cell)]
        missing = [c for c in LIST_COLUMNS if c not in records.columns]
        frame = records.drop(columns=[c for c in LIST_COLUMNS if c in records.columns]).copy()
        if missing:  # a list column gone is a broken table: keep the gap visible to the column check
            frame = frame.drop(columns=["n_selected"], errors="ignore")
        frame["run"], frame["summary_n"], frame["row_in_run"] = row.run, int(row.n), range(len(frame))
        frame["rows_in_run"] = len(frame)
        frame["accuracy_agrees"] = bool(abs(records["correct"].mean() - row.accuracy) < 1e-6) if len(records) else False
        has_domain = "domain" in records.columns and records["domain"].notna().all()
        frame["domain_present"] = bool(row.ordering_kind != "cyclic" or has_domain)
        frames.append(frame.drop(columns=["domain"], errors="ignore"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RECORD_COLUMNS + ["run"])


def validate_results(results: Results, layout: ResultsLayout) -> dict:
    """The validation report: the runs suite, every planned run present, the records suite over all runs."""
    report = {"success": not results.problems, "problems": list(results.problems), "missing_runs": [],
              "failed_runs": [], "suites": []}
    if results.problems:
        return report
    present = set(results.runs["run"])
    labels = [RunKey.from_cell(*k).label for k in results.plan[["dataset", "method", "cell"]].itertuples(index=False)]
    report["missing_runs"] = [label for label in labels if label not in present]
    suite = run_suite(results.runs.drop(columns=["block_accuracy"]), runs_expectations(), "runs", id_column="run")
    report["suites"].append(suite)
    if suite["success"] and len(results.runs):  # broken columns would make the records suite meaningless
        checked = run_suite(records_table(results), records_expectations(), "records", id_column="run")
        report["suites"].append(checked)
        report["failed_runs"] = sorted({run for f in checked["failures"] for run in f.get("sample_ids", [])})
    report["success"] = bool(not report["problems"] and not report["missing_runs"]
                             and all(s["success"] for s in report["suites"]))
    return report


def validation_message(report: dict, target: Path) -> str:
    """Why the results are not usable, run by run (the full report is at `target`)."""
    lines = [f"the sweep's results failed validation (report: {target})"] + report["problems"]
    missing = report["missing_runs"]
    if missing:
        more = f" and {len(missing) - MAX_NAMED} more (all in the report)" if len(missing) > MAX_NAMED else ""
        lines.append(f"{len(missing)} planned runs missing: " + ", ".join(missing[:MAX_NAMED]) + more)
    for suite in report["suites"]:
        if not suite["success"]:
            where = {"runs": "runs table", "records": "records"}.get(suite["suite"], suite["suite"])
            lines += [f"{where}: {line}" for line in summarize_failures(suite).splitlines()]
    return "\n".join(lines)
