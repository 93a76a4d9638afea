"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

KIND_ORDER = ["natural", "shuffle", "class_blocked", "cyclic"]  # ordering kinds, left to right


def method_colors(methods: list[str]) -> dict:
    """One colour per method, the same in every figure."""
    palette = [f"C{i}" for i in range(10)]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def panel_grid(n: int, width: float = 5.0, height: float = 3.6):
    """A figure with `n` panels in up to 3 columns; unused axes hidden."""
    cols = min(3, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    figure = Figure(figsize=(width * cols, height * rows + 0.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return figure, axes[:n]


def save(figure: Figure, target: Path, dpi: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=dpi, format="png")


def block_matrix(rows: pd.DataFrame) -> np.ndarray:
    """Per-block accuracies of several runs as [runs, blocks], padded with NaN where a stream is shorter."""
    lists = [np.asarray(b, dtype=float) for b in rows["block_accuracy"]]
    matrix = np.full((len(lists), max(len(b) for b in lists)), np.nan)
    for i, b in enumerate(lists):
        matrix[i, : len(b)] = b
    return matrix


def accuracy_per_block(runs: pd.DataFrame, datasets: list[str], methods: list[str], target: Path, dpi: int) -> None:
    """One panel per dataset: mean block accuracy per method with its min–max band across orderings."""
    colors = method_colors(methods)
    figure, axes = panel_grid(len(datasets))
    for ax, dataset in zip(axes, datasets):
        for method in methods:
            rows = runs[(runs["dataset"] == dataset) & (runs["method"] == method)]
            if rows.empty:
                continue
            matrix = block_matrix(rows)
            size = int(rows["block_size"].iloc[0])
            x = (np.arange(matrix.shape[1]) + 0.5) * size  # block centres, in samples seen
            style = "--" if rows["method_kind"].iloc[0] == "zero_shot" else "-"
            ax.plot(x, 100 * np.nanmean(matrix, axis=0), style, marker="o", ms=3, color=colors[method],
                    label=method)
            if len(rows) > 1:
                ax.fill_between(x, 100 * np.nanmin(matrix, axis=0), 100 * np.nanmax(matrix, axis=0),
                                color=colors[method], alpha=0.18, linewidth=0)
        ax.set_title(dataset, fontsize=10)
        ax.set_xlabel("position in stream (block centre)")
        ax.set_ylabel("block accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    legend_and_title(figure, axes, "Accuracy per block (line: mean over orderings; band: min–max)")
    save(figure, target, dpi)


def legend_and_title(figure: Figure, axes, title: str) -> None:
    """A single legend for all panels, above them, with every label any panel drew."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        figure.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(len(handles), 7),
                      fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0.995))
    figure.suptitle(title, y=0.04, fontsize=10)
    figure.tight_layout(rect=(0, 0.05, 1, 0.93))


def kind_accuracies(rows: pd.DataFrame, kinds: list[str], order_independent: bool) -> dict:
    """Accuracies per ordering kind; an order-independent method's value stands for every kind it missed."""
    out = {k: rows.loc[rows["ordering_kind"] == k, "accuracy"].to_numpy(dtype=float) for k in kinds}
    if order_independent:
        fill = rows["accuracy"].to_numpy(dtype=float)
        out = {k: v if len(v) else np.array([fill.mean()]) for k, v in out.items()}
    return out


def accuracy_by_ordering_kind(runs: pd.DataFrame, datasets: list[str], methods: list[str], order_independent: set,
                              target: Path, dpi: int) -> None:
    """One panel per dataset: for each method a bar per ordering kind (mean), dots for single orderings."""
    present = set(runs["ordering_kind"])
    kinds = [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))
    shades = {k: f"C{i}" for i, k in enumerate(kinds)}
    figure, axes = panel_grid(len(datasets), width=max(5.0, 0.9 * len(methods) + 1.5))
    for ax, dataset in zip(axes, datasets):
        here = runs[runs["dataset"] == dataset]
        dataset_kinds = [k for k in kinds if k in set(here["ordering_kind"])]
        names = [m for m in methods if m in set(here["method"])]
        width = 0.8 / max(len(dataset_kinds), 1)
        for i, method in enumerate(names):
            rows = here[here["method"] == method]
            values = kind_accuracies(rows, dataset_kinds, method in order_independent)
            for j, kind in enumerate(dataset_kinds):
                if not len(values[kind]):
                    continue
                x = i - 0.4 + width * (j + 0.5)
                ax.bar(x, 100 * values[kind].mean(), width * 0.9, color=shades[kind], alpha=0.75,
                       label=kind)
                ax.plot(np.full(len(values[kind]), x), 100 * values[kind], "k.", ms=4)
        ax.set_xlim(-0.6, len(names) - 0.4)  # a lone method keeps a normal bar width
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(dataset, fontsize=10)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    legend_and_title(figure, axes, "Accuracy by ordering kind (bar: mean over orderings of the kind; dots: orderings)")
    save(figure, target, dpi)


def domain_switches(records: pd.DataFrame) -> list[tuple[int, str]]:
    """(position, new domain) wherever a cyclic stream changes domain, the start included."""
    if "domain" not in records.columns:
        return []
    domains = records["domain"].astype(str).to_numpy()
    starts = [0] + [i for i in range(1, len(domains)) if domains[i] != domains[i - 1]]
    return [(int(records["position"].iloc[i]), domains[i]) for i in starts]


def shade_domains(records: pd.DataFrame, axes) -> None:
    """Cyclic streams: each domain's blocks shaded in its own colour, named once in a legend (no overlapping text)."""
    switches = domain_switches(records)
    if not switches:
        return
    colours = {d: f"C{i + 4}" for i, d in enumerate(dict.fromkeys(d for _, d in switches))}
    ends = [s for s, _ in switches[1:]] + [int(records["position"].iloc[-1]) + 1]
    for ax in axes:
        for (start, domain), end in zip(switches, ends):
            ax.axvspan(start, end, color=colours[domain], alpha=0.08, linewidth=0)
    handles = [Patch(color=c, alpha=0.3, label=d) for d, c in colours.items()]
    axes[-1].legend(handles=handles, loc="upper right", fontsize=7, frameon=False, title="domain", title_fontsize=7)


def buffer_dynamics(panels: list[dict], target: Path, dpi: int) -> None:
    """Per run with a buffer or memory: its size and cumulative appends/deletions; selected ids; selections per id."""
    if not panels:
        figure = Figure(figsize=(8, 2))
        FigureCanvasAgg(figure)
        figure.text(0.5, 0.5, "No runs with a prompt buffer or a memory in this sweep.", ha="center", va="center")
        save(figure, target, dpi)
        return
    figure = Figure(figsize=(16, 3.4 * len(panels)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 3, squeeze=False)
    for (size_ax, usage_ax, count_ax), panel in zip(axes, panels):
        records = panel["records"].sort_values("position")
        position = records["position"].to_numpy()
        lines = size_ax.plot(position, records["buffer_size"], color="C0", label="buffer size")
        size_ax.set_ylabel(panel.get("unit", "entries"), color="C0")
        size_ax.set_ylim(bottom=0)
        counts_ax = size_ax.twinx()
        lines += counts_ax.plot(position, np.cumsum([len(a) for a in records["appended"]]), color="C2",
                                label="appended (cumulative)")
        lines += counts_ax.plot(position, np.cumsum([len(d) for d in records["deleted"]]), color="C3",
                                label="deleted (cumulative)")
        counts_ax.set_ylabel("cumulative count")
        counts_ax.set_ylim(bottom=0)
        counts_ax.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=7, frameon=False)
        size_ax.set_xlabel("position in stream")
        title = panel["title"]
        if panel.get("loss") is not None:
            title += f" — {100 * panel['loss']:.0f}% of a domain's new prompts deleted before it returned"
        size_ax.set_title(title, fontsize=9, loc="left")
        # every mention of a prompt id at its position: which prompts carry the stream when
        pairs = [(p, i) for p, ids in zip(position, records["selected"]) for i in ids]
        if pairs:
            xs, ids = zip(*pairs)
            usage_ax.scatter(xs, ids, s=2, color="C1")
            selections = pd.Series(ids).value_counts().sort_index()
            count_ax.bar(selections.index, selections.to_numpy(), width=0.8, color="C1")
        usage_ax.set_xlabel("position in stream")
        usage_ax.set_ylabel("selected prompt id")
        count_ax.set_xlabel("prompt id")
        count_ax.set_ylabel("times selected")
        shade_domains(records, (size_ax, usage_ax))
    figure.tight_layout()
    save(figure, target, dpi)


def calibration_curve(rows: list[dict], reference: str, rms: float | None, target: Path, dpi: int) -> None:
    """Accuracy gain over the reference against lr (log axis), one line per calibrated method."""
    figure = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["lr"] for r in mine], [100 * r["gain"] for r in mine], marker="o", color=f"C{i}", label=method)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set_xscale("log")
    label = "learning rate" + (f" (RMS of v0's context coordinates: {rms:.3g})" if rms else "")
    ax.set_xlabel(label)
    ax.set_ylabel(f"accuracy minus {reference} (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    figure.tight_layout()
    save(figure, target, dpi)


def buffer_size_curve(rows: list[dict], target: Path, dpi: int) -> None:
    """Mean accuracy over orderings against the buffer size M, with the 95% interval."""
    figure = Figure(figsize=(5.5, 3.8))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    if rows:
        m = [r["M"] for r in rows]
        mean = np.array([100 * r["mean"] for r in rows])
        low = np.array([100 * (r["ci95"][0] if r["ci95"][0] is not None else r["mean"]) for r in rows])
        high = np.array([100 * (r["ci95"][1] if r["ci95"][1] is not None else r["mean"]) for r in rows])
        ax.errorbar(m, mean, yerr=[mean - low, high - mean], marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(m, [str(v) for v in m])
    ax.set_xlabel("buffer size M")
    ax.set_ylabel("accuracy (%), mean over orderings")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    save(figure, target, dpi)


def margins_heatmap(rows: list[dict], target: Path, dpi: int) -> None:
    """Mean accuracy over orderings for each (tau_h, tau_d) cell of the margin grid."""
    figure = Figure(figsize=(5, 4))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    taus_h = sorted({r["tau_h"] for r in rows})
    taus_d = sorted({r["tau_d"] for r in rows})
    grid = np.full((len(taus_h), len(taus_d)), np.nan)
    for r in rows:
        grid[taus_h.index(r["tau_h"]), taus_d.index(r["tau_d"])] = 100 * r["mean"]
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    for i in range(len(taus_h)):
        for j in range(len(taus_d)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="w", fontsize=9)
    ax.set_xticks(range(len(taus_d)), [f"{t:g}" for t in taus_d])
    ax.set_yticks(range(len(taus_h)), [f"{t:g}" for t in taus_h])
    ax.set_xlabel("probability-difference margin tau_d")
    ax.set_ylabel("entropy margin tau_h")
    figure.colorbar(image, ax=ax, label="accuracy (%)")
    figure.tight_layout()
    save(figure, target, dpi)


def order_vs_chance(rows: list[dict], target: Path, dpi: int) -> None:
    """Per dataset and method: the spread the order causes against the spread sampling alone would cause."""
    figure = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.2))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [100 * (r["between_sd"] or 0) for r in rows], 0.4, label="between orderings (SD)")
    ax.bar(x + 0.2, [100 * r["within_se"] for r in rows], 0.4, label="within a run (binomial SE)")
    for i, r in enumerate(rows):
        if r["p_value"] is not None and r["p_value"] < 0.05:
            ax.annotate("*", (i - 0.2, 100 * (r["between_sd"] or 0)), ha="center", va="bottom")
    ax.set_xticks(x, [f"{r['dataset']}\n{r['method']}" for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("accuracy points")
    ax.legend(fontsize=8, frameon=False, title="* Cochran's Q p < 0.05", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    save(figure, target, dpi)


def order_vs_seed(rows: list[dict], target: Path, dpi: int) -> None:
    """SD(order) against SD(seed) with their intervals, one marker per (stream, method); the diagonal y = x."""
    figure = Figure(figsize=(7.5, 6.0))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    streams = list(dict.fromkeys(r["dataset"] for r in rows))
    colors, markers = method_colors(methods), "osD^v<>ph*"
    top = 0.1
    for r in rows:
        x, y = 100 * r["sd_seed"], 100 * r["sd_order"]
        (xl, xh), (yl, yh) = [(100 * (lo or 0), 100 * (hi or 0)) for lo, hi in (r["sd_seed_ci"], r["sd_order_ci"])]
        ax.errorbar(x, y, xerr=[[max(x - xl, 0)], [max(xh - x, 0)]], yerr=[[max(y - yl, 0)], [max(yh - y, 0)]],
                    fmt=markers[streams.index(r["dataset"]) % len(markers)], color=colors[r["method"]], ms=6,
                    capsize=2, alpha=0.85, elinewidth=0.8)
        top = max(top, xh, yh)
    ax.plot([0, top], [0, top], "k--", linewidth=0.8)
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("SD(seed): accuracy points due to the augmentation seed")
    ax.set_ylabel("SD(order): accuracy points due to the ordering")
    handles = [Patch(color=colors[m], label=m) for m in methods]
    handles += [ax.plot([], [], markers[i % len(markers)], color="0.3", label=s)[0] for i, s in enumerate(streams)]
    ax.legend(handles=handles, fontsize=8, frameon=False, loc="upper left", ncol=2)
    ax.set_title("Order against chance (above the diagonal: the order matters more than the seed)", fontsize=10)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    save(figure, target, dpi)


def evidence_growth(rows: list[dict], target_half_width: float, target: Path, dpi: int) -> None:
    """The 95% interval's half-width against the number of orderings it rests on, per dataset and method."""
    figure = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for i, r in enumerate(rows):
        points = [p for p in r["by_count"] if p["half_width"] is not None]
        ax.plot([p["orderings"] for p in points], [100 * p["half_width"] for p in points], marker=".",
                color=f"C{i % 10}", label=f"{r['dataset']} / {r['method']}")
    ax.axhline(100 * target_half_width, color="k", linestyle="--", linewidth=0.8, label="target")
    ax.set_xlabel("orderings")
    ax.set_ylabel("95% interval half-width (points)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, frameon=False, ncol=2)
    figure.tight_layout()
    save(figure, target, dpi)
