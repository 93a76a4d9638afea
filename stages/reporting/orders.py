"""The report's answer: per stream and order-dependent method, each kind's contrast against the i.i.d. stream and the
spread between orderings within each kind (`analysis.statistics.analyse_orders`), adjusted across every tested row
of the report, with verdicts; the pure-chaos SD from the last-bit replicates; the evidence per kind.

Kinds are the runs' `ordering_family` (`shuffle`, `dirichlet0.1`, `class_blocked`, ...), named in the report as the
field names the stream (`kind_label`).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from analysis import statistics as st
from dynaprompt.specs import Settings

from .results import InvalidResults, Results

GRID_GROUPS = ("main", "added")  # the orderings x seeds grid: the params' plan and the scheduled sweeps' orderings
CHAOS_GROUP = "chaos"  # cells repeated under a last-bit perturbation alone (replicate > 0)

FIELD_NAMES = {  # ordering kind -> how NOTE, RoTTA, StatA and Döbler et al. name the stream (issue 24)
    "shuffle": "i.i.d.", "class_blocked": "separate (class-blocked)", "cyclic": "recurring domains (cyclic)",
    "hardest_first": "hardest first", "easiest_first": "easiest first", "natural": "natural order",
}
MIXTURE_NAMES = {"shuffle": "mixed domains, i.i.d.", "dirichlet": "mixed + correlated"}  # Döbler et al.'s names


def grid_runs(results: Results) -> pd.DataFrame:
    """The runs of the orderings x seeds grid (replicate 0)."""
    runs = results.runs
    return runs[runs["group"].isin(GRID_GROUPS) & (runs["replicate"].fillna(0) == 0)]


def chaos_runs(results: Results) -> pd.DataFrame:
    return results.runs[results.runs["group"] == CHAOS_GROUP]


def dirichlet_delta(family: str, options: dict) -> float | None:
    """The concentration of a Dirichlet stream: its options', else the one its default family name spells."""
    if "delta" in options:
        return float(options["delta"])
    match = re.fullmatch(r"dirichlet([0-9.eE+-]+)", family)
    return float(match.group(1)) if match else None


def kind_label(kind: str, family: str, options: dict, mixture: bool) -> str:
    """A family named as the field names its stream: "i.i.d.", "Dirichlet δ=0.1", "separate (class-blocked)";
    on a mixture "mixed domains, i.i.d." and "mixed + correlated, Dirichlet δ=0.1". A family the params name
    otherwise than by its kind keeps its own name in brackets."""
    if kind == "dirichlet":
        delta = dirichlet_delta(family, options)
        name = "Dirichlet" if delta is None else f"Dirichlet δ={delta:g}"
        own = family != (f"dirichlet{delta:g}" if delta is not None else kind)
    else:
        name, own = FIELD_NAMES.get(kind, kind), family != kind
    if mixture and kind in MIXTURE_NAMES:
        name = MIXTURE_NAMES[kind] if kind == "shuffle" else f"{MIXTURE_NAMES[kind]}, {name}"
    return f"{name} [{family}]" if own else name


def kind_table(results: Results, settings: Settings, runs: pd.DataFrame) -> dict:
    """(stream, family) -> {kind, label, label_correlation, orderings}: every kind of the grid, its name and how
    correlated its labels are (the mean over its orderings of the fraction of consecutive same-label pairs)."""
    options = {}
    for row in results.orderings.itertuples(index=False):
        options.setdefault((row.dataset, row.family), dict(row.options or {}))
    out = {}
    for stream in results.order("dataset", runs):
        here = runs[runs["dataset"] == stream]
        rank = {o: i for i, o in enumerate(results.order("ordering", here))}
        here = here.sort_values("ordering", key=lambda o: o.map(rank), kind="stable")  # plan order
        for family in kind_order(here["ordering_family"], settings.report.reference_kind):
            rows = here[here["ordering_family"] == family]
            out[(stream, family)] = kind_entry(rows, family, options.get((stream, family), {}),
                                               stream in settings.mixtures)
    return out


def kind_entry(rows: pd.DataFrame, family: str, options: dict, mixture: bool) -> dict:
    """One kind of one stream: its ordering kind, field name, label correlation and orderings."""
    kind = str(rows["ordering_kind"].iloc[0])
    by_ordering = rows.groupby("ordering")["label_correlation"].first()
    return {"kind": kind, "label": kind_label(kind, family, options, mixture),
            "label_correlation": float(by_ordering.mean()) if by_ordering.notna().any() else None,
            "orderings": int(rows["ordering"].nunique())}


def analysis_input(rows: pd.DataFrame) -> pd.DataFrame:
    """Runs as `order_analysis` reads them: kind (the family), ordering, seed (the view seed), accuracy, replicate."""
    return pd.DataFrame({"kind": rows["ordering_family"].astype(str), "ordering": rows["ordering"].astype(str),
                         "seed": rows["view_seed"].astype(int), "accuracy": rows["accuracy"].astype(float),
                         "replicate": rows["replicate"].fillna(0).astype(int)})


def kind_order(families, reference: str) -> list:
    """The reference kind first, the others in the order given (the plan's)."""
    families = list(dict.fromkeys(families))
    return ([reference] if reference in families else []) + [f for f in families if f != reference]


def analyse_pair(rows: pd.DataFrame, settings: Settings, label: str) -> pd.DataFrame:
    """`analyse_orders` on one (stream, method)'s grid. Without the reference kind on this stream, each kind alone:
    its within-kind spread, no contrast."""
    config = settings.report
    options = st.AnalysisOptions(confidence=config.confidence, resamples=config.permutations, seed=config.seed,
                                 power=config.power, seed_reaches=settings.run.last_bit)
    frame = analysis_input(rows)
    try:
        if config.reference_kind in set(frame["kind"]):
            return st.analyse_orders(frame, reference_kind=config.reference_kind,
                                     margin=config.equivalence_margin, options=options)
        return pd.concat([st.analyse_orders(part, reference_kind=kind, margin=config.equivalence_margin,
                                            options=options).assign(reference=None)
                          for kind, part in frame.groupby("kind", sort=False)], ignore_index=True)
    except ValueError as error:  # an incomplete grid, two runs of one cell: results the model cannot read
        raise InvalidResults(f"{label}: {error}") from None


def order_rows(results: Results, settings: Settings, runs: pd.DataFrame, kinds: dict) -> pd.DataFrame:
    """Every tested row of the report: per stream and order-dependent method, one "kind" row per kind other than
    the reference and one "ordering" row per kind; p adjusted across all of them (`report.adjustment`), then the
    verdicts at the adjusted p and the smallest detectable effect at the corrected threshold."""
    frames = []
    for stream in results.order("dataset", runs):
        here = runs[runs["dataset"] == stream]
        order = [family for s, family in kinds if s == stream]  # the reference first, then plan order
        for method in results.order("method", here):
            rows = here[here["method"] == method]
            if rows["order_independent"].all():
                continue  # the same records reordered: every contrast is exactly 0, nothing to test
            frame = analyse_pair(rows, settings, f"{stream}/{method}").assign(stream=stream, method=method)
            frames.append(frame.assign(_k=frame["kind"].map(order.index), _t=frame["term"] == "ordering")
                          .sort_values(["_k", "_t"]).drop(columns=["_k", "_t"]))
    if not frames:
        return pd.DataFrame(columns=[*st.ROW_COLUMNS, "stream", "method", "label", "p_adjusted", "n"])
    rows = pd.concat(frames, ignore_index=True)
    rows["label"] = [kinds[(s, k)]["label"] for s, k in zip(rows["stream"], rows["kind"])]
    rows["n"] = runs_behind(rows)
    return adjusted(rows, settings)


def runs_behind(rows: pd.DataFrame) -> pd.Series:
    """The runs behind each row: its kind's orderings x seeds, plus the reference kind's for a contrast."""
    orderings = rows[rows["term"] == "ordering"].set_index(["stream", "method", "kind"])["n_orderings"]
    reference = [orderings.get((stream, method, ref), 0) if term == "kind" else 0
                 for stream, method, ref, term in zip(rows["stream"], rows["method"], rows["reference"], rows["term"])]
    return (rows["n_orderings"] + np.array(reference, dtype=int)) * rows["n_seeds"]


def adjusted(rows: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """p adjusted across the report's rows; verdicts and smallest detectable effects after the adjustment."""
    config = settings.report
    alpha = 1 - config.confidence
    rows["p_adjusted"] = st.adjust(rows["p_value"], config.adjustment)
    n_tests = int(np.isfinite(rows["p_adjusted"]).sum())
    rows["threshold"] = st.row_thresholds(rows["p_value"], config.adjustment, alpha)
    rows["mde"] = st.min_detectable(rows, rows["threshold"], config.power)
    named = rows.assign(kind=rows["label"])  # the verdict names the kind as the field does
    rows["could_pass"] = st.could_pass(rows["p_value"], rows["min_p"], config.adjustment, alpha)
    rows["verdict"] = st.verdicts(named, rows["p_adjusted"], alpha=alpha, margin=config.equivalence_margin,
                                  n_tests=n_tests, passable=rows["could_pass"])
    return rows


def row_key(row) -> str:
    """A row's key in metrics.json: stream/method/term/kind."""
    return f"{row['stream']}/{row['method']}/{row['term']}/{row['kind']}"


def metrics_entries(rows: pd.DataFrame) -> dict:
    """metrics.json's `order`: one entry per tested row, keyed stream/method/term/kind (`dvc metrics show` lists
    mappings, not lists)."""
    out = {}
    for row in rows.to_dict("records"):
        out[row_key(row)] = {
            "stream": row["stream"], "method": row["method"], "term": row["term"], "kind": row["kind"],
            "label": row["label"], "estimate": row["estimate"], "ci_low": row["ci_low"], "ci_high": row["ci_high"],
            "p": row["p_value"], "p_adjusted": row["p_adjusted"], "verdict": row["verdict"], "n": int(row["n"]),
            "n_orderings": int(row["n_orderings"]), "n_seeds": int(row["n_seeds"]), "detectable": row["mde"],
            "sd_residual": row["sd_residual"], "test": row["test"], "interval": row["interval"],
            "note": row["note"] or None}
    return out


def chaos_entries(results: Results, settings: Settings, runs: pd.DataFrame) -> list[dict]:
    """Per (stream, order-dependent method) with replicated cells and per kind: the pure-chaos SD with its interval
    and whether the kind's orderings differ more than its replicates do (`analysis.statistics.chaos_sd`)."""
    chaos = chaos_runs(results)
    out = []
    for (stream, method), extra in chaos.groupby(["dataset", "method"], sort=False):
        base = runs[(runs["dataset"] == stream) & (runs["method"] == method)]
        if base.empty or base["order_independent"].all():
            continue
        try:
            table = st.chaos_sd(analysis_input(pd.concat([base, extra])), confidence=settings.report.confidence)
        except ValueError as error:
            raise InvalidResults(f"{stream}/{method} (chaos replicates): {error}") from None
        out += [{"stream": stream, "method": method, **row} for row in table.to_dict("records")]
    return out


def evidence_entries(settings: Settings, runs: pd.DataFrame, rows: pd.DataFrame, results: Results) -> list[dict]:
    """Per (stream, order-dependent method, kind): the orderings so far, the half-width of the kind's mean interval
    (Student-t over its per-ordering means) as the orderings accumulate, and the width of its within-kind SD's
    interval, against the schedule's targets (the stopping rule of `tasks.evidence`)."""
    schedule, confidence = settings.sweep.schedule, settings.report.confidence
    out = []
    for row in rows[rows["term"] == "ordering"].to_dict("records"):
        mine = runs[(runs["dataset"] == row["stream"]) & (runs["method"] == row["method"])
                    & (runs["ordering_family"] == row["kind"])]
        means = mine.groupby("ordering")["accuracy"].mean()
        means = means.loc[[o for o in results.order("ordering", mine) if o in means.index]]
        half = st.t_interval(means.to_numpy(), confidence)["half_width"]
        width = row["ci_high"] - row["ci_low"] if row["n_seeds"] > 1 else None
        met = bool(half <= schedule.target_half_width and (width is None or width <= schedule.target_sd_order_width))
        out.append({"stream": row["stream"], "method": row["method"], "kind": row["kind"], "label": row["label"],
                    "n_orderings": int(row["n_orderings"]), "n_seeds": int(row["n_seeds"]), "half_width": half,
                    "target": schedule.target_half_width, "sd_order_ci_width": width,
                    "order_target": schedule.target_sd_order_width, "met": met,
                    "by_count": st.half_width_by_count(means.to_numpy(), confidence)})
    return out
