"""reports/metrics.json: every number of the report, computed from the results with analysis.statistics."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import statistics as st
from dynaprompt.specs import Settings

from .results import Results

DEFINITIONS = {
    "grid": "each order-dependent method runs every ordering under every augmentation seed (views.view_seed: "
            "the random crops, flips and AugMix of every sample's views); a cell is one (ordering, seed) run. "
            "Order-independent methods run once per seed and are reordered, so their orderings cannot differ",
    "mean": "mean accuracy over the cells of the grid (balanced: the mean of the per-ordering means)",
    "ci95": "Student-t interval of that mean over the per-ordering accuracies averaged over seeds, on "
            "n_orderings - 1 degrees of freedom; flagged too_few_orderings below report.min_orderings",
    "std": "sample standard deviation (ddof=1) of the per-ordering accuracies averaged over seeds",
    "between_sd": "the same SD across orderings: what the order changes, the augmentation noise averaged out",
    "within_se": "binomial standard error sqrt(p(1-p)/n) of one run's accuracy over its n samples, averaged "
                 "over the cells: what drawing other samples would change",
    "cochran_q": "Cochran's Q test (Cochran 1950, Biometrika 37:256) on the samples x orderings matrix of "
                 "per-sample correctness at the params' own view seed: does the probability of a correct answer "
                 "depend on the ordering? n = samples, df = orderings - 1",
    "cochran_q_seeds": "Cochran's Q on the samples x seeds matrix at one fixed ordering (the method's first): the "
                       "same question for a perturbation that is not an ordering, as a reference",
    "variance_components": "run accuracy y[o, s] = mu + a_o + b_s + e_os with a ~ N(0, sd_order^2), b ~ N(0, "
                           "sd_seed^2), e ~ N(0, sd_residual^2), crossed random effects fitted by REML "
                           "(statsmodels MixedLM, one group, a variance component per factor); 95% intervals: "
                           "percentile parametric bootstrap (report.variance_bootstrap refits of grids drawn from "
                           "the fit); n = orderings x seeds cells",
    "order_test": "permutation F test of ordering within seeds (Anderson & ter Braak 2003, J. Stat. Comput. Simul. "
                  "73:85): each seed's column of accuracies permuted across orderings, F = MS(ordering) / "
                  "MS(residual) of the two-way ANOVA; 'order > chance' when p < 1 - confidence, i.e. the "
                  "orderings' effect is consistent across seeds beyond the ordering-by-seed scatter; not run where "
                  "the seed does not change the records ('seed has no effect: no control')",
    "tail_accuracy": "expected tail accuracy: the mean accuracy of the worst 10% of the grid's runs (at least "
                     "one), as OGA (cfuchs2023/OGA) reports it: what a user should expect in a bad case",
    "vs_reference": "accuracy minus the reference's (zero-shot or TPT) at the same seed, paired by sample within "
                    "each cell, averaged over the grid; ci_orderings: Student-t over the per-ordering differences "
                    "(averaged over seeds; n = orderings); ci_samples: percentile bootstrap over samples of the "
                    "per-sample mean difference (n = samples, resampled with replacement, paired across cells)",
    "collapse": "an order-dependent run collapses when its last block falls more than collapse_margin below "
                "zero-shot on the same samples, or below its own first block (both measured against zero-shot on "
                "the block's samples; not on class-blocked or cyclic orderings, whose first and last blocks hold "
                "different classes or domains, where a gain differs by itself); "
                "order-independent methods carry no state and cannot collapse",
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
    runs = results.runs
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


def method_summary(results: Results, settings: Settings, dataset: str, method: str, rows: pd.DataFrame) -> dict:
    """The order-sensitivity numbers of one method on one dataset, over its ordering x seed grid."""
    config = settings.report
    rows = grid_rows(rows, results)
    cells, accuracy = list(rows["cell"]), rows["accuracy"].astype(float).to_numpy()
    by_ordering = rows.groupby("ordering", sort=False)["accuracy"].mean()
    orderings, seeds = list(by_ordering.index), sorted(set(rows["view_seed"].astype(int)))
    interval = st.t_interval(by_ordering.to_numpy(), config.confidence)
    correct, sample_ids = correct_matrix(results, dataset, method, cells)
    base = int(settings.views.view_seed)
    at_base = [i for i, s in enumerate(rows["view_seed"]) if int(s) == base] or list(range(len(cells)))
    first = rows["ordering"].iloc[0]
    at_first = [i for i, o in enumerate(rows["ordering"]) if o == first]
    worst = cells[int(np.argmin(accuracy))] if len(set(accuracy)) > 1 else None  # no worst cell when all tie
    order_independent = bool(rows["order_independent"].all())
    out = {
        "method_kind": str(rows["method_kind"].iloc[0]), "order_independent": order_independent,
        "n_orderings": len(orderings), "orderings": orderings, "n_seeds": len(seeds), "seeds": seeds,
        "n_cells": len(cells), "n_samples": int(rows["n"].iloc[0]),
        "mean": float(accuracy.mean()), "ci95": [interval["low"], interval["high"]],
        "half_width": interval["half_width"], "too_few_orderings": len(orderings) < config.min_orderings,
        "std": float(by_ordering.std()) if len(orderings) > 1 else None, "min": float(accuracy.min()),
        "max": float(accuracy.max()), "worst_cell": worst, "tail_accuracy": st.tail_accuracy(accuracy),
        **st.order_spread(by_ordering.to_numpy(), [int(rows["n"].iloc[0])] * len(orderings)),
        "cochran_q": st.cochran_q(correct[:, at_base]), "cochran_q_seeds": st.cochran_q(correct[:, at_first]),
        "per_cell": {c: {"accuracy": float(a), "ordering": str(o), "view_seed": int(s), "ordering_kind": str(k)}
                     for c, a, o, s, k in zip(cells, accuracy, rows["ordering"], rows["view_seed"],
                                              rows["ordering_kind"])},
    }
    groups = list(rows["ordering"])
    for name, reference in (("vs_zero_shot", "zero_shot"), ("vs_tpt", "tpt")):
        ref = reference_method(results, dataset, reference)
        matrix = None if ref in (None, method) else reference_correct(results, dataset, ref, sample_ids,
                                                                     list(rows["view_seed"]))
        out[name] = None if matrix is None else {"reference": ref, **st.paired_difference(
            correct, matrix, config.confidence, config.bootstrap_samples, config.seed, groups=groups)}
    return out


def reference_method(results: Results, dataset: str, kind: str) -> str | None:
    """The method of `kind` to compare against on `dataset`: the one named like the kind, else the first."""
    runs = results.runs
    candidates = list(dict.fromkeys(runs.loc[(runs["dataset"] == dataset) & (runs["method_kind"] == kind), "method"]))
    return None if not candidates else (kind if kind in candidates else candidates[0])


def block_zero_shot(results: Results, dataset: str, records: pd.DataFrame, block_size: int) -> list[float] | None:
    """Zero-shot's accuracy on the samples of each block of `records` (matched by sample_id)."""
    zs = reference_method(results, dataset, "zero_shot")
    if zs is None:
        return None
    first = results.runs[(results.runs["dataset"] == dataset) & (results.runs["method"] == zs)].iloc[0]
    truth = results.records_of(dataset, zs, first.cell).set_index("sample_id")["correct"]
    matched = truth.loc[records["sample_id"]].to_numpy(dtype=float)
    return [float(matched[i:i + block_size].mean()) for i in range(0, len(matched), block_size)]


def collapse_check(results: Results, row, margin: float) -> dict:
    """First and last block against zero-shot on the same samples; collapsed when either falls past `margin`.

    Order-independent methods carry no state, so their block-to-block changes are the classes' own; on a
    class-blocked ordering the first and last blocks hold different classes, and on a cyclic one different
    domains (where the gain over zero-shot differs by itself), so only zero-shot on the same samples is a fair
    reference there.
    """
    records = results.records_of(row.dataset, row.method, row.cell)
    blocks = list(row.block_accuracy)
    zs = block_zero_shot(results, row.dataset, records, int(row.block_size)) or [math.nan] * len(blocks)
    gain_first, gain_last = blocks[0] - zs[0], blocks[-1] - zs[-1]
    stateful = not row.order_independent
    below_zero_shot = stateful and bool(gain_last < -margin)
    below_first = (stateful and row.ordering_kind not in ("class_blocked", "cyclic")
                   and bool(gain_last < gain_first - margin))
    return {"first_block": blocks[0], "last_block": blocks[-1], "zero_shot_first_block": zs[0],
            "zero_shot_last_block": zs[-1], "below_zero_shot": below_zero_shot, "below_first_block": below_first,
            "collapsed": below_zero_shot or below_first}


def wins_losses(results: Results, row) -> tuple[int, int] | None:
    """Samples the run gets right and zero-shot wrong, and the reverse."""
    zs = reference_method(results, row.dataset, "zero_shot")
    if zs is None or zs == row.method:
        return None
    first = results.runs[(results.runs["dataset"] == row.dataset) & (results.runs["method"] == zs)].iloc[0]
    truth = results.records_of(row.dataset, zs, first.cell).set_index("sample_id")["correct"]
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
    """datasets -> methods -> summary, for the runs of one group (or several)."""
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
    runs = pd.concat([runs, results.runs[(results.runs["dataset"] == config.dataset)
                                         & results.runs["method"].isin([config.base, *config.references])
                                         & results.runs["ordering"].isin(config.orderings)
                                         & (results.runs["view_seed"] == settings.views.view_seed)]]
                     ).drop_duplicates("run")
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


def evidence_rows(results: Results, settings: Settings, metrics: dict, components: dict) -> list[dict]:
    """Per order-dependent (dataset, method): orderings so far, the half-width of the mean's interval and the width
    of SD(order)'s interval against the schedule's targets."""
    target = settings.sweep.schedule.target_half_width
    order_target = settings.sweep.schedule.target_sd_order_width
    rows = []
    for dataset, methods in metrics.items():
        for method, m in methods.items():
            if m["order_independent"]:
                continue
            by_ordering = {}
            for entry in m["per_cell"].values():  # the per-ordering accuracies, averaged over seeds
                by_ordering.setdefault(entry["ordering"], []).append(entry["accuracy"])
            by_count = st.half_width_by_count([float(np.mean(by_ordering[o])) for o in m["orderings"]],
                                              settings.report.confidence)
            component = components.get((dataset, method), {})
            low, high = component.get("sd_order_ci") or (None, None)
            width = None if low is None or high is None else high - low
            met = bool(m["half_width"] <= target) and (width is not None and width <= order_target)
            rows.append({"dataset": dataset, "method": method, "n_orderings": m["n_orderings"],
                         "n_seeds": m["n_seeds"], "half_width": m["half_width"], "target": target,
                         "sd_order_ci_width": width, "order_target": order_target, "met": met,
                         "by_count": by_count})
    return rows


def variance_component_rows(results: Results, settings: Settings, metrics: dict) -> list[dict]:
    """metrics.json's `variance_components`: per (dataset, method), SD(order), SD(seed), SD(residual) with their
    intervals, the order-effect test, its verdict and the tail accuracy (analysis.statistics.variance_components;
    the pairs are fitted in `report.workers` processes)."""
    config = settings.report
    jobs = []
    for dataset, methods in metrics.items():
        for method, m in methods.items():
            cells = list(m["per_cell"].values())
            jobs.append(((dataset, method), m["order_independent"], [c["accuracy"] for c in cells],
                         [c["ordering"] for c in cells], [c["view_seed"] for c in cells]))
    options = {"confidence": config.confidence, "bootstrap": config.variance_bootstrap, "seed": config.seed}
    if config.workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            fitted = list(pool.map(fit_components, [(job, options) for job in jobs]))
    else:
        fitted = [fit_components((job, options)) for job in jobs]
    return [{"dataset": key[0], "method": key[1], **values} for (key, *_), values in zip(jobs, fitted)]


def fit_components(job_and_options) -> dict:
    """One pair's variance components (a top-level function: it runs in a worker process)."""
    (_, order_independent, accuracies, orderings, seeds), options = job_and_options
    return st.variance_components(accuracies, orderings, seeds, order_independent=order_independent, **options)


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


def compute_metrics(results: Results, settings: Settings, testbed: dict | None, pretrain: dict | None) -> dict:
    """metrics.json: definitions once at the top, then each part."""
    main = results.runs[results.runs["group"].isin(["main", "added"])]
    datasets = dataset_metrics(results, settings, main)
    components = variance_component_rows(results, settings, datasets)
    by_pair = {(r["dataset"], r["method"]): r for r in components}
    return plain({
        "definitions": DEFINITIONS, "confidence": settings.report.confidence,
        "collapse_margin": settings.report.collapse_margin, "runs": int(len(results.runs)),
        "datasets": datasets, "variance_components": components, **ablation_rows(results, settings),
        "calibration": calibration_metrics(results, settings, testbed),
        "testbed": testbed_summary(testbed, pretrain),
        "evidence": evidence_rows(results, settings, datasets, by_pair),
    })


def testbed_summary(testbed: dict | None, pretrain: dict | None) -> dict | None:
    """The testbed's prompt sensitivity per stream, without the per-template lists."""
    if not testbed:
        return None
    streams = {name: {k: v for k, v in s.items() if k != "per_template"} for name, s in testbed["streams"].items()}
    return {"templates": testbed["templates"], "n_templates": testbed["n_templates"],
            "v0_context_rms": testbed["v0_context_rms"], "logit_scale": testbed["logit_scale"], "streams": streams,
            "clean_zero_shot": (pretrain or {}).get("clean_zero_shot")}
