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


def headline_section(doc: Document, metrics: dict, config: Settings) -> None:
    rows = []
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            flag = " (too few orderings)" if m["too_few_orderings"] else ""
            rows.append({"dataset": dataset, "method": method, "orderings": m["n_orderings"], "seeds": m["n_seeds"],
                         "mean %": pct(m["mean"]), "95% CI (t)": f"[{pct(m['ci95'][0])}, {pct(m['ci95'][1])}]" + flag,
                         "SD between orderings %": pct(m["std"], 2), "tail accuracy %": pct(m["tail_accuracy"]),
                         "worst run": (f"{m['worst_cell']} ({pct(m['min'])})" if m["worst_cell"] else "all tie")})
    doc.add("## Accuracy across orderings and seeds",
            "Each order-dependent method ran every ordering under every augmentation seed (`sweep.view_seeds`); "
            f"the mean is over that grid, with a {100 * config.report.confidence:.0f}% Student-t interval over the "
            f"orderings (each averaged over seeds; n−1 degrees of freedom, flagged below "
            f"{config.report.min_orderings} orderings). Tail accuracy: the mean of the worst 10% of the grid's "
            "runs. Order-independent methods compute once per seed and are reordered, so their orderings tie.",
            table(rows))


def order_vs_chance_section(doc: Document, metrics: dict, config: Settings) -> None:
    """The report's robustness question first: does the order matter more than a perturbation that is not one?"""
    doc.add("## Does the order matter, beyond chance?",
            "For a method whose state evolves chaotically, any perturbation changes which samples are right. So "
            "an ordering's effect is weighed against a perturbation that is not an ordering: the augmentation "
            "seed. Per stream, the SD of run accuracy due to the ordering, to the seed and to neither (their "
            "interaction and noise), from a crossed random-effects model (REML; 95% intervals by parametric "
            "bootstrap), and a permutation test of the ordering within seeds (Anderson & ter Braak 2003): "
            "'order > chance' says the orderings' effect is consistent across seeds beyond the scatter; 'not "
            "distinguishable from chance' says the order moves accuracy no more than any perturbation does; 'seed "
            "has no effect: no control' marks a method that reads only the original view (its records are the "
            "same under every seed), for which the seed is no perturbation and the grid cannot tell order from "
            "chance: its SD(order) is the plain SD over orderings.")
    by_stream = {}
    for row in metrics["variance_components"]:
        by_stream.setdefault(row["dataset"], []).append(row)
    for dataset, rows in by_stream.items():
        n = rows[0]
        doc.add(f"### {dataset} ({n['n_orderings']} orderings x {n['n_seeds']} seeds)", table([{
            "method": r["method"], "SD(order) % [95% CI]": sd_cell(r["sd_order"], r["sd_order_ci"]),
            "SD(seed) % [95% CI]": sd_cell(r["sd_seed"], r["sd_seed_ci"]),
            "SD(residual) %": pct(r["sd_residual"], 2), "p (order within seeds)": p_cell(r["p_value"]),
            "verdict": r["verdict"], "mean %": pct(r["mean"]), "tail accuracy %": pct(r["tail_accuracy"]),
        } for r in rows]))
    spread_rows = []
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            q, qs = m["cochran_q"], m["cochran_q_seeds"]
            spread_rows.append({"dataset": dataset, "method": method,
                                "SD between orderings": pct(m["between_sd"], 2),
                                "SE within a run": pct(m["within_se"], 2),
                                "Cochran's Q, orderings at one seed": q_cell(q),
                                "Cochran's Q, seeds at one ordering": q_cell(qs)})
    doc.add(figure("order_vs_seed.png"),
            "Per sample, as a reference: Cochran's Q (Cochran 1950) across the orderings at the params' own seed, "
            "next to Cochran's Q across the seeds at one ordering. When both are tiny, the per-sample test cannot "
            "tell the order from any perturbation: read the variance components above. The SD between orderings "
            "(seed-averaged) stands next to the binomial SE of one run (sampling alone).",
            figure("order_vs_chance.png"), table(spread_rows))


def sd_cell(value, interval) -> str:
    low, high = interval or (None, None)
    if value is None:
        return "–"
    return f"{pct(value, 2)} [{pct(low, 2)}, {pct(high, 2)}]"


def p_cell(p) -> str:
    return "–" if p is None else f"{p:.3g}"


def q_cell(q: dict) -> str:
    if q["q"] is None:
        return "–"
    return f"Q {q['q']:.1f} (df {q['df']}), p {q['p_value']:.3g}, {q['discordant_samples']} samples change"


def differences_section(doc: Document, metrics: dict) -> None:
    rows = []
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            for name, label in (("vs_zero_shot", "zero-shot"), ("vs_tpt", "TPT")):
                d = m.get(name)
                if d:
                    rows.append({"dataset": dataset, "method": method, "against": label,
                                 "Δ points": signed(d["mean_diff"]), "orderings": d["n_orderings"],
                                 "runs": d["n_runs"],
                                 "95% CI over orderings (t)": interval(d["ci_orderings"]),
                                 "samples": d["n_samples"],
                                 "95% CI over samples (bootstrap)": interval(d["ci_samples"])})
    doc.add("## Against zero-shot and TPT",
            "Accuracy difference in points, paired by sample within each run against the reference at the same "
            "seed, averaged over the grid. Two 95% intervals: Student-t over the per-ordering differences (each "
            "averaged over seeds: what another ordering would give), and a percentile bootstrap over samples (what "
            "other samples would give).", table(rows))


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


def collapse_counts(metrics: dict) -> list[tuple[str, str, int, int]]:
    """(dataset, method, collapsed runs, runs) for every method with a collapsed run."""
    return [(d, m, len(v["collapsed_cells"]), len(v["per_cell"])) for d, ms in metrics["datasets"].items()
            for m, v in ms.items() if v.get("collapsed_cells")]


def collapse_section(doc: Document, metrics: dict, block_size: int) -> None:
    rows, cyclic, wins = [], [], []
    for dataset, methods in metrics["datasets"].items():
        for method, m in methods.items():
            for cell, e in m["per_cell"].items():
                if e["collapsed"]:
                    rows.append({"run": f"{dataset}/{method}/{cell}", "first block %": pct(e["first_block"]),
                                 "last block %": pct(e["last_block"]),
                                 "zero-shot on its last block's samples %": pct(e["zero_shot_last_block"])})
                if "cyclic_loss" in e:
                    c = e["cyclic_loss"]
                    cyclic.append({"run": f"{dataset}/{method}/{cell}",
                                   "appended (domain returns)": c["appended_before_return"],
                                   "deleted before it returned": c["deleted_before_return"],
                                   "fraction": "–" if c["fraction"] is None else f"{c['fraction']:.2f}"})
            if "wins_vs_zero_shot" in m:
                wins.append({"dataset": dataset, "method": method, "wins": f"{m['wins_vs_zero_shot']:.1f}",
                             "losses": f"{m['losses_vs_zero_shot']:.1f}",
                             "net": f"{m['wins_vs_zero_shot'] - m['losses_vs_zero_shot']:+.1f}"})
    counts = [{"dataset": d, "method": m, "runs collapsed": f"{k} of {n}"} for d, m, k, n in collapse_counts(metrics)]
    doc.add("## What collapsed",
            f"Order-dependent runs whose last block falls more than {metrics['collapse_margin']:g} below zero-shot "
            "on the same samples, or below their own first block (gains over zero-shot compared). One block's "
            f"accuracy ({block_size} samples) has a binomial SE of up to {50 / block_size ** 0.5:.1f} points, so a "
            f"drop of {100 * metrics['collapse_margin']:g} points in one run of many can be chance: a method collapses "
            "where most of its runs do. Per method, then per run:",
            *([table(counts), table(rows)] if rows else ["No run collapsed."]))
    if cyclic:
        doc.add("## Cyclic streams: is a domain's memory still there when it returns?",
                "Entries (prompts, cached features) appended during a domain's block, and how many were deleted "
                "before that domain's next block.", table(cyclic))
    doc.add("## Per-sample wins and losses against zero-shot",
            "Samples a method gets right and zero-shot wrong (wins) and the reverse, per stream, averaged over "
            "the runs of its grid.", table(wins))


def evidence_section(doc: Document, metrics: dict, config: Settings) -> None:
    rows = [{"dataset": r["dataset"], "method": r["method"], "orderings": r["n_orderings"], "seeds": r["n_seeds"],
             "half-width of the mean (points)": pct(r["half_width"], 2),
             "width of SD(order)'s interval (points)": pct(r["sd_order_ci_width"], 2),
             "targets met": "yes" if r["met"] else "no"} for r in metrics["evidence"]]
    schedule = config.sweep.schedule
    doc.add("## Evidence: how tight is each estimate?",
            f"For each order-dependent method: the orderings its mean rests on (params and scheduled sweeps, each "
            f"under every seed), the half-width of its 95% interval, and the width of the interval of SD(order), "
            f"against the schedule's targets (±{100 * schedule.target_half_width:g} points; "
            f"{100 * schedule.target_sd_order_width:g} points). Scheduled sweeps "
            "(`python -m flows.sweep --add-orderings K`) add (ordering, seed) cells until every target is met.",
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
    figures.order_vs_seed([r for r in metrics["variance_components"] if r["sd_order"] is not None],
                          out / "order_vs_seed.png", dpi)
    figures.buffer_dynamics(buffer_panels(results, main, config.report.max_panels), out / "buffer_dynamics.png", dpi)
    calibration = metrics.get("calibration") or {"rows": [], "reference": "zero_shot", "v0_context_rms": None}
    figures.calibration_curve(calibration["rows"], calibration["reference"], calibration["v0_context_rms"],
                              out / "calibration.png", dpi)
    figures.buffer_size_curve(metrics["buffer_size"], out / "ablation_buffer_size.png", dpi)
    figures.margins_heatmap(metrics["margins"], out / "ablation_margins.png", dpi)
    figures.evidence_growth(metrics["evidence"], config.sweep.schedule.target_half_width, out / "evidence.png", dpi)
    block_rows = [{"dataset": r.dataset, "method": r.method, "ordering": r.ordering, "view_seed": r.view_seed,
                   "samples_seen": (k + 1) * int(r.block_size), "accuracy": a}
                  for r in main.itertuples(index=False) for k, a in enumerate(r.block_accuracy)]
    pd.DataFrame(block_rows).to_csv(plots / "accuracy_per_block.csv", index=False)
    pd.DataFrame([{**{k: v for k, v in r.items()}, "run": f"{r['dataset']}/{r['method']}"} for r in spread]).to_csv(
        plots / "ordering_spread.csv", index=False)
    pd.DataFrame(calibration["rows"]).to_csv(plots / "calibration.csv", index=False)
    pd.DataFrame([{k: v for k, v in r.items() if k != "ci95"} for r in metrics["buffer_size"]]).to_csv(
        plots / "buffer_size.csv", index=False)


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
    """Validate the results, then write metrics.json, figures, plot data and report.md/.html; returns the metrics.

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
                              read_json(reports_dir / "pretrain.json"))
    write_json(reports_dir / "metrics.json", metrics)
    draw(results, metrics, config, reports_dir)
    doc = Document()
    setup_section(doc, results, config, metrics)
    testbed_section(doc, metrics)
    headline_section(doc, metrics, config)
    order_vs_chance_section(doc, metrics, config)
    differences_section(doc, metrics)
    figures_section(doc)
    ablation_section(doc, metrics, config)
    collapse_section(doc, metrics, config.run.block_size)
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
    flagged = [f"{d}/{m} ({k}/{n})" for d, m, k, n in collapse_counts(metrics)]
    print(f"report: {metrics['runs']} runs -> {config.path('reports') / 'report.html'}; "
          f"collapsed (runs of the grid): {', '.join(flagged) or 'none'}")


if __name__ == "__main__":
    main()
