"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot global state).

Sized for the page: report.html shows a figure at most as wide as its column (1150 px at a 1280 px window, about
1000 px on a smaller screen), so a figure that spans the page is PAGE_WIDTH inches wide and no text is smaller
than MIN_FONT points; then text reads at 9 pt or more wherever the column is 1000 px or wider, whatever
`report.dpi` is (the dpi sets the sharpness, the inches the size of the text on the page). Each PNG records its
smallest font (`MIN_FONT_KEY`) for the browser test that measures it on the page.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

PAGE_WIDTH = 10.5  # inches: 1155 px at dpi 110, the page's column at 1280 px (no upscaling)
MIN_FONT = 9.0  # points, the smallest text any figure draws
FONT = 10.0  # axis labels and titles
MIN_FONT_KEY = "dynaprompt:smallest-font-pt"  # PNG text chunk: the smallest font in the figure


def method_colors(methods: list[str]) -> dict:
    """One colour per method, the same in every figure (tab20 beyond 10 methods: up to 20 stay apart)."""
    if len(methods) <= 10:
        return {m: f"C{i}" for i, m in enumerate(methods)}
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas with constrained layout (legends placed "outside" get room of their own)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def panel_grid(n: int, height: float = 3.0, cols: int = 3):
    """A figure as wide as the page with `n` panels in up to `cols` columns; unused axes hidden."""
    cols = min(cols, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    figure = new_figure(PAGE_WIDTH, height * rows + 0.9)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return figure, axes[:n]


def legend_columns(labels, width: float = PAGE_WIDTH, fontsize: float = MIN_FONT) -> int:
    """How many legend columns of these labels fit across `width` inches."""
    longest = max((len(str(label)) for label in labels), default=1)
    column = 0.55 * fontsize / 72 * longest + 0.6  # text at ~0.55 em per character, plus handle and gap
    return max(1, min(len(labels), int(width / column)))


def visible_texts(artist):
    """Every non-empty text the figure draws (none inside hidden artists)."""
    for child in artist.get_children():
        if not child.get_visible():
            continue
        if isinstance(child, Text) and child.get_text().strip():
            yield child
        yield from visible_texts(child)


def smallest_font(figure: Figure) -> float:
    figure.canvas.draw()  # tick labels exist once drawn
    return min((t.get_fontsize() for t in visible_texts(figure)), default=MIN_FONT)


def save(figure: Figure, target: Path, dpi: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=dpi, format="png", metadata={MIN_FONT_KEY: f"{smallest_font(figure):g}"})


def apply_font(ax) -> None:
    """Axis labels at FONT and tick labels at MIN_FONT or more."""
    ax.tick_params(labelsize=MIN_FONT)
    ax.xaxis.label.set_fontsize(FONT)
    ax.yaxis.label.set_fontsize(FONT)


def block_matrix(rows: pd.DataFrame) -> np.ndarray:
    """Per-block accuracies of several runs as [runs, blocks], padded with NaN where a stream is shorter."""
    lists = [np.asarray(b, dtype=float) for b in rows["block_accuracy"]]
    matrix = np.full((len(lists), max(len(b) for b in lists)), np.nan)
    for i, b in enumerate(lists):
        matrix[i, : len(b)] = b
    return matrix


def accuracy_per_block(runs: pd.DataFrame, panels: list[tuple[str, str, str]], methods: list[str], target: Path,
                       dpi: int) -> None:
    """One panel per (stream, kind): mean block accuracy per method over the kind's orderings and seeds, with its
    min–max band. `panels`: (stream, family, title) in the report's order."""
    colors = method_colors(methods)
    figure, axes = panel_grid(len(panels))
    for ax, (stream, family, title) in zip(axes, panels):
        here = runs[(runs["dataset"] == stream) & (runs["ordering_family"] == family)]
        for method in methods:
            rows = here[here["method"] == method]
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
                                color=colors[method], alpha=0.12, linewidth=0)
        ax.set_title(title, fontsize=FONT)
        ax.set_xlabel("position in stream (block centre)")
        ax.set_ylabel("block accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        apply_font(ax)
    legend_and_title(figure, axes, "Accuracy per block, per kind of stream (line: mean over the kind's orderings "
                                   "and seeds; band: min–max)")
    save(figure, target, dpi)


def legend_and_title(figure: Figure, axes, title: str, extra: list | None = None) -> None:
    """One legend for all panels, above them and outside them, with every label any panel drew (then `extra`
    handles), under the figure's title (the legend's own: constrained layout keeps a suptitle off it only so)."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    for handle in extra or []:
        handles.setdefault(handle.get_label(), handle)
    figure.legend(handles.values(), handles.keys(), loc="outside upper center", fontsize=MIN_FONT,
                  ncol=legend_columns(handles.keys()), frameon=False, title=title, title_fontsize=FONT)


def domain_switches(records: pd.DataFrame) -> list[tuple[int, str]]:
    """(position, new domain) wherever a cyclic stream changes domain, the start included."""
    if "domain" not in records.columns:
        return []
    domains = records["domain"].astype(str).to_numpy()
    starts = [0] + [i for i in range(1, len(domains)) if domains[i] != domains[i - 1]]
    return [(int(records["position"].iloc[i]), domains[i]) for i in starts]


def shade_domains(records: pd.DataFrame, axes, colours: dict) -> None:
    """Cyclic streams: each domain's blocks shaded in its colour (named once, in the figure's legend)."""
    switches = domain_switches(records)
    ends = [s for s, _ in switches[1:]] + [int(records["position"].iloc[-1]) + 1] if switches else []
    for ax in axes:
        for (start, domain), end in zip(switches, ends):
            ax.axvspan(start, end, color=colours[domain], alpha=0.10, linewidth=0)


def buffer_dynamics(panels: list[dict], target: Path, dpi: int) -> None:
    """A row per run with a memory: its size (left axis, labelled by the panel's `unit`) and cumulative appends
    and deletions (right axis); where the run selects from it, what it selected at each position (labelled by the
    panel's `selected`) and how often each (`count`). A run that selects nothing per sample gets the full row."""
    if not panels:
        figure = new_figure(PAGE_WIDTH, 1.5)
        figure.text(0.5, 0.5, "No runs with a prompt buffer or a memory in this sweep.", ha="center", va="center",
                    fontsize=FONT)
        save(figure, target, dpi)
        return
    domains = dict.fromkeys(d for panel in panels for _, d in domain_switches(panel["records"]))
    colours = {d: f"C{(i + 4) % 10}" for i, d in enumerate(domains)}
    figure = new_figure(PAGE_WIDTH, 2.5 * len(panels) + 1.0)
    # room for the twin axes' labels, which constrained layout does not always keep: between the columns and right
    figure.get_layout_engine().set(wspace=0.05, rect=(0, 0, 1 - 0.3 / PAGE_WIDTH, 1))
    grid = figure.add_gridspec(len(panels), 3, width_ratios=[1.3, 1.0, 0.45])
    for row, panel in enumerate(panels):
        records = panel["records"].sort_values("position")
        position = records["position"].to_numpy()
        pairs = [(p, i) for p, ids in zip(position, records["selected"]) for i in ids]
        selects = bool(pairs) and panel.get("selected") is not None
        size_ax = figure.add_subplot(grid[row, 0] if selects else grid[row, :])
        size_ax.plot(position, records["buffer_size"], color="C0", label="size (left axis)")
        size_ax.set_ylabel(panel.get("unit", "entries"), color="C0")
        size_ax.set_ylim(bottom=0)
        counts_ax = size_ax.twinx()
        counts_ax.plot(position, np.cumsum([len(a) for a in records["appended"]]), color="C2",
                       label="appended, cumulative (right axis)")
        counts_ax.plot(position, np.cumsum([len(d) for d in records["deleted"]]), color="C3",
                       label="deleted, cumulative (right axis)")
        counts_ax.set_ylabel("cumulative count")
        counts_ax.set_ylim(bottom=0)
        size_ax.set_xlabel("position in stream")
        title = panel["title"] + ("" if selects else " (nothing selected per sample)")
        if panel.get("loss") is not None:
            title += f" — {100 * panel['loss']:.0f}% of a domain's new entries deleted before it returned"
        size_ax.set_title(title, fontsize=FONT, loc="left")
        apply_font(size_ax)
        apply_font(counts_ax)
        shaded = [size_ax]
        if selects:
            usage_ax = figure.add_subplot(grid[row, 1])
            count_ax = figure.add_subplot(grid[row, 2], sharey=usage_ax)
            xs, ids = zip(*pairs)  # every mention of an entry at its position: which entries carry the stream when
            usage_ax.scatter(xs, ids, s=2, color="C1")
            selections = pd.Series(ids).value_counts().sort_index()
            count_ax.barh(selections.index, selections.to_numpy(), height=0.8, color="C1")
            usage_ax.set_xlabel("position in stream")
            usage_ax.set_ylabel(panel["selected"])
            count_ax.set_xlabel(panel.get("count", "times selected"))
            count_ax.tick_params(labelleft=False)
            apply_font(usage_ax)
            apply_font(count_ax)
            shaded.append(usage_ax)
        shade_domains(records, shaded, colours)
    handles = [Line2D([], [], color=c, label=label) for c, label in
               (("C0", "size (left axis)"), ("C2", "appended, cumulative (right axis)"),
                ("C3", "deleted, cumulative (right axis)"))]
    handles += [Patch(color=c, alpha=0.3, label=f"domain {d}") for d, c in colours.items()]
    figure.legend(handles=handles, loc="outside upper center", fontsize=MIN_FONT, frameon=False,
                  ncol=legend_columns([h.get_label() for h in handles]), title="Memory over the stream",
                  title_fontsize=FONT)
    save(figure, target, dpi)


def calibration_curve(rows: list[dict], reference: str, rms: float | None, target: Path, dpi: int) -> None:
    """Accuracy gain over the reference against lr (log axis), one line per calibrated method."""
    figure = new_figure(6.5, 4)
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
    if rows:
        ax.legend(fontsize=MIN_FONT, frameon=False)
    apply_font(ax)
    save(figure, target, dpi)


def buffer_size_curve(rows: list[dict], target: Path, dpi: int) -> None:
    """Mean accuracy over orderings against the buffer size M, with the 95% interval."""
    figure = new_figure(5.5, 3.8)
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
    apply_font(ax)
    save(figure, target, dpi)


def margins_heatmap(rows: list[dict], target: Path, dpi: int) -> None:
    """Mean accuracy over orderings for each (tau_h, tau_d) cell of the margin grid."""
    figure = new_figure(5, 4)
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
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="w", fontsize=MIN_FONT)
    ax.set_xticks(range(len(taus_d)), [f"{t:g}" for t in taus_d])
    ax.set_yticks(range(len(taus_h)), [f"{t:g}" for t in taus_h])
    ax.set_xlabel("probability-difference margin tau_d")
    ax.set_ylabel("entropy margin tau_h")
    bar = figure.colorbar(image, ax=ax, label="accuracy (%)")
    bar.ax.tick_params(labelsize=MIN_FONT)
    apply_font(ax)
    save(figure, target, dpi)


def kind_colors(labels: list[str]) -> dict:
    """One colour per kind, the same in every figure."""
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def method_rows(rows: list[dict], stream: str) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows if r["stream"] == stream))


def kind_contrasts(rows: list[dict], margin: float, alpha: float, target: Path, dpi: int) -> None:
    """The forest plot: per stream (a panel each), each order-dependent method's contrast of every kind against
    the i.i.d. kind with its interval; filled where the adjusted p < alpha; the band is the equivalence margin."""
    streams = list(dict.fromkeys(r["stream"] for r in rows)) or [""]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    colors = kind_colors(labels)
    heights = [0.3 * max(len(method_rows(rows, s)), 1) * max(len(labels), 1) ** 0.5 + 0.8 for s in streams]
    figure = new_figure(PAGE_WIDTH, sum(heights) + 1.2)
    axes = figure.subplots(len(streams), 1, squeeze=False, gridspec_kw={"height_ratios": heights}).ravel()
    for ax, stream in zip(axes, streams):
        methods = method_rows(rows, stream)
        mine = [r for r in rows if r["stream"] == stream]
        kinds = list(dict.fromkeys(r["label"] for r in mine))
        step = 0.8 / max(len(kinds), 1)
        for r in mine:
            y = methods.index(r["method"]) - 0.4 + step * (kinds.index(r["label"]) + 0.5)
            x, low, high = (100 * (v if v is not None else np.nan) for v in (r["estimate"], r["ci_low"], r["ci_high"]))
            significant = r["p_adjusted"] is not None and r["p_adjusted"] < alpha
            ax.plot([low, high], [y, y], color=colors[r["label"]], linewidth=1.2)
            ax.plot(x, y, "o", ms=5, color=colors[r["label"]], markerfacecolor=None if significant else "white")
        ax.axvline(0, color="k", linewidth=0.8)
        ax.axvspan(-100 * margin, 100 * margin, color="0.85", alpha=0.5, linewidth=0)
        ax.set_yticks(range(len(methods)), methods, fontsize=MIN_FONT)
        ax.set_ylim(len(methods) - 0.5, -0.5)
        ax.set_title(stream, fontsize=FONT, loc="left")
        ax.set_xlabel("accuracy minus the i.i.d. kind's (points), 95% interval")
        ax.grid(axis="x", alpha=0.3)
        apply_font(ax)
    extra = [Line2D([], [], marker="o", color=colors[k], label=k) for k in labels]
    extra += [Line2D([], [], marker="o", ls="none", color="0.3", label="filled: adjusted p < alpha"),
             Line2D([], [], marker="o", ls="none", color="0.3", markerfacecolor="white",
                    label="hollow: not significant"),
             Patch(color="0.85", alpha=0.5, label=f"±{100 * margin:g} points (equivalence margin)")]
    legend_and_title(figure, axes, "What each kind of stream costs, against the i.i.d. stream", extra)
    save(figure, target, dpi)


def chaos_against_order(spreads: list[dict], chaos: list[dict], target: Path, dpi: int) -> None:
    """Per stream (a panel each) and order-dependent method: the SD between each kind's orderings at one view seed
    (coloured) next to the pure-chaos SD of last-bit replicates (black diamond, 95% interval)."""
    streams = list(dict.fromkeys(r["stream"] for r in spreads)) or [""]
    labels = list(dict.fromkeys(r["label"] for r in spreads))
    colors = kind_colors(labels)
    methods = {s: method_rows(spreads, s) for s in streams}
    depth = 0.55 * MIN_FONT / 72 * max((len(m) for ms in methods.values() for m in ms), default=1) * 0.71
    figure = new_figure(PAGE_WIDTH, 2.4 * len(streams) + depth + 1.2)
    axes = figure.subplots(len(streams), 1, squeeze=False).ravel()
    for ax, stream in zip(axes, streams):
        names = methods[stream]
        kinds = list(dict.fromkeys(r["label"] for r in spreads if r["stream"] == stream))
        step = 0.8 / (len(kinds) + 1)
        for r in (r for r in spreads if r["stream"] == stream):
            x = names.index(r["method"]) - 0.4 + step * (kinds.index(r["label"]) + 0.5)
            errorbar(ax, x, r["estimate"], r["ci_low"], r["ci_high"], "o", colors[r["label"]], r["label"])
        for c in {(c["stream"], c["method"]): c for c in chaos if c["stream"] == stream}.values():
            if c["method"] in names:
                x = names.index(c["method"]) + 0.4 - step / 2
                errorbar(ax, x, c["chaos_sd"], c["ci_low"], c["ci_high"], "D", "k", "chaos: last-bit replicates")
        ax.set_title(stream + ("" if any(c["stream"] == stream for c in chaos) else
                               " (no last-bit replicates in this sweep)"), fontsize=FONT, loc="left")
        ax.set_ylabel("SD (points)")
        ax.set_xlim(-0.6, max(len(names), 1) - 0.4)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=MIN_FONT)
        ax.grid(axis="y", alpha=0.3)
        apply_font(ax)
    legend_and_title(figure, axes, "Orderings against chaos: the SD between a kind's orderings at one view seed, "
                                   "and between replicates of one run")
    save(figure, target, dpi)


def errorbar(ax, x: float, value, low, high, marker: str, color, label: str) -> None:
    """A value in points with its interval; nothing where the value is unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return
    y = 100 * value
    low, high = (100 * v if v is not None and not math.isnan(v) else y for v in (low, high))
    ax.errorbar(x, y, yerr=[[max(y - low, 0)], [max(high - y, 0)]], fmt=marker, color=color, ms=5, capsize=2,
                elinewidth=0.8, label=label)


def evidence_growth(rows: list[dict], target_half_width: float, target: Path, dpi: int) -> None:
    """The 95% interval's half-width of a kind's mean against the orderings it rests on: a thin line per (stream,
    method, kind), coloured by kind."""
    figure = new_figure(PAGE_WIDTH, 4.8)
    ax = figure.subplots()
    labels = list(dict.fromkeys(r["label"] for r in rows))
    colors = kind_colors(labels)
    for r in rows:
        points = [p for p in r["by_count"] if p["half_width"] is not None]
        ax.plot([p["orderings"] for p in points], [100 * p["half_width"] for p in points], marker=".",
                color=colors[r["label"]], linewidth=0.8, alpha=0.7)
    ax.axhline(100 * target_half_width, color="k", linestyle="--", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("orderings of the kind")
    ax.set_ylabel("95% interval half-width (points)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[k], label=k) for k in labels]
    handles.append(Line2D([], [], color="k", linestyle="--", linewidth=0.8, label="target"))
    figure.legend(handles=handles, fontsize=MIN_FONT, frameon=False, loc="outside right upper",
                  ncol=1 if len(handles) <= 18 else 2)
    apply_font(ax)
    save(figure, target, dpi)
