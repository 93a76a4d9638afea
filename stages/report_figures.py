"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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


def buffer_dynamics(panels: list[dict], target: Path, dpi: int) -> None:
    """Per DynaPrompt run: buffer size and cumulative appends/deletions; selected ids over time; selections per id."""
    if not panels:
        figure = Figure(figsize=(8, 2))
        FigureCanvasAgg(figure)
        figure.text(0.5, 0.5, "No DynaPrompt runs in this sweep.", ha="center", va="center")
        save(figure, target, dpi)
        return
    figure = Figure(figsize=(16, 3.4 * len(panels)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 3, squeeze=False)
    for (size_ax, usage_ax, count_ax), panel in zip(axes, panels):
        records = panel["records"].sort_values("position")
        position = records["position"].to_numpy()
        lines = size_ax.plot(position, records["buffer_size"], color="C0", label="buffer size")
        size_ax.set_ylabel("prompts in buffer", color="C0")
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
        for switch, domain in domain_switches(records):
            for ax in (size_ax, usage_ax):
                ax.axvline(switch, color="0.4", linestyle=":", linewidth=0.8)
            size_ax.annotate(domain, (switch, 0.97), xycoords=("data", "axes fraction"), xytext=(2, 0),
                             textcoords="offset points", fontsize=7, va="top", ha="left", color="0.3")
    figure.tight_layout()
    save(figure, target, dpi)
