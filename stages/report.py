"""report: check the sweep's results, then write reports/metrics.json, the figures, the plot data and the report.

Inputs: results/ (plan, registry, summaries and records of every run), reports/testbed.json, reports/pretrain.json.
The validation report (reports/validation/results.json) is written first; incomplete or inconsistent results stop
the stage after it, naming each bad run as dataset/method/ordering. Outputs: reports/metrics.json (`dvc metrics
show`), reports/plots/*.csv (`dvc plots show|diff`), reports/figures/*.png, reports/report.md and report.html
(self-contained), and the report as artifacts of the sweep's MLflow parent run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dynaprompt.results import ResultsLayout
from dynaprompt.specs import Settings

from .common import fail, settings, write_json
from .reporting import figures
from .reporting.document import Document, figure, interval, pct, signed, table, to_html
from .reporting.metrics import compute_metrics
from .reporting.results import InvalidResults, Results, load_results, validate_results, validation_message

TITLE = "Test-time prompt tuning under different sample orders"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- sections


def setup_section(doc: Document, results: Results, config: Settings, metrics: dict) -> None:
    runs = results.runs
    main = runs[runs["group"].isin(["main", "added"])]
    datasets = [{"dataset": d, "samples per stream": int(main.loc[main["dataset"] == d, "n"].iloc[0]),
                 "orderings": int(main.loc[main["dataset"] == d, "ordering"].nunique()),
                 "runs": int((main["dataset"] == d).sum())} for d in results.order("dataset", main)]
    methods = [{"method": m, "kind": main.loc[main["method"] == m, "method_kind"].iloc[0],
                "order-dependent": "no" if main.loc[main["method"] == m, "order_independent"].all() else "yes"}
               for m in results.order("method", main)]
    kinds = main.drop_duplicates("ordering").groupby("ordering_kind")["ordering"].apply(lambda o: ", ".join(o))
    groups = runs["group"].value_counts().to_dict()
    devices = runs.fillna({"device": "unknown", "device_name": "unknown"}).groupby(["device", "device_name"]).size()
    doc.add(f"# {TITLE}", "## Setup",
            f"{len(runs)} runs ({', '.join(f'{v} {k}' for k, v in groups.items())}). Model `{config.model.arch}`, "
            f"weights `{config.model.pretrained}`. Accuracy per block of {config.run.block_size} samples along "
            f"each stream. Orderings: " + "; ".join(f"{k}: {v}" for k, v in kinds.items()) + ". Computed on: "
            + "; ".join(f"{d} ({name}): {n} runs" for (d, name), n in devices.items())
            + " (a GPU's records can differ from a CPU's in the last bits).",
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


def headline_section(doc: Document, metrics: dict, config: Settings) -> None:
    rows, spread_rows = [], []
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            flag = " (too few orderings)" if m["too_few_orderings"] else ""
            rows.append({"dataset": dataset, "method": method, "orderings": m["n_orderings"],
                         "mean %": pct(m["mean"]), "95% CI (t)": f"[{pct(m['ci95'][0])}, {pct(m['ci95'][1])}]" + flag,
                         "SD %": pct(m["std"], 2), "worst ordering": (f"{m['worst_ordering']} ({pct(m['min'])})"
                                                                      if m["worst_ordering"] else "all tie")})
            q = m["cochran_q"]
            spread_rows.append({"dataset": dataset, "method": method, "SD between orderings": pct(m["between_sd"], 2),
                                "SE within a run": pct(m["within_se"], 2),
                                "ratio": "–" if m["ratio"] is None else f"{m['ratio']:.2f}",
                                "Cochran's Q": "–" if q["q"] is None else f"{q['q']:.1f} (df {q['df']})",
                                "p": "–" if q["p_value"] is None else f"{q['p_value']:.3g}",
                                "samples that change": q["discordant_samples"]})
    doc.add("## Accuracy across orderings",
            f"Mean accuracy over the orderings each method ran, with a {100 * config.report.confidence:.0f}% "
            f"Student-t interval on n−1 degrees of freedom (flagged below {config.report.min_orderings} "
            "orderings). Order-independent methods compute once and are reordered, so their spread is zero.",
            table(rows), "## Does the order matter, beyond chance?",
            "The spread the order causes (SD of accuracy between orderings) next to the spread sampling alone "
            "causes (binomial SE of one run's accuracy), and Cochran's Q test on the same samples' correctness "
            "across orderings (Cochran 1950): a small p says the order changes which samples are right.",
            figure("order_vs_chance.png"), table(spread_rows))


def differences_section(doc: Document, metrics: dict) -> None:
    rows = []
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            for name, label in (("vs_zero_shot", "zero-shot"), ("vs_tpt", "TPT")):
                d = m.get(name)
                if d:
                    rows.append({"dataset": dataset, "method": method, "against": label,
                                 "Δ points": signed(d["mean_diff"]), "orderings": d["n_orderings"],
                                 "95% CI over orderings (t)": interval(d["ci_orderings"]),
                                 "samples": d["n_samples"],
                                 "95% CI over samples (bootstrap)": interval(d["ci_samples"])})
    doc.add("## Against zero-shot and TPT",
            "Accuracy difference in points, paired by sample within each ordering, averaged over orderings. Two "
            "95% intervals: Student-t over the per-ordering differences (what another ordering would give), and "
            "a percentile bootstrap over samples (what other samples would give).", table(rows))


def figures_section(doc: Document) -> None:
    doc.add("## Along the stream", figure("accuracy_per_block.png"), figure("accuracy_by_ordering_kind.png"),
            figure("buffer_dynamics.png"))


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


def collapse_section(doc: Document, metrics: dict) -> None:
    rows, cyclic, wins = [], [], []
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            for ordering, e in m["per_ordering"].items():
                if e["collapsed"]:
                    rows.append({"run": f"{dataset}/{method}/{ordering}", "first block %": pct(e["first_block"]),
                                 "last block %": pct(e["last_block"]),
                                 "zero-shot on its last block's samples %": pct(e["zero_shot_last_block"])})
                if "cyclic_loss" in e:
                    c = e["cyclic_loss"]
                    cyclic.append({"run": f"{dataset}/{method}/{ordering}",
                                   "appended (domain returns)": c["appended_before_return"],
                                   "deleted before it returned": c["deleted_before_return"],
                                   "fraction": "–" if c["fraction"] is None else f"{c['fraction']:.2f}"})
            if "wins_vs_zero_shot" in m:
                wins.append({"dataset": dataset, "method": method, "wins": f"{m['wins_vs_zero_shot']:.1f}",
                             "losses": f"{m['losses_vs_zero_shot']:.1f}",
                             "net": f"{m['wins_vs_zero_shot'] - m['losses_vs_zero_shot']:+.1f}"})
    doc.add("## What collapsed",
            f"Order-dependent runs whose last block falls more than {metrics['collapse_margin']:g} below zero-shot "
            "on the same samples, or below their own first block (gains over zero-shot compared).",
            table(rows) if rows else "No run collapsed.")
    if cyclic:
        doc.add("## Cyclic streams: is a domain's memory still there when it returns?",
                "Entries (prompts, cached features) appended during a domain's block, and how many were deleted "
                "before that domain's next block.", table(cyclic))
    doc.add("## Per-sample wins and losses against zero-shot",
            "Samples a method gets right and zero-shot wrong (wins) and the reverse, per stream, averaged over "
            "orderings.", table(wins))


def evidence_section(doc: Document, metrics: dict, config: Settings) -> None:
    rows = [{"dataset": r["dataset"], "method": r["method"], "orderings": r["n_orderings"],
             "half-width (points)": pct(r["half_width"], 2), "target met": "yes" if r["met"] else "no"}
            for r in metrics["evidence"]]
    doc.add("## Evidence: how tight is each estimate?",
            f"For each order-dependent method: the orderings its mean rests on (params and scheduled sweeps), the "
            f"half-width of its 95% interval, and whether it is below the schedule's target "
            f"(±{100 * config.sweep.schedule.target_half_width:g} points). Scheduled sweeps "
            "(`python -m flows.sweep --add-orderings K`) add orderings until every target is met.",
            figure("evidence.png"), table(rows))


def statistics_section(doc: Document, metrics: dict) -> None:
    doc.add("## The statistics", "\n".join(f"- **{k}**: {v}" for k, v in metrics["definitions"].items()))


# ---------------------------------------------------------------- figures and plot data


def draw(results: Results, metrics: dict, config: Settings, reports_dir: Path) -> None:
    out, plots, dpi = reports_dir / "figures", reports_dir / "plots", config.report.dpi
    plots.mkdir(parents=True, exist_ok=True)
    main = results.runs[results.runs["group"].isin(["main", "added"])]
    datasets = results.order("dataset", main)[: config.report.max_panels]
    methods = results.order("method", main)
    figures.accuracy_per_block(main, datasets, methods, out / "accuracy_per_block.png", dpi)
    figures.accuracy_by_ordering_kind(main, datasets, methods, set(main.loc[main["order_independent"], "method"]),
                                      out / "accuracy_by_ordering_kind.png", dpi)
    spread = [{"dataset": d, "method": m, "between_sd": v["between_sd"], "within_se": v["within_se"],
               "p_value": v["cochran_q"]["p_value"]}
              for d, ms in metrics["datasets"].items() for m, v in ms.items() if not v["order_independent"]]
    figures.order_vs_chance(spread, out / "order_vs_chance.png", dpi)
    figures.buffer_dynamics(buffer_panels(results, main, config.report.max_panels), out / "buffer_dynamics.png", dpi)
    calibration = metrics.get("calibration") or {"rows": [], "reference": "zero_shot", "v0_context_rms": None}
    figures.calibration_curve(calibration["rows"], calibration["reference"], calibration["v0_context_rms"],
                              out / "calibration.png", dpi)
    figures.buffer_size_curve(metrics["buffer_size"], out / "ablation_buffer_size.png", dpi)
    figures.margins_heatmap(metrics["margins"], out / "ablation_margins.png", dpi)
    figures.evidence_growth(metrics["evidence"], config.sweep.schedule.target_half_width, out / "evidence.png", dpi)
    block_rows = [{"dataset": r.dataset, "method": r.method, "ordering": r.ordering,
                   "samples_seen": (k + 1) * int(r.block_size), "accuracy": a}
                  for r in main.itertuples(index=False) for k, a in enumerate(r.block_accuracy)]
    pd.DataFrame(block_rows).to_csv(plots / "accuracy_per_block.csv", index=False)
    pd.DataFrame([{**{k: v for k, v in r.items()}, "run": f"{r['dataset']}/{r['method']}"} for r in spread]).to_csv(
        plots / "ordering_spread.csv", index=False)
    pd.DataFrame(calibration["rows"]).to_csv(plots / "calibration.csv", index=False)
    pd.DataFrame([{k: v for k, v in r.items() if k != "ci95"} for r in metrics["buffer_size"]]).to_csv(
        plots / "buffer_size.csv", index=False)


def buffer_panels(results: Results, main: pd.DataFrame, limit: int) -> list[dict]:
    """Runs with a memory for the buffer figure: cyclic ones first, then one ordering per dataset and method."""
    has_memory = [r for r in main.itertuples(index=False)
                  if results.records_of(r.dataset, r.method, r.ordering)["appended"].map(len).any()]
    ordered = [r for r in has_memory if r.ordering_kind == "cyclic"]
    seen = {(r.dataset, r.method) for r in ordered}
    for r in has_memory:
        if (r.dataset, r.method) not in seen:
            ordered.append(r)
            seen.add((r.dataset, r.method))
    return [{"title": r.run, "records": results.records_of(r.dataset, r.method, r.ordering),
             "unit": "prompts in buffer" if r.method_kind == "dynaprompt" else "entries in memory"}
            for r in ordered[:limit]]


# ---------------------------------------------------------------- the stage


def build_report(config: Settings) -> dict:
    """Validate the results, then write metrics.json, figures, plot data and report.md/.html; returns the metrics.

    Raises InvalidResults after writing the validation report when the results are incomplete or inconsistent.
    """
    layout = ResultsLayout(config.path("results"))
    reports_dir = config.path("reports")
    results = load_results(layout)
    validation = validate_results(results, layout)
    target = config.path("validation") / "results.json"
    write_json(target, validation)  # first: the report of what is wrong must survive the failure
    if not validation["success"]:
        raise InvalidResults(validation_message(validation, target))
    metrics = compute_metrics(results, config, read_json(reports_dir / "testbed.json"),
                              read_json(reports_dir / "pretrain.json"))
    write_json(reports_dir / "metrics.json", metrics)
    draw(results, metrics, config, reports_dir)
    doc = Document()
    setup_section(doc, results, config, metrics)
    testbed_section(doc, metrics)
    headline_section(doc, metrics, config)
    differences_section(doc, metrics)
    figures_section(doc)
    ablation_section(doc, metrics, config)
    collapse_section(doc, metrics)
    evidence_section(doc, metrics, config)
    statistics_section(doc, metrics)
    (reports_dir / "report.md").write_text(doc.markdown())
    (reports_dir / "report.html").write_text(to_html(doc.markdown(), reports_dir, TITLE))
    return metrics


def attach_to_sweep(config: Settings) -> None:
    """The report as artifacts of the latest sweep's MLflow parent run (when MLflow and that run exist)."""
    record = ResultsLayout(config.path("results")).read_sweep_record()
    db = config.base_dir / config.mlflow.db
    if not record or not db.is_file():
        return
    from tasks.tracking import attach_report

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
    flagged = [f"{d}/{m}" for d, ms in metrics["datasets"].items() for m, v in ms.items() if v["collapsed"]]
    print(f"report: {metrics['runs']} runs -> {config.path('reports') / 'report.html'}; "
          f"collapsed: {', '.join(flagged) or 'none'}")


if __name__ == "__main__":
    main()
