"""The report's answer, written from metrics.json: per stream, one table of method x kind (accuracy, the contrast
against the i.i.d. stream [CI], the verdicts after adjustment), the forest plot, orderings against chaos, the
findings with their diagnostics, the statistics behind every figure, and the per-run tables as an appendix and CSV
files under reports/tables/."""
from __future__ import annotations

import math

import pandas as pd

from dynaprompt.specs import Settings

from .document import Document, figure, interval, pct, signed, table, unknown

TABLES = "tables"  # reports/tables/<name>.csv: the per-run and per-row tables the report names


def order_frame(metrics: dict) -> pd.DataFrame:
    """metrics.json's tested rows as a table (stream, method, term, kind, label, estimate, ..., verdict)."""
    columns = ["stream", "method", "term", "kind", "label", "estimate", "ci_low", "ci_high", "p", "p_adjusted",
               "verdict", "n", "n_orderings", "n_seeds", "detectable", "note"]
    return pd.DataFrame(list(metrics["order"].values()), columns=columns)


def p_text(p) -> str:
    return "–" if unknown(p) else f"{p:.3g}"


def verdict_text(row: dict) -> str:
    """The verdict, with the smallest effect an underpowered row could detect."""
    if row["verdict"] != "underpowered":
        return row["verdict"]
    if unknown(row["detectable"]) or math.isinf(row["detectable"]):
        return "underpowered (too few orderings to pass the corrected threshold)"
    return f"underpowered (could detect {pct(row['detectable'])} points)"


def kind_columns(metrics: dict, stream: str) -> list[str]:
    """The stream's kinds, the reference first, as the plan lists them."""
    return list(metrics["kinds"].get(stream, {}))


def kinds_line(metrics: dict, stream: str) -> str:
    """Each kind of the stream by its field name, with its label correlation and orderings."""
    parts = []
    for family, kind in metrics["kinds"].get(stream, {}).items():
        correlation = kind["label_correlation"]
        rho = "" if correlation is None else f"label correlation {correlation:.2f}, "
        parts.append(f"**{kind['label']}** (`{family}`: {rho}{kind['orderings']} orderings)")
    return "Kinds: " + "; ".join(parts) + "."


def answer_cell(summary: dict, family: str, rows: dict) -> str:
    """One method on one kind: accuracy; the contrast [CI] and its verdict; the within-kind verdict."""
    kind = summary["per_kind"].get(family)
    if kind is None:
        return "–"
    parts = [f"**{pct(kind['accuracy'])}**"]
    contrast, spread = rows.get(("kind", family)), rows.get(("ordering", family))
    if contrast is not None:
        bounds = interval((contrast["ci_low"], contrast["ci_high"]))
        parts.append(f"{signed(contrast['estimate'])}{'' if bounds == '–' else ' ' + bounds}: {verdict_text(contrast)}")
    if spread is not None:
        parts.append(f"orderings: {verdict_text(spread)}")
    return "<br>".join(parts)


def answer_section(doc: Document, metrics: dict, config: Settings) -> None:
    """The answer, per stream: method x kind, then the forest plot."""
    report = config.report
    frame = order_frame(metrics)
    doc.add("## The answer: each method on each kind of stream",
            f"Per stream, a row per method and a column per kind of stream. Each cell: the accuracy (%, the mean over "
            f"the kind's orderings x {len(config.sweep.view_seeds or [0])} seeds); for an order-dependent method, "
            f"its difference from the i.i.d. kind ({report.reference_kind}) in points with its "
            f"{100 * report.confidence:.0f}% interval and verdict, then the verdict on the orderings within the "
            f"kind. Verdicts come after adjusting the p-values of all {metrics['tested_rows']} tested rows "
            f"({metrics['adjustment_method']}, `report.adjustment: {report.adjustment}`): \"<kind> costs X points "
            "[CI]\" (or gains), \"ordering matters within <kind>\", \"no larger than "
            f"{100 * report.equivalence_margin:.1f} points\" (equivalence at the report's declared margin, "
            "`report.equivalence_margin`), \"underpowered\" (the design's smallest p cannot pass the corrected "
            "threshold; the smallest effect it could detect with 80% power is given) or \"inconclusive\". "
            "Order-independent methods compute once per seed and are reordered: their kinds do not differ and are "
            "not tested. Both p-values of every row: Appendix A and `reports/tables/order_rows.csv`.")
    for stream, methods in metrics["datasets"].items():
        families = kind_columns(metrics, stream)
        labels = {f: metrics["kinds"][stream][f]["label"] for f in families}
        here = frame[frame["stream"] == stream]
        table_rows = []
        for method, summary in methods.items():
            rows = {(r["term"], r["kind"]): r for r in here[here["method"] == method].to_dict("records")}
            cells = {labels[f]: answer_cell(summary, f, rows) for f in families}
            note = "order-independent" if summary["order_independent"] else ""
            table_rows.append({"method": f"{method}<br>*{note}*" if note else method, **cells})
        samples = next(iter(methods.values()))["n_samples"]
        doc.add(f"### {stream} ({samples} samples per stream)", kinds_line(metrics, stream), table(table_rows))
    doc.add(figure("kind_contrasts.png"))


def chaos_section(doc: Document, metrics: dict) -> None:
    """The chaos SD per method next to its within-kind SDs, "chaotic" where they match."""
    frame = order_frame(metrics)
    spreads = frame[frame["term"] == "ordering"]
    chaos = {(c["stream"], c["method"], c["kind"]): c for c in metrics["chaos"]}
    lines = ["## Orderings against chaos",
             "A method whose state evolves chaotically answers differently after any perturbation. Cells repeated "
             "under a seeded perturbation at the last bit of the feature cache's precision alone (same ordering, "
             "same view seed; the size of difference another machine's kernels make) measure that pure chaos. "
             "Per method: the chaos SD with its 95% interval (chi-square, over the replicated cells), next to the "
             "SD between each kind's orderings at one view seed (pooled over the seeds); \"chaotic\" where they "
             "differ no more than replicates of one run do (F test of that variance against the chaos variance, "
             "alpha 0.05 unadjusted), \"beyond chaos\" where they differ more. The ordering's own effect, "
             "consistent across seeds, is the answer table's within-kind verdict.",
             figure("chaos_against_order.png")]
    if not metrics["chaos"]:
        lines.append("_This sweep has no last-bit replicates (plan group `chaos`): the chaos SD is not measured._")
    for stream in dict.fromkeys(spreads["stream"]):
        here = spreads[spreads["stream"] == stream]
        rows = []
        for method in dict.fromkeys(here["method"]):
            mine = here[here["method"] == method]
            first = next((chaos[(stream, method, k)] for k in mine["kind"] if (stream, method, k) in chaos), None)
            row = {"method": method, "chaos SD % [95% CI]": "–" if first is None else
                   f"{pct(first['chaos_sd'], 2)} [{pct(first['ci_low'], 2)}, {pct(first['ci_high'], 2)}] "
                   f"({first['n_cells']} cells)"}
            for r in mine.to_dict("records"):
                c = chaos.get((stream, method, r["kind"]))
                flag = "" if c is None or c["chaotic"] is None else ("; **chaotic**" if c["chaotic"] else
                                                                      "; beyond chaos")
                between = None if c is None else c.get("between_sd")
                row[f"SD between {r['label']} orderings %"] = f"{pct(between, 2)}{flag}"
            rows.append(row)
        lines += [f"### {stream}", table(rows)]
    doc.add(*lines)


def diagnostics_section(doc: Document, metrics: dict) -> None:
    """ECALP's and C-TPT's findings with their diagnostics, next to their accuracy."""
    found = metrics.get("diagnostics")
    head = "## Findings with their diagnostics"
    if not found:
        doc.add(head, "_No diagnostics (`reports/diagnostics.json`: run `dvc repro diagnostics`)._")
        return
    ecalp, ctpt = [], []
    for stream, entry in found["streams"].items():
        for method, d in entry["ecalp"].items():
            ecalp.append({"stream": stream, "method": method, "accuracy % (i.i.d.)": pct(d["accuracy"]),
                          "zero-shot %": pct(entry["zero_shot_accuracy"]),
                          "negative top-3 text edges": f"{d['negative_text_edge_share']:.2f} "
                                                       f"({d['negative_text_edges']} of {d['text_edges']})",
                          "heaviest edge not the zero-shot top-1": f"{d['heaviest_not_top1_share']:.2f} "
                                                                   f"({d['heaviest_not_top1']} of {d['n_nodes']})"})
        for method, d in entry["ctpt"].items():
            agreement = d["agreement_with_zero_shot"]
            ctpt.append({"stream": stream, "method": method, "accuracy %": pct(d["accuracy"]),
                         "TPT %": pct(entry["tpt_accuracy"]), "zero-shot %": pct(entry["zero_shot_accuracy"]),
                         "|λ∇ATFD| / |∇H| (median)": f"{d['gradient_ratio_median']:.2f}",
                         "step follows the dispersion": f"{d['follows_dispersion_share']:.2f}",
                         "agrees with zero-shot": "–" if agreement is None else f"{agreement:.2f}",
                         "samples": d["n_samples"]})
    doc.add(head,
            "**ECALP** weighs each image-text edge by the signed raw dot product raised to gamma = 10. Where a "
            "node's top-3 text edges include negative dot products, the even power can make the most negative one "
            "its heaviest edge, and the node seeds a class other than its zero-shot top-1: on such a stream ECALP "
            "propagates wrong labels (its authors' CLIP has image-text cosines of about 0.2-0.35, all positive). "
            "Shares over every sample of the stream (n = nodes):", table(ecalp),
            "**C-TPT** adds lambda x the dispersion of the class text features (ATFD) to TPT's entropy. At its "
            "first step from the initial prompt: the median ratio of the dispersion term's gradient to the "
            "entropy's, and the share of the step's coordinates that move as the dispersion term alone would "
            "move them (n = samples, a seeded subset of the stream); a large ratio and a high share say the step "
            "is the calibration term's, and a high agreement with zero-shot says the prompt barely moves the "
            "answers:", table(ctpt))


def statistics_section(doc: Document, metrics: dict, config: Settings) -> None:
    """The model, the interval methods, the adjustment and the n behind every figure, then every definition."""
    report, definitions = config.report, metrics["definitions"]
    doc.add("## Statistics", "\n".join([
        f"- **Model**: {definitions['model']}.",
        f"- **Intervals** ({100 * report.confidence:.0f}%): a kind's contrast, {definitions['kind_contrast']}; a "
        f"within-kind SD, {definitions['sd_order']}.",
        f"- **Adjustment**: {metrics['adjustment_method']} (`report.adjustment: {report.adjustment}`) across all "
        f"{metrics['tested_rows']} tested rows of the report (every stream, order-dependent method, kind contrast "
        f"and within-kind spread); verdicts read the adjusted p at alpha {1 - report.confidence:.2f}; the "
        f"equivalence margin is {100 * report.equivalence_margin:g} points (`report.equivalence_margin`).",
        f"- **n behind every figure**: {figure_counts(metrics, config)}"]),
            "### Every statistic", "\n".join(f"- **{k}**: {v}" for k, v in definitions.items()))


def figure_counts(metrics: dict, config: Settings) -> str:
    """What each figure's numbers rest on."""
    frame = order_frame(metrics)
    orderings = sorted({k["orderings"] for stream in metrics["kinds"].values() for k in stream.values()})
    samples = sorted({m["n_samples"] for methods in metrics["datasets"].values() for m in methods.values()})
    runs = f"{int(frame['n'].min())}-{int(frame['n'].max())}" if len(frame) else "no"
    cells = sum({(c["stream"], c["method"]): c["n_cells"] for c in metrics["chaos"]}.values())
    return (f"a kind has {'/'.join(map(str, orderings)) or 'no'} orderings, each under "
            f"{len(config.sweep.view_seeds or [0])} view seeds, on streams of {'/'.join(map(str, samples))} samples. "
            f"The answer's cells and the forest plot: a contrast rests on its kind's and the i.i.d. kind's runs, a "
            f"within-kind SD on its kind's ({runs} runs per tested row, `runs` in Appendix A). The per-block curves: "
            f"each kind's orderings x seeds, in blocks of {config.run.block_size} samples. The chaos SDs: {cells} "
            "replicated cells in all, per method pooled over its kinds. The evidence figure: each kind's orderings "
            "as they accumulate.")


def csv_tables(metrics: dict) -> dict[str, pd.DataFrame]:
    """The tables the report moves out of its body: reports/tables/<name>.csv."""
    per_kind, collapsed, cyclic, wins = [], [], [], []
    for stream, methods in metrics["datasets"].items():
        for method, m in methods.items():
            for family, k in m["per_kind"].items():
                per_kind.append({"stream": stream, "method": method, "kind": family,
                                 "order_independent": m["order_independent"],
                                 "label": metrics["kinds"][stream][family]["label"],
                                 "label_correlation": metrics["kinds"][stream][family]["label_correlation"],
                                 "accuracy": k["accuracy"], "n_orderings": k["n_orderings"], "n_seeds": k["n_seeds"],
                                 "tail": k["tail"]["value"], "tail_runs": k["tail"]["label"]})
            for cell, e in m["per_cell"].items():
                run = {"stream": stream, "method": method, "cell": cell, "kind": e["kind"]}
                collapsed.append({**run, **{k: e[k] for k in ("first_block", "last_block", "zero_shot_first_block",
                                                               "zero_shot_last_block", "collapsed")}})
                if "cyclic_loss" in e:
                    cyclic.append({**run, **{k: v for k, v in e["cyclic_loss"].items()}})
                if "wins_vs_zero_shot" in e:
                    wins.append({**run, "wins": e["wins_vs_zero_shot"], "losses": e["losses_vs_zero_shot"]})
    return {"order_rows": order_frame(metrics), "kind_accuracy": pd.DataFrame(per_kind),
            "chaos": pd.DataFrame(metrics["chaos"]),
            "evidence": pd.DataFrame([{k: v for k, v in r.items() if k != "by_count"} for r in metrics["evidence"]]),
            "runs_collapse": pd.DataFrame(collapsed), "cyclic_memory": pd.DataFrame(cyclic),
            "wins_losses": pd.DataFrame(wins)}


def appendix(doc: Document, metrics: dict, tables: dict[str, pd.DataFrame]) -> None:
    """Every tested row with both p-values; accuracy and tail per kind; per method, what the per-run CSVs hold."""
    rows = [{"stream": r["stream"], "method": r["method"], "term": r["term"], "kind": r["label"],
             "estimate (points)": signed(r["estimate"]) if r["term"] == "kind" else pct(r["estimate"], 2),
             "95% CI": interval((r["ci_low"], r["ci_high"])) if r["term"] == "kind" else
             f"[{pct(r['ci_low'], 2)}, {pct(r['ci_high'], 2)}]",
             "p": p_text(r["p"]), "p adjusted": p_text(r["p_adjusted"]), "verdict": verdict_text(r), "runs": r["n"]}
            for r in tables["order_rows"].to_dict("records")]
    tails = []
    for stream, methods in metrics["datasets"].items():
        for method, m in methods.items():
            kinds = list(m["per_kind"].items())[: 1 if m["order_independent"] else None]  # reordered: all alike
            tails += [{"stream": stream, "method": method,
                       "kind": "every kind (reordered)" if m["order_independent"] else
                       metrics["kinds"][stream][family]["label"], "accuracy %": pct(k["accuracy"]),
                       "tail accuracy %": f"{pct(k['tail']['value'])} ({k['tail']['label']})"} for family, k in kinds]
    doc.add("## Appendix",
            "The per-run tables are CSV files under `reports/tables/`: `runs_collapse.csv` (first and last block "
            "against zero-shot, per run), `cyclic_memory.csv` (per cyclic run: entries appended in a domain's "
            "block and deleted before it returned), `wins_losses.csv` (per run), `kind_accuracy.csv`, "
            "`order_rows.csv`, `chaos.csv`, `evidence.csv`.",
            "### A. Every tested row",
            "A kind's estimate is its contrast against the i.i.d. kind (points); an ordering row's, the SD between "
            "orderings within the kind (points).", table(rows),
            "### B. Accuracy and expected tail accuracy per kind",
            f"The tail is the mean of exactly the worst {100 * metrics['tail_fraction']:g}% of the kind's runs "
            "(fractional), or of the worst k of n.",
            table(tails))
