"""reports/metrics.json: every number of the report, computed from the results with analysis.statistics.

The answer first (`orders`): per stream and order-dependent method, each kind's contrast against the i.i.d. stream
and the spread between orderings within each kind, adjusted across all tested rows, with verdicts; the pure-chaos
SD; the evidence per kind. Then the accuracy per kind of every method, the differences against zero-shot and TPT,
collapse, memory, ablations, calibration, the testbed and the findings' diagnostics.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import statistics as st
from dynaprompt.diagnostics import prediction_agreement
from dynaprompt.specs import Settings

from . import orders
from .results import Results

DEFINITIONS = {
    "grid": "each order-dependent method runs every ordering of every kind under every augmentation seed "
            "(`sweep.view_seeds`: the random crops, flips and AugMix of every sample's views, and a seeded "
            "perturbation at the last bit of the feature cache's precision for the methods that read the original "
            "view only); a cell is one (ordering, seed) run. Order-independent methods run once per seed and are "
            "reordered, so their orderings, and their kinds, cannot differ",
    "kinds": "the kind of stream is the ordering's family (its kind and defining options: shuffle, dirichlet0.1, "
             "class_blocked, ...), named as the field names it (NOTE, RoTTA and StatA: 'Dirichlet δ=0.1', "
             "'separate'; Döbler et al.: 'mixed domains', 'mixed + correlated'); label_correlation: the fraction of "
             "consecutive same-label pairs along the stream, the mean over the kind's orderings",
    "accuracy": "per kind: the mean accuracy over the kind's orderings x seeds (balanced: the mean of the "
                "per-ordering means); n = orderings x seeds runs",
    "vs_reference": "on the i.i.d. kind only: accuracy minus the reference's (zero-shot or TPT) at the same seed, "
                    "paired by sample within each cell, averaged over the cells; ci_orderings: Student-t over the "
                    "per-ordering differences (averaged over seeds; n = orderings); ci_samples: percentile bootstrap "
                    "over samples of the per-sample mean difference (report.bootstrap_samples resamples, n = "
                    "samples, paired across cells)",
    "collapse": "an order-dependent run collapses when its last block falls more than collapse_margin below "
                "zero-shot on the same samples, or below its own first block (both measured against zero-shot on "
                "the block's samples; the second rule on i.i.d. shuffles only: on class-blocked, Dirichlet, cyclic, "
                "hardest- and easiest-first orderings the first and last blocks hold other classes, domains or "
                "difficulties, where a gain differs by itself); "
                "order-independent methods carry no state and cannot collapse",
    "wins_losses": "samples a run gets right and zero-shot wrong (wins), and the reverse, averaged over the runs",
    "cyclic_memory": "on cyclic streams, of the entries (prompts, cached features) appended during a domain's "
                     "block, the fraction deleted before that domain's next block",
    "diagnostics": "reports/diagnostics.json (the diagnostics stage) per swept stream: ECALP's share of negative "
                   "top-3 image-text edges and of nodes whose heaviest edge is not their zero-shot top-1 (n = "
                   "samples); C-TPT's median ratio |lambda grad ATFD| / |grad entropy| at its first step and the "
                   "share of the step's coordinates that follow the dispersion (n = report.diagnostic_samples "
                   "samples); here C-TPT's agreement with zero-shot: the share of samples both predict alike, from "
                   "the records, the mean over the view seeds",
    **st.ORDER_DEFINITIONS,
}


def correct_matrix(results: Results, dataset: str, method: str, cells: list) -> tuple[np.ndarray, list]:
    """[samples, cells] of per-sample correctness, rows matched by sample_id (sorted)."""
    columns = []
    for cell in cells:
        records = results.records_of(dataset, method, cell)
        columns.append(records.set_index("sample_id")["correct"].sort_index())
    frame = pd.concat(columns, axis=1, join="inner")
    return frame.to_numpy(dtype=float), list(frame.index)


def reference_correct(results: Results, dataset: str, reference: str, sample_ids: list, seeds: list):
    """The reference's per-sample correctness on the same samples, one column per cell's seed ([samples, cells]).

    The reference is order-independent (zero-shot, TPT): any of its orderings at a seed gives the same answers;
    where it did not run at a cell's seed, its run at the params' own seed stands in (zero-shot reads the original
    view only, which no seed changes)."""
    runs = orders.grid_runs(results)
    mine = runs[(runs["dataset"] == dataset) & (runs["method"] == reference)]
    if mine.empty or not bool(mine["order_independent"].all()):
        return None
    by_seed = {int(seed): rows["cell"].iloc[0] for seed, rows in mine.groupby("view_seed")}
    fallback = mine["cell"].iloc[0]
    columns = []
    for seed in seeds:
        records = results.records_of(dataset, reference, by_seed.get(int(seed), fallback)).set_index("sample_id")
        columns.append(records.loc[sample_ids, "correct"].to_numpy(dtype=float))
    return np.stack(columns, axis=1)


def grid_rows(rows: pd.DataFrame, results: Results) -> pd.DataFrame:
    """A method's runs in plan order: orderings as the plan lists them, seeds ascending within each."""
    orderings = results.order("ordering", rows)
    rows = rows.assign(_o=rows["ordering"].map({o: i for i, o in enumerate(orderings)}))
    return rows.sort_values(["_o", "view_seed"]).drop(columns="_o")


def per_kind_accuracy(rows: pd.DataFrame, settings: Settings) -> dict:
    """family -> accuracy (mean over its orderings x seeds), its orderings, seeds, runs and expected tail."""
    config = settings.report
    out = {}
    for family in orders.kind_order(rows["ordering_family"], config.reference_kind):
        mine = rows[rows["ordering_family"] == family]
        values = mine["accuracy"].astype(float).to_numpy()
        out[family] = {"accuracy": float(values.mean()), "n_orderings": int(mine["ordering"].nunique()),
                       "n_seeds": int(mine["view_seed"].nunique()), "n_runs": len(values),
                       "tail": st.tail_summary(values, config.tail_fraction)}
    return out


def method_summary(results: Results, settings: Settings, dataset: str, method: str, rows: pd.DataFrame) -> dict:
    """One method on one stream: its accuracy per kind, its cells, and its differences from zero-shot and TPT on
    the i.i.d. kind."""
    config = settings.report
    rows = grid_rows(rows, results)
    cells, accuracy = list(rows["cell"]), rows["accuracy"].astype(float).to_numpy()
    out = {
        "method_kind": str(rows["method_kind"].iloc[0]), "order_independent": bool(rows["order_independent"].all()),
        "n_orderings": int(rows["ordering"].nunique()), "n_seeds": int(rows["view_seed"].nunique()),
        "n_cells": len(cells), "n_samples": int(rows["n"].iloc[0]), "mean": float(accuracy.mean()),
        "per_kind": per_kind_accuracy(rows, settings),
        "per_cell": {c: {"accuracy": float(a), "ordering": str(o), "view_seed": int(s), "ordering_kind": str(k),
                         "kind": str(f)}
                     for c, a, o, s, k, f in zip(cells, accuracy, rows["ordering"], rows["view_seed"],
                                                 rows["ordering_kind"], rows["ordering_family"])},
    }
    iid = rows[rows["ordering_family"] == config.reference_kind]
    for name, reference in (("vs_zero_shot", "zero_shot"), ("vs_tpt", "tpt")):
        ref = reference_method(results, dataset, reference)
        out[name] = None if ref in (None, method) or iid.empty else difference(results, settings, dataset, method,
                                                                               ref, iid)
    return out


def difference(results: Results, settings: Settings, dataset: str, method: str, reference: str,
               rows: pd.DataFrame) -> dict | None:
    """`method` minus `reference` on the cells of `rows`, paired by sample (analysis.statistics.paired_difference)."""
    config = settings.report
    correct, sample_ids = correct_matrix(results, dataset, method, list(rows["cell"]))
    matrix = reference_correct(results, dataset, reference, sample_ids, list(rows["view_seed"]))
    if matrix is None:
        return None
    return {"reference": reference, "kind": config.reference_kind, **st.paired_difference(
        correct, matrix, config.confidence, config.bootstrap_samples, config.seed, groups=list(rows["ordering"]))}


def reference_method(results: Results, dataset: str, kind: str) -> str | None:
    """The method of `kind` to compare against on `dataset`: the one named like the kind, else the first."""
    runs = results.runs
    candidates = list(dict.fromkeys(runs.loc[(runs["dataset"] == dataset) & (runs["method_kind"] == kind), "method"]))
    return None if not candidates else (kind if kind in candidates else candidates[0])


def first_cell(results: Results, dataset: str, method: str) -> str:
    """The first grid cell of `method` on `dataset` (its records stand for an order-independent reference)."""
    runs = orders.grid_runs(results)
    return runs.loc[(runs["dataset"] == dataset) & (runs["method"] == method), "cell"].iloc[0]


def block_zero_shot(results: Results, dataset: str, records: pd.DataFrame, block_size: int) -> list[float] | None:
    """Zero-shot's accuracy on the samples of each block of `records` (matched by sample_id)."""
    zs = reference_method(results, dataset, "zero_shot")
    if zs is None:
        return None
    truth = results.records_of(dataset, zs, first_cell(results, dataset, zs)).set_index("sample_id")["correct"]
    matched = truth.loc[records["sample_id"]].to_numpy(dtype=float)
    return [float(matched[i:i + block_size].mean()) for i in range(0, len(matched), block_size)]


def collapse_check(results: Results, row, margin: float) -> dict:
    """First and last block against zero-shot on the same samples; collapsed when either falls past `margin`.

    Order-independent methods carry no state, so their block-to-block changes are the classes' own. Only an i.i.d.
    shuffle's first and last blocks are alike: on a class-blocked or Dirichlet ordering they hold different classes,
    on a cyclic one different domains, on a hardest- or easiest-first one samples of another difficulty (where the
    gain over zero-shot differs by itself), so there only zero-shot on the same samples is a fair reference.
    """
    records = results.records_of(row.dataset, row.method, row.cell)
    blocks = list(row.block_accuracy)
    zs = block_zero_shot(results, row.dataset, records, int(row.block_size)) or [math.nan] * len(blocks)
    gain_first, gain_last = blocks[0] - zs[0], blocks[-1] - zs[-1]
    stateful = not row.order_independent
    below_zero_shot = stateful and bool(gain_last < -margin)
    below_first = stateful and row.ordering_kind == "shuffle" and bool(gain_last < gain_first - margin)
    return {"first_block": blocks[0], "last_block": blocks[-1], "zero_shot_first_block": zs[0],
            "zero_shot_last_block": zs[-1], "below_zero_shot": below_zero_shot, "below_first_block": below_first,
            "collapsed": below_zero_shot or below_first}


def wins_losses(results: Results, row) -> tuple[int, int] | None:
    """Samples the run gets right and zero-shot wrong, and the reverse."""
    zs = reference_method(results, row.dataset, "zero_shot")
    if zs is None or zs == row.method:
        return None
    truth = results.records_of(row.dataset, zs, first_cell(results, row.dataset, zs)).set_index("sample_id")["correct"]
    mine = results.records_of(row.dataset, row.method, row.cell).set_index("sample_id")["correct"]
    truth = truth.loc[mine.index]
    return int((mine & ~truth).sum()), int((~mine & truth).sum())


def domain_blocks(domains: pd.Series) -> list[tuple[str, int, int]]:
    """(domain, start, end) of each run of one domain along a stream."""
    values = domains.astype(str).tolist()
    blocks, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            blocks.append((values[start], start, i))
            start = i
    return blocks


def cyclic_prompt_loss(records: pd.DataFrame) -> dict:
    """Of the entries appended during a domain's block, the fraction deleted before that domain came back."""
    deletions = {}
    for t, ids in enumerate(records["deleted"]):
        for entry in ids:
            deletions.setdefault(int(entry), []).append(t)
    blocks = domain_blocks(records["domain"])
    counted = lost = 0
    for k, (domain, start, end) in enumerate(blocks):
        returns = next((b[1] for b in blocks[k + 1:] if b[0] == domain), None)
        if returns is None:
            continue
        for t in range(start, end):
            for entry in records["appended"].iloc[t]:
                first_deletion = next((d for d in deletions.get(int(entry), []) if d > t), None)
                counted += 1
                lost += first_deletion is not None and first_deletion < returns
    return {"fraction": lost / counted if counted else None, "appended_before_return": counted,
            "deleted_before_return": lost, "domain_blocks": len(blocks)}


def dataset_metrics(results: Results, settings: Settings, runs: pd.DataFrame) -> dict:
    """datasets -> methods -> summary, with each cell's collapse check, wins and losses and cyclic memory."""
    out = {}
    margin = settings.report.collapse_margin
    for dataset in results.order("dataset", runs):
        here = runs[runs["dataset"] == dataset]
        out[dataset] = {}
        for method in results.order("method", here):
            rows = here[here["method"] == method]
            summary = method_summary(results, settings, dataset, method, rows)
            for row in rows.itertuples(index=False):
                entry = summary["per_cell"][row.cell]
                entry.update(collapse_check(results, row, margin))
                counts = wins_losses(results, row)
                if counts is not None:
                    entry["wins_vs_zero_shot"], entry["losses_vs_zero_shot"] = counts
                records = results.records_of(dataset, method, row.cell)
                if row.ordering_kind == "cyclic" and "domain" in records.columns and records["appended"].map(len).any():
                    entry["cyclic_loss"] = cyclic_prompt_loss(records)
            per = summary["per_cell"].values()
            summary["collapsed"] = any(e["collapsed"] for e in per)
            summary["collapsed_cells"] = [c for c, e in summary["per_cell"].items() if e["collapsed"]]
            if all("wins_vs_zero_shot" in e for e in per):
                summary["wins_vs_zero_shot"] = float(np.mean([e["wins_vs_zero_shot"] for e in per]))
                summary["losses_vs_zero_shot"] = float(np.mean([e["losses_vs_zero_shot"] for e in per]))
            out[dataset][method] = summary
    return out


def ablation_rows(results: Results, settings: Settings) -> dict:
    """metrics.json's `ablation`, `buffer_size` and `margins`: one row per variant of the ablation stream."""
    config = settings.ablations
    if config.dataset is None:
        return {"ablation": [], "buffer_size": [], "margins": []}
    runs = results.group("ablation")
    grid = orders.grid_runs(results)
    runs = pd.concat([runs, grid[(grid["dataset"] == config.dataset)
                                 & grid["method"].isin([config.base, *config.references])
                                 & grid["ordering"].isin(config.orderings)
                                 & (grid["view_seed"] == settings.views.view_seed)]]).drop_duplicates("run")
    base = settings.method(config.base)
    table, sizes, margins = [], [], []
    for method in results.order("method", runs):
        rows = runs[runs["method"] == method]
        accuracy = rows["accuracy"].astype(float)
        interval = st.t_interval(accuracy, settings.report.confidence)
        options = dict(settings.method(method).options)
        variant = "base" if method == config.base else method.split("~", 1)[-1]
        row = {"dataset": config.dataset, "variant": variant, "method": method, "mean": interval["mean"],
               "std": float(accuracy.std()) if len(accuracy) > 1 else None, "ci95": [interval["low"], interval["high"]],
               "n_orderings": len(rows), "n_samples": int(rows["n"].iloc[0])}
        table.append(row)
        if method == config.base or settings.method(method).derived_from == "ablation":
            if options.get("buffer_size", 10) != base.options.get("buffer_size", 10) or method == config.base:
                if options.get("criteria", "both") == "both" and options.get("append", True) and not (
                        options.get("entropy_margin") or options.get("probdiff_margin")):
                    sizes.append({**row, "M": options.get("buffer_size", 10)})
            if method == config.base or "entropy_margin" in options or "probdiff_margin" in options:
                if options.get("buffer_size", 10) == base.options.get("buffer_size", 10):
                    margins.append({**row, "tau_h": options.get("entropy_margin", 0.0),
                                    "tau_d": options.get("probdiff_margin", 0.0)})
    sizes.sort(key=lambda r: r["M"])
    return {"ablation": table, "buffer_size": sizes, "margins": margins}


def calibration_metrics(results: Results, settings: Settings, testbed: dict) -> dict | None:
    """TPT's gain over the reference at each lr of the grid, the lr it peaks at, and the step relative to v0."""
    config = settings.calibration
    if config.dataset is None:
        return None
    runs = results.group("calibration")
    reference = runs[runs["method"] == config.reference]
    if reference.empty:
        return None
    base_accuracy = float(reference["accuracy"].iloc[0])
    rows = []
    for method in config.methods:
        for lr in config.lrs:
            name = f"{method}~lr{lr:g}"
            row = runs[runs["method"] == name]
            if len(row):
                run = row.iloc[0]
                rows.append({"method": method, "lr": float(lr), "accuracy": float(run["accuracy"]),
                             "gain": float(run["accuracy"]) - base_accuracy,
                             "first_block": float(run["first_block_accuracy"]),
                             "last_block": float(run["last_block_accuracy"])})
    tpt_rows = [r for r in rows if r["method"] == config.methods[0]]
    # a tie (the same count of correct samples) goes to the smaller step
    best = max(tpt_rows, key=lambda r: (r["gain"], -r["lr"]))["lr"] if tpt_rows else None
    rms = (testbed or {}).get("v0_context_rms")
    return {"dataset": config.dataset, "ordering": config.ordering, "reference": config.reference,
            "reference_accuracy": base_accuracy, "rows": rows, "chosen_by": config.methods[0], "best_lr": best,
            "params_lr": settings.tuning.lr,
            "params_lr_is_best": best is not None and math.isclose(best, settings.tuning.lr),
            "v0_context_rms": rms, "lr_over_rms": None if not rms else settings.tuning.lr / rms}


def diagnostics_metrics(results: Results, settings: Settings, diagnostics: dict | None, datasets: dict
                        ) -> dict | None:
    """The diagnostics stage's findings per stream next to the method's accuracy (on the i.i.d. kind), zero-shot's
    and TPT's; C-TPT's agreement with zero-shot from the records."""
    if not diagnostics:
        return None
    reference = settings.report.reference_kind
    streams = {}
    for stream, found in diagnostics.get("streams", {}).items():
        methods = datasets.get(stream, {})
        zero_shot, tpt = (reference_method(results, stream, kind) for kind in ("zero_shot", "tpt"))
        streams[stream] = {
            "zero_shot_accuracy": kind_accuracy(methods, zero_shot, reference),
            "tpt_accuracy": kind_accuracy(methods, tpt, reference),
            "ecalp": {m: {**values, "accuracy": kind_accuracy(methods, m, reference)}
                      for m, values in found.get("ecalp", {}).items()},
            "ctpt": {m: {**values, "accuracy": kind_accuracy(methods, m, reference),
                         "agreement_with_zero_shot": agreement(results, stream, m, zero_shot)}
                     for m, values in found.get("ctpt", {}).items()}}
    return {"streams": streams, "model": diagnostics.get("model")}


def kind_accuracy(methods: dict, method: str | None, kind: str) -> float | None:
    """A method's accuracy on `kind` (its first kind where the stream has no such kind); None if it did not run."""
    kinds = methods.get(method, {}).get("per_kind", {})
    return (kinds.get(kind) or next(iter(kinds.values()), {})).get("accuracy")


def agreement(results: Results, stream: str, method: str, zero_shot: str | None) -> float | None:
    """The share of samples `method` and zero-shot predict alike, the mean over the method's view seeds (zero-shot
    at the same seed where it ran there, else at its first)."""
    runs = orders.grid_runs(results)
    mine = runs[(runs["dataset"] == stream) & (runs["method"] == method)]
    if zero_shot is None or mine.empty:
        return None
    theirs = runs[(runs["dataset"] == stream) & (runs["method"] == zero_shot)]
    by_seed = {int(seed): rows["cell"].iloc[0] for seed, rows in theirs.groupby("view_seed")}
    shares = [prediction_agreement(results.records_of(stream, method, rows["cell"].iloc[0]),
                                   results.records_of(stream, zero_shot, by_seed.get(int(seed),
                                                                                     theirs["cell"].iloc[0])))
              for seed, rows in mine.groupby("view_seed")]
    return float(np.mean(shares))


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


def compute_metrics(results: Results, settings: Settings, testbed: dict | None, pretrain: dict | None,
                    diagnostics: dict | None = None) -> dict:
    """metrics.json: definitions once at the top, then the answer (`order`, `chaos`, `evidence`), then each part."""
    runs = orders.grid_runs(results)
    kinds = orders.kind_table(results, settings, runs)
    datasets = dataset_metrics(results, settings, runs)
    rows = orders.order_rows(results, settings, runs, kinds)
    config = settings.report
    return plain({
        "definitions": DEFINITIONS, "confidence": config.confidence, "adjustment": config.adjustment,
        "adjustment_method": st.ADJUSTMENTS[config.adjustment], "equivalence_margin": config.equivalence_margin,
        "reference_kind": config.reference_kind, "collapse_margin": config.collapse_margin,
        "tail_fraction": config.tail_fraction,
        "runs": int(len(results.runs)), "tested_rows": int(np.isfinite(rows["p_value"].astype(float)).sum()),
        "kinds": {stream: {f: kinds[(s, f)] for s, f in kinds if s == stream} for stream in dict.fromkeys(
            s for s, _ in kinds)},
        "order": orders.metrics_entries(rows), "chaos": orders.chaos_entries(results, settings, runs),
        "evidence": orders.evidence_entries(settings, runs, rows, results),
        "datasets": datasets, **ablation_rows(results, settings),
        "calibration": calibration_metrics(results, settings, testbed),
        "testbed": testbed_summary(testbed, pretrain),
        "diagnostics": diagnostics_metrics(results, settings, diagnostics, datasets),
    })


def testbed_summary(testbed: dict | None, pretrain: dict | None) -> dict | None:
    """The testbed's prompt sensitivity per stream, without the per-template lists."""
    if not testbed:
        return None
    streams = {name: {k: v for k, v in s.items() if k != "per_template"} for name, s in testbed["streams"].items()}
    return {"templates": testbed["templates"], "n_templates": testbed["n_templates"],
            "v0_context_rms": testbed["v0_context_rms"], "logit_scale": testbed["logit_scale"], "streams": streams,
            "clean_zero_shot": (pretrain or {}).get("clean_zero_shot")}
