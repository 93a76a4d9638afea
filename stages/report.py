"""report: validate the sweep's results, then write reports/metrics.json, the figures and report.md/.html.

Inputs (from the sweep): results/plan.json, results/runs.parquet and one records table per run,
results/runs/<dataset>/<method>/<ordering>.parquet. The validation report (reports/validation/results.json)
is written first; an incomplete or inconsistent sweep stops the stage after it, naming each bad run as
dataset/method/ordering.
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from dynaprompt.records import RECORD_COLUMNS

from . import report_figures as figures
from .checks import run_suite, summarize_failures
from .common import fail, params, path, write_json

ORDER_INDEPENDENT = ("zero_shot", "tpt", "zero")  # method kinds whose predictions do not depend on the order
RUN_COLUMNS = [
    "dataset", "method", "method_kind", "ordering", "ordering_kind", "n", "accuracy", "block_size",
    "block_accuracy", "first_block_accuracy", "last_block_accuracy", "seconds_per_sample", "seconds_total",
]
MAX_NAMED = 40  # missing runs named in the error line; the validation report lists all
CI_OVER_ORDERINGS = "bootstrap-percentile over orderings"
CI_OVER_SAMPLES = "bootstrap-percentile over samples (paired by sample_id; one ordering or no spread across orderings)"
COLLAPSE_DEFINITION = (
    "A run collapses when its last-block accuracy is more than collapse_margin below (a) zero-shot's accuracy "
    "or (b) its own first-block accuracy. Zero-shot is measured on the same samples as each block (matched by "
    "sample_id), so (a) is gain_last < -margin and (b) is gain_last < gain_first - margin with gain = block "
    "accuracy - zero-shot accuracy on that block's samples; this keeps harder classes or domains at the end of a "
    "class_blocked or cyclic stream from counting as collapse. Without zero-shot records for the dataset, "
    "zero-shot's dataset accuracy is used, and without any zero-shot run only (b) applies, on raw accuracies. "
    "A dataset/method is flagged when any of its orderings collapses."
)
FIGURE_FILES = {
    "blocks": "accuracy_per_block.png",
    "kinds": "accuracy_by_ordering_kind.png",
    "buffer": "buffer_dynamics.png",
}


class InvalidResults(Exception):
    """The sweep's results are incomplete or inconsistent (the validation report says how)."""


@dataclass
class ReportParams:
    """The `report:` block of params.yaml."""

    collapse_margin: float = 0.10  # accuracy points (as a fraction) a last block may fall before it counts as collapse
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    seed: int = 0
    max_panels: int = 6  # datasets per figure / DynaPrompt runs in the buffer figure, in plan order
    dpi: int = 110


def report_params(params_dict: dict) -> ReportParams:
    """Defaults overridden by params' `report:` block; unknown keys are an error, not silently ignored."""
    given = dict((params_dict or {}).get("report") or {})
    known = {f.name for f in fields(ReportParams)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"report: unknown keys {unknown} (known: {sorted(known)})")
    return ReportParams(**given)


def run_name(dataset: str, method: str, ordering: str) -> str:
    """How a run is named everywhere: dataset/method/ordering."""
    return f"{dataset}/{method}/{ordering}"


def records_file(results_dir: Path, dataset: str, method: str, ordering: str) -> Path:
    return Path(results_dir) / "runs" / dataset / method / f"{ordering}.parquet"


# ---------------------------------------------------------------- loading

@dataclass
class Results:
    """Everything the sweep wrote; `problems` lists what could not be read at all."""

    runs: pd.DataFrame | None
    plan: pd.DataFrame | None
    records: dict
    problems: list


def load_results(results_dir: Path) -> Results:
    """Read plan.json, runs.parquet and the records table of every run in runs.parquet."""
    results_dir = Path(results_dir)
    problems, runs, plan, records = [], None, None, {}
    plan_path, runs_path = results_dir / "plan.json", results_dir / "runs.parquet"
    if plan_path.is_file():
        planned = json.loads(plan_path.read_text()).get("runs", [])
        plan = pd.DataFrame(planned, columns=["dataset", "method", "ordering"])
    else:
        problems.append(f"missing {plan_path}")
    if runs_path.is_file():
        runs = pd.read_parquet(runs_path)
        key_columns = {"dataset", "method", "ordering"} - set(runs.columns)
        if key_columns:
            problems.append(f"{runs_path} lacks the columns {sorted(key_columns)}")
            runs = None
        else:
            runs["run"] = [run_name(*key) for key in zip(runs["dataset"], runs["method"], runs["ordering"])]
    else:
        problems.append(f"missing {runs_path}")
    for key in [] if runs is None else zip(runs["dataset"], runs["method"], runs["ordering"]):
        target = records_file(results_dir, *key)
        if target.is_file():
            records[key] = pd.read_parquet(target)
    return Results(runs, plan, records, problems)


# ---------------------------------------------------------------- validation

def runs_expectations() -> list:
    """The suite results/runs.parquet must pass."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=RUN_COLUMNS, exact_match=False),
        gxe.ExpectColumnValuesToBeBetween(column="accuracy", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToNotBeNull(column="accuracy"),
        gxe.ExpectColumnValuesToNotBeNull(column="n"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["dataset", "method", "ordering"]),
    ]


def records_expectations(n: int, accuracy: float, cyclic: bool = False) -> list:
    """The suite each records table must pass: complete, in stream order, agreeing with runs.parquet."""
    import great_expectations.expectations as gxe

    domain = [gxe.ExpectColumnValuesToNotBeNull(column="domain")] if cyclic else []  # cyclic streams need domains
    return [*domain,
        gxe.ExpectTableColumnsToMatchSet(column_set=RECORD_COLUMNS, exact_match=False),
        gxe.ExpectTableRowCountToEqual(value=int(n)),
        gxe.ExpectColumnValuesToNotBeNull(column="correct"),
        # strictly increasing integers within [0, n-1] on n rows are exactly 0..n-1
        gxe.ExpectColumnValuesToBeIncreasing(column="position", strictly=True),
        gxe.ExpectColumnValuesToBeBetween(column="position", min_value=0, max_value=max(int(n) - 1, 0)),
        gxe.ExpectColumnMeanToBeBetween(column="correct", min_value=accuracy - 1e-6, max_value=accuracy + 1e-6),
    ]


def validate_results(results: Results, results_dir: Path) -> dict:
    """The validation report: runs suite, planned runs present, one suite per records table."""
    report = {"success": not results.problems, "problems": list(results.problems), "missing_runs": [],
              "unplanned_runs": [], "missing_records": [], "failed_runs": [], "suites": []}
    if results.runs is None or results.plan is None:
        return report
    runs = results.runs
    suite = run_suite(runs, runs_expectations(), "runs", id_column="run")
    report["suites"].append(suite)
    present = set(runs["run"])
    planned = [run_name(*key) for key in results.plan[["dataset", "method", "ordering"]].itertuples(index=False)]
    report["missing_runs"] = [name for name in planned if name not in present]
    report["unplanned_runs"] = sorted(present - set(planned))  # informational: extra runs are kept
    if not suite["success"]:  # broken columns would make the records suites meaningless
        report["success"] = False
        return report
    for row in runs.itertuples(index=False):
        key = (row.dataset, row.method, row.ordering)
        if key not in results.records:
            report["missing_records"].append(str(records_file(results_dir, *key)))
            continue
        expectations = records_expectations(row.n, row.accuracy, cyclic=row.ordering_kind == "cyclic")
        checked = run_suite(results.records[key], expectations, f"records:{row.run}")
        checked["run"] = row.run
        report["suites"].append(checked)
        if not checked["success"]:
            report["failed_runs"].append(row.run)
    report["success"] = bool(report["success"] and all(s["success"] for s in report["suites"])
                             and not report["missing_runs"] and not report["missing_records"])
    return report


def validation_message(report: dict, target: Path) -> str:
    """Why the results are not usable, run by run (the full report is at `target`)."""
    lines = [f"the sweep's results failed validation (report: {target})"]
    lines += report["problems"]
    missing = report["missing_runs"]
    if missing:
        more = f" and {len(missing) - MAX_NAMED} more (all in the report)" if len(missing) > MAX_NAMED else ""
        lines.append(f"{len(missing)} planned runs missing from runs.parquet: " + ", ".join(missing[:MAX_NAMED]) + more)
    lines += [f"records table missing: {name}" for name in report["missing_records"]]
    for suite in report["suites"]:
        if not suite["success"]:
            where = suite.get("run", "runs.parquet")
            lines += [f"{where}: {line}" for line in summarize_failures(suite).splitlines()]
    return "\n".join(lines)


# ---------------------------------------------------------------- statistics

def order_independent_methods(runs: pd.DataFrame) -> set[str]:
    """Methods whose predictions do not depend on the order: the sweep's own flag, else known kinds."""
    if "order_independent" in runs.columns:
        return set(runs.loc[runs["order_independent"].fillna(False).astype(bool), "method"])
    return set(runs.loc[runs["method_kind"].isin(ORDER_INDEPENDENT), "method"])


def plan_order(results: Results, column: str) -> list:
    """Names in the order the plan first mentions them, then any only runs.parquet has."""
    names = list(dict.fromkeys(results.plan[column]))
    return names + [name for name in dict.fromkeys(results.runs[column]) if name not in names]


def bootstrap_ci(values, samples: int, confidence: float, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`."""
    values = np.asarray(values, dtype=float)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def reference_method(runs: pd.DataFrame, dataset: str, kind: str) -> str | None:
    """The method of `kind` to compare against on `dataset`: the one named like the kind, else the first."""
    candidates = list(dict.fromkeys(runs.loc[(runs["dataset"] == dataset) & (runs["method_kind"] == kind), "method"]))
    if not candidates:
        return None
    return kind if kind in candidates else candidates[0]


def reference_accuracy(runs: pd.DataFrame, dataset: str, reference: str, ordering: str | None = None) -> float:
    """The reference's accuracy under `ordering` (its mean where it did not run under it, or without one)."""
    rows = runs[(runs["dataset"] == dataset) & (runs["method"] == reference)]
    same = rows[rows["ordering"] == ordering]
    return float((same if len(same) else rows)["accuracy"].mean())


def reference_records(results: Results, dataset: str, reference: str | None) -> pd.DataFrame | None:
    """Records of the reference on `dataset` (any ordering: the reference's predictions do not depend on it)."""
    for (d, m, _), frame in results.records.items():
        if d == dataset and m == reference:
            return frame
    return None


def paired_difference(results: Results, dataset: str, method: str, reference: str | None,
                      settings: ReportParams) -> dict | None:
    """Accuracy of `method` minus `reference`, paired per ordering, with a bootstrap interval."""
    if reference is None or reference == method:
        return None
    runs = results.runs
    rows = runs[(runs["dataset"] == dataset) & (runs["method"] == method)]
    diffs = np.array([accuracy - reference_accuracy(runs, dataset, reference, ordering)
                      for accuracy, ordering in zip(rows["accuracy"], rows["ordering"])])
    rng = np.random.default_rng(settings.seed)
    out = {"reference": reference, "mean_diff": float(diffs.mean()), "n_orderings": len(diffs)}
    if len(diffs) >= 2 and np.ptp(diffs) > 0:
        low, high = bootstrap_ci(diffs, settings.bootstrap_samples, settings.confidence, rng)
        return {**out, "ci_low": low, "ci_high": high, "ci_method": CI_OVER_ORDERINGS}
    # one ordering, or two order-independent methods (a zero-width interval over orderings would read as
    # certainty): the variability left to show is the samples', paired by sample_id
    mine = results.records.get((dataset, method, rows["ordering"].iloc[0]))
    theirs = reference_records(results, dataset, reference)
    if mine is None or theirs is None:
        return {**out, "ci_low": None, "ci_high": None, "ci_method": None}
    paired = mine[["sample_id", "correct"]].merge(theirs[["sample_id", "correct"]], on="sample_id",
                                                  suffixes=("", "_ref"))
    per_sample = paired["correct"].astype(float) - paired["correct_ref"].astype(float)
    low, high = bootstrap_ci(per_sample, settings.bootstrap_samples, settings.confidence, rng)
    return {**out, "mean_diff": float(per_sample.mean()), "ci_low": low, "ci_high": high,
            "ci_method": CI_OVER_SAMPLES, "n_samples": len(per_sample)}


def block_reference(records: pd.DataFrame, block: np.ndarray, zs_correct: pd.Series | None, zs_accuracy):
    """Zero-shot accuracy on the samples of one block (its dataset accuracy where the samples are unknown)."""
    if zs_correct is not None:
        matched = zs_correct.reindex(records.loc[block, "sample_id"]).dropna()
        if len(matched):
            return float(matched.astype(float).mean())
    return zs_accuracy


def collapse_check(row, records: pd.DataFrame | None, zs_correct, zs_accuracy, margin: float) -> dict:
    """First/last block accuracy, zero-shot on the same samples, and whether the run collapsed."""
    first, last = float(row.first_block_accuracy), float(row.last_block_accuracy)
    zs_first = zs_last = zs_accuracy
    if records is not None and len(records):
        position = records["position"].to_numpy()
        size = int(row.block_size)
        last_start = size * ((len(records) - 1) // size)
        zs_first = block_reference(records, position < size, zs_correct, zs_accuracy)
        zs_last = block_reference(records, position >= last_start, zs_correct, zs_accuracy)
    gain_first = first - (zs_first if zs_first is not None else 0.0)
    gain_last = last - (zs_last if zs_last is not None else 0.0)
    below_zero_shot = zs_last is not None and gain_last < -margin
    below_first = gain_last < gain_first - margin
    return {"accuracy": float(row.accuracy), "first_block": first, "last_block": last,
            "zero_shot_first_block": zs_first, "zero_shot_last_block": zs_last,
            "collapsed": bool(below_zero_shot or below_first),
            "below_zero_shot": bool(below_zero_shot), "below_first_block": bool(below_first)}


def wins_losses(records: pd.DataFrame, zs_records: pd.DataFrame) -> tuple[int, int]:
    """Samples this run gets right and zero-shot wrong, and the reverse (matched by sample_id)."""
    paired = records[["sample_id", "correct"]].merge(zs_records[["sample_id", "correct"]], on="sample_id",
                                                      suffixes=("", "_zs"))
    mine, theirs = paired["correct"].astype(bool), paired["correct_zs"].astype(bool)
    return int((mine & ~theirs).sum()), int((~mine & theirs).sum())


def domain_blocks(domains) -> list[tuple[str, int, int]]:
    """Maximal runs of one domain along the stream: (domain, start, end) with end exclusive."""
    domains = list(domains)
    blocks, start = [], 0
    for i in range(1, len(domains) + 1):
        if i == len(domains) or domains[i] != domains[start]:
            blocks.append((domains[start], start, i))
            start = i
    return blocks


def cyclic_prompt_loss(records: pd.DataFrame) -> dict:
    """Of the prompts appended during a domain's block, the fraction deleted before that domain's next block."""
    records = records.sort_values("position").reset_index(drop=True)
    deletions: dict[int, list[int]] = {}
    for t, ids in enumerate(records["deleted"]):
        for prompt_id in ids:
            deletions.setdefault(int(prompt_id), []).append(t)
    blocks = domain_blocks(records["domain"])
    counted = lost = 0
    for k, (domain, start, end) in enumerate(blocks):
        returns = next((b[1] for b in blocks[k + 1:] if b[0] == domain), None)
        if returns is None:  # the domain never comes back: nothing to lose
            continue
        for t in range(start, end):
            for prompt_id in records["appended"].iloc[t]:
                # strictly after t: a slot reset and refilled in one step deletes its previous occupant
                first_deletion = next((d for d in deletions.get(int(prompt_id), []) if d > t), None)
                counted += 1
                lost += first_deletion is not None and first_deletion < returns
    return {"fraction": lost / counted if counted else None, "appended_before_return": counted,
            "deleted_before_return": lost, "domain_blocks": len(blocks)}


def method_metrics(results: Results, dataset: str, method: str, settings: ReportParams) -> dict:
    """metrics.json's entry for one dataset and method."""
    runs = results.runs
    rows = runs[(runs["dataset"] == dataset) & (runs["method"] == method)].set_index("ordering", drop=False)
    orderings = [o for o in plan_order(results, "ordering") if o in rows.index]
    rows = rows.loc[orderings]
    accuracy = rows["accuracy"].astype(float)
    zs = reference_method(runs, dataset, "zero_shot")
    zs_records = reference_records(results, dataset, zs)
    zs_correct = None if zs_records is None else zs_records.set_index("sample_id")["correct"]
    zs_accuracy = None if zs is None else reference_accuracy(runs, dataset, zs)
    per_ordering = {}
    for row in rows.itertuples(index=False):
        records = results.records.get((dataset, method, row.ordering))
        entry = {"ordering_kind": row.ordering_kind,
                 **collapse_check(row, records, zs_correct, zs_accuracy, settings.collapse_margin)}
        if zs_records is not None and method != zs:
            entry["wins_vs_zero_shot"], entry["losses_vs_zero_shot"] = wins_losses(records, zs_records)
        per_ordering[row.ordering] = entry
    out = {
        "method_kind": str(rows["method_kind"].iloc[0]),
        "n_orderings": len(rows), "orderings": orderings,
        "mean": float(accuracy.mean()), "std": float(accuracy.std()),  # pandas' sample std (ddof=1)
        "min": float(accuracy.min()), "max": float(accuracy.max()),
        "worst_ordering": str(accuracy.idxmin()),
        "collapsed": any(e["collapsed"] for e in per_ordering.values()),
        "collapsed_orderings": [o for o, e in per_ordering.items() if e["collapsed"]],
        "vs_zero_shot": paired_difference(results, dataset, method, zs, settings),
        "vs_tpt": paired_difference(results, dataset, method, reference_method(runs, dataset, "tpt"), settings),
    }
    if zs_records is not None and method != zs:
        out["wins_vs_zero_shot"] = float(np.mean([e["wins_vs_zero_shot"] for e in per_ordering.values()]))
        out["losses_vs_zero_shot"] = float(np.mean([e["losses_vs_zero_shot"] for e in per_ordering.values()]))
    cyclic = {row.ordering: cyclic_prompt_loss(results.records[(dataset, method, row.ordering)])
              for row in rows.itertuples(index=False)
              if row.method_kind == "dynaprompt" and row.ordering_kind == "cyclic"
              and "domain" in results.records[(dataset, method, row.ordering)].columns}
    if cyclic:
        out["cyclic_prompt_loss_before_return"] = {o: c["fraction"] for o, c in cyclic.items()}
        out["cyclic_prompt_counts"] = cyclic
    out["per_ordering"] = per_ordering
    return out


def compute_metrics(results: Results, settings: ReportParams) -> dict:
    """metrics.json: definitions once at the top, then datasets -> methods."""
    runs = results.runs
    datasets = {}
    for dataset in plan_order(results, "dataset"):
        present = set(runs.loc[runs["dataset"] == dataset, "method"])
        datasets[dataset] = {m: method_metrics(results, dataset, m, settings)
                             for m in plan_order(results, "method") if m in present}
    return plain({
        "collapse_definition": COLLAPSE_DEFINITION,
        "collapse_margin": settings.collapse_margin,
        "std": "sample standard deviation (ddof=1) of accuracy across orderings; null with one ordering",
        "ci_method": CI_OVER_ORDERINGS + " when a method has >= 2 orderings whose differences vary, else "
                     + CI_OVER_SAMPLES,
        "confidence": settings.confidence,
        "bootstrap_samples": settings.bootstrap_samples,
        "paired_difference": "method accuracy minus the reference's (method kinds zero_shot, tpt) on the same "
                             "dataset and ordering; an order-independent reference run under fewer orderings "
                             "is reused for all",
        "wins_losses": "per-sample wins (method right, zero-shot wrong) and losses (the reverse), matched by "
                       "sample_id, averaged over orderings",
        "runs": int(len(runs)),
        "datasets": datasets,
    })


def plain(value):
    """JSON-safe copy: numpy scalars to Python, NaN to null (DVC and strict parsers reject NaN)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- the report

def pct(value) -> str:
    """A fraction as a percentage with one decimal; a dash where unknown."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def signed_points(diff: dict | None) -> str:
    """'+1.2 [-0.3, +2.5]' in accuracy points, or a dash."""
    if not diff:
        return "–"
    text = f"{100 * diff['mean_diff']:+.1f}"
    if diff.get("ci_low") is not None:
        text += f" [{100 * diff['ci_low']:+.1f}, {100 * diff['ci_high']:+.1f}]"
    return text


def headline_tables(metrics: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """dataset x method: mean ± std across orderings, and the worst ordering with its accuracy."""
    mean_std, worst = {}, {}
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            spread = f" ± {pct(m['std'])}" if m["std"] is not None else " (1 ordering)"
            mean_std.setdefault(method, {})[dataset] = pct(m["mean"]) + spread
            worst.setdefault(method, {})[dataset] = f"{m['worst_ordering']} ({pct(m['min'])})"
    as_table = lambda cells: pd.DataFrame(cells).fillna("").rename_axis("dataset").reset_index()
    return as_table(mean_std), as_table(worst)


def differences_table(metrics: dict) -> pd.DataFrame:
    """Paired differences against zero-shot and TPT, in accuracy points, with their intervals."""
    rows = []
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            over = {(d or {}).get("ci_method") for d in (m["vs_zero_shot"], m["vs_tpt"])} - {None}
            rows.append({"dataset": dataset, "method": method, "orderings": m["n_orderings"],
                         "Δ vs zero-shot": signed_points(m["vs_zero_shot"]), "Δ vs TPT": signed_points(m["vs_tpt"]),
                         "interval": "; ".join(sorted(over)) or "–"})
    return pd.DataFrame(rows)


def collapse_table(metrics: dict) -> pd.DataFrame:
    """One row per collapsed run: first and last block against zero-shot on the same samples."""
    rows = []
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            for ordering, e in m["per_ordering"].items():
                if e["collapsed"]:
                    why = [w for w, hit in (("below zero-shot", e["below_zero_shot"]),
                                            ("below first block", e["below_first_block"])) if hit]
                    rows.append({"run": run_name(dataset, method, ordering), "first block %": pct(e["first_block"]),
                                 "last block %": pct(e["last_block"]),
                                 "zero-shot, first block's samples %": pct(e["zero_shot_first_block"]),
                                 "zero-shot, last block's samples %": pct(e["zero_shot_last_block"]),
                                 "criterion": ", ".join(why)})
    return pd.DataFrame(rows)


def wins_table(metrics: dict) -> pd.DataFrame:
    """Per-sample wins and losses against zero-shot, averaged over orderings."""
    rows = [{"dataset": d, "method": method, "orderings": m["n_orderings"],
             "wins (right, zero-shot wrong)": f"{m['wins_vs_zero_shot']:.1f}",
             "losses (wrong, zero-shot right)": f"{m['losses_vs_zero_shot']:.1f}",
             "net": f"{m['wins_vs_zero_shot'] - m['losses_vs_zero_shot']:+.1f}"}
            for d, methods in metrics["datasets"].items() for method, m in methods.items()
            if "wins_vs_zero_shot" in m]
    return pd.DataFrame(rows)


def cyclic_table(metrics: dict) -> pd.DataFrame:
    """Prompts appended in a domain's block and deleted before that domain returned, per cyclic run."""
    rows = [{"run": run_name(d, method, o), "domain blocks": c["domain_blocks"],
             "prompts appended (domain returns later)": c["appended_before_return"],
             "deleted before the domain returned": c["deleted_before_return"],
             "fraction": "–" if c["fraction"] is None else f"{c['fraction']:.2f}"}
            for d, methods in metrics["datasets"].items() for method, m in methods.items()
            for o, c in m.get("cyclic_prompt_counts", {}).items()]
    return pd.DataFrame(rows)


def setup_tables(results: Results) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Datasets, methods and orderings the sweep ran, in plan order."""
    runs = results.runs
    first = lambda column, name, value: runs.loc[runs[column] == name, value].iloc[0]
    datasets = pd.DataFrame([{"dataset": d, "samples per stream": int(first("dataset", d, "n")),
                              "runs": int((runs["dataset"] == d).sum())} for d in plan_order(results, "dataset")])
    methods = pd.DataFrame([{"method": m, "kind": first("method", m, "method_kind"),
                             "runs": int((runs["method"] == m).sum())} for m in plan_order(results, "method")])
    orderings = pd.DataFrame([{"ordering": o, "kind": first("ordering", o, "ordering_kind"),
                               "runs": int((runs["ordering"] == o).sum())} for o in plan_order(results, "ordering")])
    return datasets, methods, orderings


def report_blocks(results: Results, metrics: dict, params_dict: dict, settings: ReportParams,
                  figure_notes: dict) -> list:
    """The report, top to bottom, as (kind, ...) blocks both renderers understand."""
    model = (params_dict or {}).get("model") or {}
    runs = results.runs
    datasets, methods, orderings = setup_tables(results)
    mean_std, worst = headline_tables(metrics)
    collapsed, cyclic = collapse_table(metrics), cyclic_table(metrics)
    block_sizes = ", ".join(str(b) for b in sorted(set(runs["block_size"].astype(int))))
    blocks = [
        ("h1", "Test-time prompt tuning under different sample orders"),
        ("h2", "Setup"),
        ("p", f"{len(runs)} runs over {len(datasets)} datasets, {len(methods)} methods and {len(orderings)} "
              f"orderings; all {len(results.plan)} planned runs are present. Model: `{model.get('arch', '?')}` with "
              f"weights `{model.get('pretrained', '?')}`. Accuracy per block of {block_sizes} samples along each "
              f"stream."),
        ("table", datasets), ("table", methods), ("table", orderings),
        ("h2", "Accuracy across orderings"),
        ("p", "Mean ± sample standard deviation (ddof=1) of accuracy (%) over the orderings each method ran. "
              "Order-independent methods (zero-shot, TPT, ZERO) may have run under one ordering only."),
        ("table", mean_std),
        ("p", "Worst ordering of each method (its accuracy, %)."),
        ("table", worst),
        ("p", f"Paired differences in accuracy points against zero-shot and TPT on the same dataset and ordering, "
              f"with a {100 * settings.confidence:.0f}% percentile-bootstrap interval ({settings.bootstrap_samples} "
              f"resamples): over orderings when a method ran under two or more and its differences vary across "
              f"them, else over samples paired by sample_id."),
        ("table", differences_table(metrics)),
        ("h2", "Figures"),
        ("figure", f"figures/{FIGURE_FILES['blocks']}",
         "Accuracy per block along the stream: the line is the mean over orderings, the band their min–max. "
         + figure_notes.get("blocks", "")),
        ("figure", f"figures/{FIGURE_FILES['kinds']}",
         "Accuracy per ordering kind: bars are means over the orderings of a kind, dots single orderings. "
         "An order-independent method run under fewer orderings is drawn at its one value for every kind."),
        ("figure", f"figures/{FIGURE_FILES['buffer']}",
         "DynaPrompt's buffer: size, cumulative appends and deletions (left), the prompt ids selected at each "
         "position (middle), and how often each prompt id was selected (right). Dotted lines mark domain switches "
         "in cyclic streams. " + figure_notes.get("buffer", "")),
        ("h2", "What collapsed"),
        ("p", f"Margin {settings.collapse_margin:g}. {COLLAPSE_DEFINITION}"),
        ("table", collapsed) if len(collapsed) else ("p", "No run collapsed."),
    ]
    if len(cyclic):
        blocks += [("h2", "Cyclic streams: are a domain's prompts still there when it returns?"),
                   ("p", "Prompts appended during a domain's block, and how many of them were deleted before that "
                         "domain's next block (`cyclic_prompt_loss_before_return` in metrics.json)."),
                   ("table", cyclic)]
    wins = wins_table(metrics)
    blocks += [("h2", "Per-sample wins and losses against zero-shot"),
               ("p", "Samples a method gets right and zero-shot wrong (wins), and the reverse (losses), matched by "
                     "sample_id and averaged over the method's orderings (per stream, not summed).")]
    blocks.append(("table", wins) if len(wins) else ("p", "No zero-shot records to compare with."))
    return blocks


def render_markdown(blocks: list) -> str:
    """report.md: figures linked relative to the reports folder."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            parts.append(f"# {block[1]}")
        elif kind == "h2":
            parts.append(f"## {block[1]}")
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            parts.append(block[1].to_markdown(index=False))
        elif kind == "figure":
            parts.append(f"![{Path(block[1]).stem}]({block[1]})\n\n*{block[2].strip()}*")
    return "\n\n".join(parts) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; } figcaption { font-size: 0.9em; color: #555; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def render_html(blocks: list, reports_dir: Path) -> str:
    """report.html: self-contained, figures embedded as base64 PNGs, no scripts or external files."""
    import markdown

    parts = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(markdown.markdown(block[1]))
        elif kind == "table":
            parts.append(block[1].to_html(index=False, border=0, escape=True))
        elif kind == "figure":
            data = base64.b64encode((reports_dir / block[1]).read_bytes()).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block[1])}">'
                         f"<figcaption>{html.escape(block[2].strip())}</figcaption></figure>")
    title = html.escape(blocks[0][1])
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


# ---------------------------------------------------------------- the stage

def draw_figures(results: Results, metrics: dict, figures_dir: Path, settings: ReportParams) -> dict:
    """All three figures; returns notes for their captions (what was left out)."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    datasets = plan_order(results, "dataset")
    methods = plan_order(results, "method")
    shown = datasets[: settings.max_panels]
    notes = {}
    if len(datasets) > len(shown):
        notes["blocks"] = f"First {len(shown)} of {len(datasets)} datasets, in plan order."
    figures.accuracy_per_block(results.runs, shown, methods, figures_dir / FIGURE_FILES["blocks"], settings.dpi)
    figures.accuracy_by_ordering_kind(results.runs, shown, methods, order_independent_methods(results.runs),
                                      figures_dir / FIGURE_FILES["kinds"], settings.dpi)
    panels = buffer_panels(results, metrics, settings.max_panels)
    notes["buffer"] = (f"{len(panels)} runs shown: cyclic ones first, then one ordering per dataset and method."
                       if panels else "No DynaPrompt runs in this sweep.")
    figures.buffer_dynamics(panels, figures_dir / FIGURE_FILES["buffer"], settings.dpi)
    return notes


def buffer_panels(results: Results, metrics: dict, limit: int) -> list[dict]:
    """DynaPrompt runs for the buffer figure: cyclic runs first, then the first ordering of each dataset/method."""
    runs = results.runs[results.runs["method_kind"] == "dynaprompt"]
    cyclic = runs[runs["ordering_kind"] == "cyclic"]
    others = runs[runs["ordering_kind"] != "cyclic"].drop_duplicates(["dataset", "method"])
    panels = []
    for row in pd.concat([cyclic, others]).head(limit).itertuples(index=False):
        loss = metrics["datasets"][row.dataset][row.method].get("cyclic_prompt_loss_before_return", {})
        panels.append({"title": row.run, "records": results.records[(row.dataset, row.method, row.ordering)],
                       "loss": loss.get(row.ordering)})
    return panels


def build_report(results_dir: Path, reports_dir: Path, params_dict: dict, validation_dir: Path | None = None) -> dict:
    """Validate the results, then write metrics.json, the figures and report.md/.html; returns the metrics.

    Raises InvalidResults after writing the validation report when the results are incomplete or inconsistent.
    """
    results_dir, reports_dir = Path(results_dir), Path(reports_dir)
    validation_dir = Path(validation_dir) if validation_dir else reports_dir / "validation"
    settings = report_params(params_dict)
    results = load_results(results_dir)
    validation = validate_results(results, results_dir)
    target = validation_dir / "results.json"
    write_json(target, validation)  # first: the report of what is wrong must survive the failure
    if not validation["success"]:
        raise InvalidResults(validation_message(validation, target))
    metrics = compute_metrics(results, settings)
    write_json(reports_dir / "metrics.json", metrics)
    notes = draw_figures(results, metrics, reports_dir / "figures", settings)
    blocks = report_blocks(results, metrics, params_dict, settings, notes)
    (reports_dir / "report.md").write_text(render_markdown(blocks))
    (reports_dir / "report.html").write_text(render_html(blocks, reports_dir))
    return metrics


def main() -> None:
    reports_dir, params_dict = path("reports"), params()
    try:
        report_params(params_dict)  # a typo in `report:` stops the stage before any work
    except ValueError as error:
        fail(str(error))
    try:
        metrics = build_report(path("results"), reports_dir, params_dict, path("validation"))
    except InvalidResults as error:
        fail(str(error))
    flagged = [f"{d}/{m}" for d, ms in metrics["datasets"].items() for m, v in ms.items() if v["collapsed"]]
    print(f"report: {metrics['runs']} runs -> {reports_dir / 'report.html'}; collapsed: {', '.join(flagged) or 'none'}")


if __name__ == "__main__":
    main()
