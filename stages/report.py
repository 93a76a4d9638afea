"""report: check the sweep's results, then write reports/metrics.json, the figures, the plot data, the tables and the
report.

Inputs: results/ (plan, registry, summaries and records of every run), reports/testbed.json, reports/pretrain.json,
reports/diagnostics.json. The validation report (reports/validation/results.json) is written first; incomplete or
inconsistent results stop the stage after it, naming each bad run as dataset/method/ordering. Outputs:
reports/metrics.json (`dvc metrics show`), reports/plots/*.csv (`dvc plots show|diff`), reports/figures/*.png,
reports/tables/*.csv (the per-run tables), reports/report.md and report.html (self-contained), and the report as
artifacts of the sweep's MLflow parent run. The report leads with the answer: per stream, each method on each kind
of stream (stages/reporting/answer.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dynaprompt.results import ResultsLayout
from dynaprompt.specs import Settings

from .common import fail, settings, write_json
from .reporting import figures
from .reporting.answer import (
    TABLES,
    answer_section,
    appendix,
    chaos_section,
    csv_tables,
    diagnostics_section,
    order_frame,
    statistics_section,
)
from .reporting.document import Document, figure, interval, pct, signed, table, to_html
from .reporting.metrics import compute_metrics
from .reporting.orders import grid_runs
from .reporting.results import InvalidResults, Results, load_results, validate_results, validation_message

TITLE = "Test-time adaptation under different kinds of test stream"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- sections


def lead(doc: Document, results: Results, config: Settings) -> None:
    """The title and what the numbers rest on, in one paragraph."""
    runs = results.runs
    groups = runs["group"].value_counts().to_dict()
    doc.add(f"# {TITLE}",
            f"Does a method hold up when the test stream changes? {len(runs)} runs "
            f"({', '.join(f'{v} {k}' for k, v in groups.items())}) of `{config.model.arch}` "
            f"(weights `{config.model.pretrained}`). Every stream is run as several kinds of stream, each kind as "
            "several seeded orderings, each ordering under every view seed; the statistics are at the end.")


def setup_section(doc: Document, results: Results, config: Settings, metrics: dict) -> None:
    runs = grid_runs(results)
    datasets = [{"stream": d, "samples": int(runs.loc[runs["dataset"] == d, "n"].iloc[0]),
                 "kinds": len(metrics["kinds"].get(d, {})), "orderings": int(runs.loc[runs["dataset"] == d,
                                                                                     "ordering"].nunique()),
                 "runs": int((runs["dataset"] == d).sum())} for d in results.order("dataset", runs)]
    methods = [{"method": m, "kind": runs.loc[runs["method"] == m, "method_kind"].iloc[0],
                "order-dependent": "no" if runs.loc[runs["method"] == m, "order_independent"].all() else "yes"}
               for m in results.order("method", runs)]
    devices = results.runs.fillna({"device": "unknown", "device_name": "unknown"}).groupby(
        ["device", "device_name"]).size()
    doc.add("## Setup",
            f"Accuracy per block of {config.run.block_size} samples along each stream. Computed on: "
            + "; ".join(f"{d} ({name}): {n} runs" for (d, name), n in devices.items())
            + " (a GPU's records can differ from a CPU's in the last bits)."
            + ("" if config.validate.known_split_sizes else
               " **The known test-split sizes were not checked** (`validate.known_split_sizes: false`, as for a "
               "rehearsal on synthetic trees): these streams are not the paper's test sets."),
            table(datasets), table(methods))


def testbed_section(doc: Document, metrics: dict) -> None:
    testbed, calibration = metrics.get("testbed"), metrics.get("calibration")
    if testbed:
        rows = [{"stream": name, "v0 zero-shot %": f"{s['v0']:.1f}" if s.get("v0") is not None else "–",
                 "template std (points)": f"{s['template_std']:.2f}",
                 "best − worst (points)": f"{s['template_range']:.1f}", "best template": s["best_template"]}
                for name, s in testbed["streams"].items()]
        doc.add("## The testbed: does the model respond to prompts?",
                f"Zero-shot accuracy of the original view under each of {testbed['n_templates']} templates "
                f"(`{testbed['templates']}`); clean zero-shot {pct(testbed.get('clean_zero_shot'))}%. The tuned "
                f"prompt v0 has context coordinates of RMS {testbed['v0_context_rms']:.4f}; logit scale "
                f"{testbed['logit_scale']:.1f}.", table(rows))
    if calibration:
        rows = [{"method": r["method"], "lr": f"{r['lr']:g}", "accuracy %": pct(r["accuracy"]),
                 f"Δ vs {calibration['reference']}": signed(r["gain"]), "first block %": pct(r["first_block"]),
                 "last block %": pct(r["last_block"])} for r in calibration["rows"]]
        verdict = ("params.yaml uses it" if calibration["params_lr_is_best"]
                   else f"params.yaml uses {calibration['params_lr']:g}: not the calibrated value")
        ratio = "" if calibration["lr_over_rms"] is None else (
            f" The step relative to the prompt, lr / RMS(v0), is {calibration['lr_over_rms']:.2f}.")
        doc.add("### Calibrating the learning rate",
                f"On `{calibration['dataset']}` ({calibration['ordering']}, a stream the report does not sweep), "
                f"{calibration['chosen_by']}'s gain over {calibration['reference']} "
                f"({pct(calibration['reference_accuracy'])}%) peaks at lr {calibration['best_lr']:g} "
                f"(a tie goes to the smaller lr); "
                f"{verdict}.{ratio} With fresh AdamW state, one step moves each context coordinate by about lr.",
                figure("calibration.png"), table(rows))


def differences_section(doc: Document, metrics: dict, config: Settings) -> None:
    rows = []
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            for name, label in (("vs_zero_shot", "zero-shot"), ("vs_tpt", "TPT")):
                d = m.get(name)
                if d:
                    wins = (f"{m['wins_vs_zero_shot']:.1f} / {m['losses_vs_zero_shot']:.1f}"
                            if label == "zero-shot" and "wins_vs_zero_shot" in m else "")
                    rows.append({"stream": dataset, "method": method, "against": label,
                                 "Δ points": signed(d["mean_diff"]), "orderings x seeds": d["n_runs"],
                                 "95% CI over orderings (t)": interval(d["ci_orderings"]),
                                 "95% CI over samples (bootstrap)": interval(d["ci_samples"]),
                                 "wins / losses per run": wins})
    doc.add("## Against zero-shot and TPT",
            f"On the i.i.d. kind ({config.report.reference_kind}): the accuracy difference in points, paired by sample "
            "within each run against the reference at the same seed, averaged over the kind's runs. Two 95% "
            "intervals: Student-t over the per-ordering differences (what another ordering would give), and a "
            "percentile bootstrap over samples (what other samples would give). Wins / losses: samples a run gets "
            "right and zero-shot wrong, and the reverse, averaged over all its runs (per run: "
            "`reports/tables/wins_losses.csv`).", table(rows))


def stream_section(doc: Document, metrics: dict) -> None:
    """The per-kind block curves and the memory, with the cyclic streams' memory per method."""
    cyclic = {}
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            losses = [e["cyclic_loss"] for e in m["per_cell"].values() if "cyclic_loss" in e]
            counted = sum(c["appended_before_return"] for c in losses)
            if counted:
                lost = sum(c["deleted_before_return"] for c in losses)
                cyclic[(dataset, method)] = {"stream": dataset, "method": method, "cyclic runs": len(losses),
                                             "entries appended before their domain returned": counted,
                                             "deleted before it returned": f"{lost} ({lost / counted:.2f})"}
    doc.add("## Along the stream", figure("accuracy_per_block.png"), figure("buffer_dynamics.png"))
    if cyclic:
        doc.add("### Cyclic streams: is a domain's memory still there when it returns?",
                "Entries (prompts, cached features) appended during a domain's block, and how many were deleted "
                "before that domain's next block, summed over each method's cyclic runs (per run: "
                "`reports/tables/cyclic_memory.csv`).", table(list(cyclic.values())))


def ablation_section(doc: Document, metrics: dict, config: Settings) -> None:
    if not metrics["ablation"]:
        return
    rows = [{"variant": r["variant"], "method": r["method"], "orderings": r["n_orderings"],
             "mean %": pct(r["mean"]), "SD %": pct(r["std"], 2),
             "95% CI": f"[{pct(r['ci95'][0])}, {pct(r['ci95'][1])}]"} for r in metrics["ablation"]]
    n = metrics["ablation"][0]["n_samples"]
    doc.add("## Ablations of DynaPrompt",
            f"On `{config.ablations.dataset}` ({n} samples per stream) over {', '.join(config.ablations.orderings)}: "
            "the selection criteria (entropy only, probability difference only, both), no appending, the buffer "
            "size M, and margins on the paper rule (select m when H[m] < H[v0] − tau_h and D[m] > D[v0] + tau_d; "
            "0 is the paper's rule).", table(rows), figure("ablation_buffer_size.png"),
            figure("ablation_margins.png"))


def collapse_counts(metrics: dict) -> list[tuple[str, str, int, int]]:
    """(dataset, method, collapsed runs, runs) for every method with a collapsed run."""
    return [(d, m, len(v["collapsed_cells"]), len(v["per_cell"])) for d, ms in metrics["datasets"].items()
            for m, v in ms.items() if v.get("collapsed_cells")]


def collapse_section(doc: Document, metrics: dict, block_size: int) -> None:
    counts = [{"stream": d, "method": m, "runs collapsed": f"{k} of {n}",
               "kinds": ", ".join(dict.fromkeys(metrics["kinds"][d][metrics["datasets"][d][m]["per_cell"][c]["kind"]]
                                                ["label"] for c in metrics["datasets"][d][m]["collapsed_cells"]))}
              for d, m, k, n in collapse_counts(metrics)]
    doc.add("## What collapsed",
            f"Order-dependent runs whose last block falls more than {metrics['collapse_margin']:g} below zero-shot "
            "on the same samples, or below their own first block (gains over zero-shot compared). One block's "
            f"accuracy ({block_size} samples) has a binomial SE of up to {50 / block_size ** 0.5:.1f} points, so a "
            f"drop of {100 * metrics['collapse_margin']:g} points in one run of many can be chance: a method collapses "
            "where most of its runs do. Per method (per run: `reports/tables/runs_collapse.csv`):",
            table(counts) if counts else "No run collapsed.")


def evidence_section(doc: Document, metrics: dict, config: Settings) -> None:
    rows = metrics["evidence"]
    schedule = config.sweep.schedule
    widest = sorted((r for r in rows if not r["met"]), key=lambda r: -(r["half_width"] or 0))[:10]
    doc.add("## Evidence: how tight is each estimate?",
            f"Per order-dependent method and kind: the half-width of the 95% interval of the kind's mean, and the "
            f"width of the interval of its within-kind SD, against the schedule's targets "
            f"(±{100 * schedule.target_half_width:g} points; {100 * schedule.target_sd_order_width:g} points). "
            f"{sum(r['met'] for r in rows)} of {len(rows)} (stream, method, kind) estimates meet both. Scheduled "
            "sweeps (`python -m flows.sweep --add-orderings K`) add orderings until every target is met. The "
            f"{len(widest)} widest still open (all: `reports/tables/evidence.csv`):", figure("evidence.png"),
            table([{"stream": r["stream"], "method": r["method"], "kind": r["label"], "orderings": r["n_orderings"],
                    "half-width of the mean (points)": pct(r["half_width"], 2),
                    "width of SD(order)'s interval (points)": pct(r["sd_order_ci_width"], 2)} for r in widest]))


# ---------------------------------------------------------------- figures and plot data


def chaos_spreads(rows: pd.DataFrame, chaos: list[dict]) -> list[dict]:
    """Per (stream, method, kind) with replicates: the SD between the kind's orderings at one view seed, what the
    chaos test weighs against the replicates' SD (a point: the test, not an interval, judges it)."""
    labels = {(r["stream"], r["method"], r["kind"]): r["label"] for r in rows.to_dict("records")}
    return [{"stream": c["stream"], "method": c["method"], "label": labels.get((c["stream"], c["method"], c["kind"]),
                                                                               c["kind"]),
             "estimate": c["between_sd"], "ci_low": c["between_sd"], "ci_high": c["between_sd"]}
            for c in chaos if (c["stream"], c["method"], c["kind"]) in labels]


def draw(results: Results, metrics: dict, config: Settings, reports_dir: Path) -> None:
    out, plots, dpi = reports_dir / "figures", reports_dir / "plots", config.report.dpi
    plots.mkdir(parents=True, exist_ok=True)
    runs = grid_runs(results)
    datasets = results.order("dataset", runs)[: config.report.max_panels]
    panels = [(d, family, block_title(d, kind)) for d in datasets for family, kind in metrics["kinds"][d].items()]
    figures.accuracy_per_block(runs, panels, results.order("method", runs), out / "accuracy_per_block.png", dpi)
    rows = order_frame(metrics)
    contrasts = rows[rows["term"] == "kind"].to_dict("records")
    figures.kind_contrasts(contrasts, config.report.equivalence_margin, 1 - config.report.confidence,
                           out / "kind_contrasts.png", dpi)
    figures.chaos_against_order(chaos_spreads(rows, metrics["chaos"]), metrics["chaos"],
                                out / "chaos_against_order.png", dpi)
    figures.buffer_dynamics(buffer_panels(results, runs, config.report.max_panels), out / "buffer_dynamics.png", dpi)
    calibration = metrics.get("calibration") or {"rows": [], "reference": "zero_shot", "v0_context_rms": None}
    figures.calibration_curve(calibration["rows"], calibration["reference"], calibration["v0_context_rms"],
                              out / "calibration.png", dpi)
    figures.buffer_size_curve(metrics["buffer_size"], out / "ablation_buffer_size.png", dpi)
    figures.margins_heatmap(metrics["margins"], out / "ablation_margins.png", dpi)
    figures.evidence_growth(metrics["evidence"], config.sweep.schedule.target_half_width, out / "evidence.png", dpi)
    block_rows = [{"dataset": r.dataset, "method": r.method, "kind": r.ordering_family, "ordering": r.ordering,
                   "view_seed": r.view_seed, "samples_seen": (k + 1) * int(r.block_size), "accuracy": a}
                  for r in runs.itertuples(index=False) for k, a in enumerate(r.block_accuracy)]
    pd.DataFrame(block_rows).to_csv(plots / "accuracy_per_block.csv", index=False)
    pd.DataFrame([{"row": f"{r['stream']}/{r['method']}/{r['kind']}", "contrast": r["estimate"],
                   "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p_adjusted": r["p_adjusted"]}
                  for r in contrasts], columns=["row", "contrast", "ci_low", "ci_high", "p_adjusted"]).to_csv(
        plots / "kind_contrasts.csv", index=False)
    pd.DataFrame(calibration["rows"]).to_csv(plots / "calibration.csv", index=False)
    pd.DataFrame([{k: v for k, v in r.items() if k != "ci95"} for r in metrics["buffer_size"]]).to_csv(
        plots / "buffer_size.csv", index=False)


def block_title(stream: str, kind: dict) -> str:
    correlation = kind["label_correlation"]
    return f"{stream}\n{kind['label']}" + ("" if correlation is None else f" (label corr. {correlation:.2f})")


MEMORY_LABELS = {  # method kind -> what its records' buffer_size counts, what its `selected` lists, how often
    "dynaprompt": {"unit": "prompts in buffer", "selected": "prompt id (selected)", "count": "times selected"},
    "boostadapter": {"unit": "cache entries\n(historical + negative)", "selected": "boosting view (view index)",
                     "count": "times a boosting view"},
    "tda": {"unit": "cache entries"}, "tca": {"unit": "cache entries"}, "dpe": {"unit": "cache entries"},
    "dmn": {"unit": "memory slots"}, "ecalp": {"unit": "graph nodes"},
}
OTHER_MEMORY = {"unit": "entries in memory", "selected": "entry id (selected)", "count": "times selected"}


def buffer_panels(results: Results, main: pd.DataFrame, limit: int) -> list[dict]:
    """Runs with a memory for the buffer figure: one per method (its first cyclic run, else its first), in the
    report's method order, then further runs (cyclic first) up to `limit`; each labelled by its kind's memory."""
    has_memory = [r for r in main.itertuples(index=False)
                  if results.records_of(r.dataset, r.method, r.cell)["appended"].map(len).any()]
    has_memory.sort(key=lambda r: r.ordering_kind != "cyclic")  # stable: plan order within each group
    rank = {m: i for i, m in enumerate(results.order("method", main))}
    first = {}
    for r in has_memory:
        first.setdefault(r.method, r)
    chosen = sorted(first.values(), key=lambda r: rank.get(r.method, len(rank)))
    taken = {id(r) for r in chosen}
    chosen += [r for r in has_memory if id(r) not in taken][: max(limit - len(chosen), 0)]
    return [{"title": r.run, "records": results.records_of(r.dataset, r.method, r.cell),
             **MEMORY_LABELS.get(r.method_kind, OTHER_MEMORY)} for r in chosen]


# ---------------------------------------------------------------- the stage


def build_report(config: Settings) -> dict:
    """Validate the results, then write metrics.json, figures, plot data, tables and report.md/.html; returns the
    metrics.

    Raises InvalidResults after writing the validation report when the results are incomplete or inconsistent.
    """
    layout = ResultsLayout(config.path("results"))
    reports_dir = config.path("reports")
    results = load_results(layout, config)
    validation = validate_results(results, layout)
    target = config.path("validation") / "results.json"
    write_json(target, validation)  # first: the report of what is wrong must survive the failure
    if not validation["success"]:
        raise InvalidResults(validation_message(validation, target))
    metrics = compute_metrics(results, config, read_json(reports_dir / "testbed.json"),
                              read_json(reports_dir / "pretrain.json"), read_json(reports_dir / "diagnostics.json"))
    write_json(reports_dir / "metrics.json", metrics)
    draw(results, metrics, config, reports_dir)
    tables = csv_tables(metrics)
    (reports_dir / TABLES).mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_csv(reports_dir / TABLES / f"{name}.csv", index=False)
    doc = Document()
    lead(doc, results, config)
    answer_section(doc, metrics, config)
    chaos_section(doc, metrics)
    diagnostics_section(doc, metrics)
    stream_section(doc, metrics)
    setup_section(doc, results, config, metrics)
    testbed_section(doc, metrics)
    differences_section(doc, metrics, config)
    ablation_section(doc, metrics, config)
    collapse_section(doc, metrics, config.run.block_size)
    evidence_section(doc, metrics, config)
    statistics_section(doc, metrics, config)
    appendix(doc, metrics, tables)
    (reports_dir / "report.md").write_text(doc.markdown())
    (reports_dir / "report.html").write_text(to_html(doc.markdown(), reports_dir, TITLE))
    return metrics


def attach_to_sweep(config: Settings) -> None:
    """The report as artifacts of the latest sweep's MLflow parent run (when MLflow and that run exist)."""
    from tasks.tracking import attach_report, mlflow_store

    record = ResultsLayout(config.path("results")).read_sweep_record()
    db, _ = mlflow_store(config)  # the workspace's database, also from a `dvc exp run --temp` copy
    if not record or not db.is_file():
        return

    reports = config.path("reports")
    attach_report(db, config.mlflow.experiment, record["mlflow_run_id"],
                  [reports / "report.html", reports / "report.md", reports / "metrics.json"])


def main() -> None:
    config = settings()
    try:
        metrics = build_report(config)
    except InvalidResults as error:
        fail(str(error))
    attach_to_sweep(config)
    flagged = [f"{d}/{m} ({k}/{n})" for d, m, k, n in collapse_counts(metrics)]
    print(f"report: {metrics['runs']} runs, {metrics['tested_rows']} tested rows ({metrics['adjustment']}) -> "
          f"{config.path('reports') / 'report.html'}; collapsed (runs of the grid): {', '.join(flagged) or 'none'}")


if __name__ == "__main__":
    main()
