"""The report, written once as Markdown; the HTML is converted from it (python-markdown), figures embedded."""
from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import pandas as pd

FIGURES = {  # file -> what the figure shows (its alt text and caption)
    "kind_contrasts.png": "Forest plot: per stream, each order-dependent method's accuracy on every kind of stream "
                          "minus its accuracy on the i.i.d. stream, in points, with the 95% interval; filled markers "
                          "pass the adjusted test; the grey band is the equivalence margin.",
    "accuracy_per_block.png": "Accuracy per block along the stream, a panel per stream and kind: line = mean over "
                              "the kind's orderings and seeds, band = min-max.",
    "chaos_against_order.png": "Per stream and order-dependent method: the SD between each kind's orderings at one "
                               "view seed (coloured) next to the SD between replicates of one run under a "
                               "last-bit perturbation alone (black diamond, 95% interval): where they match, the "
                               "method is chaotic.",
    "buffer_dynamics.png": "Memory over the stream, a row per method that keeps one: its size (DynaPrompt: "
                           "prompts in the buffer; TDA, TCA, DPE: cache entries; BoostAdapter: historical and "
                           "negative cache entries; DMN: memory slots; ECALP: graph nodes) with cumulative appends "
                           "and deletions; where a method selects per sample, what it selected at each position "
                           "(DynaPrompt: prompt ids; BoostAdapter: its boosting views, by view index) and how "
                           "often; shaded spans are the domains of cyclic streams.",
    "calibration.png": "Accuracy gain over zero-shot against the learning rate on the calibration stream.",
    "ablation_buffer_size.png": "DynaPrompt's accuracy against its buffer size M (mean over orderings, 95% "
                                "t-interval).",
    "ablation_margins.png": "DynaPrompt's accuracy over the grid of selection margins (tau_h, tau_d), mean over "
                            "orderings.",
    "evidence.png": "Half-width of the 95% interval of a kind's mean accuracy against the number of its orderings, a "
                    "line per stream, method and kind.",
}


def pct(value, digits: int = 1) -> str:
    """A fraction as percentage points; a dash where unknown."""
    if unknown(value):
        return "–"
    return f"{100 * value:.{digits}f}"


def unknown(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def signed(value) -> str:
    return "–" if unknown(value) else f"{100 * value:+.1f}"


def interval(bounds) -> str:
    if not bounds or unknown(bounds[0]) or unknown(bounds[1]):
        return "–"
    return f"[{signed(bounds[0])}, {signed(bounds[1])}]"


def table(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_markdown(index=False) if rows else "_(none)_"


def figure(name: str) -> str:
    return f"![{FIGURES[name]}](figures/{name})\n\n*{FIGURES[name]}*"


class Document:
    """Markdown built section by section."""

    def __init__(self):
        self.parts: list[str] = []

    def add(self, *blocks: str) -> "Document":
        self.parts.extend(b for b in blocks if b)
        return self

    def markdown(self) -> str:
        return "\n\n".join(self.parts) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; } em { color: #555; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def to_html(markdown_text: str, reports_dir: Path, title: str) -> str:
    """Self-contained HTML from the Markdown: figures inlined as data URIs, no scripts, no external requests."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])

    def inline(match: re.Match) -> str:
        data = base64.b64encode((reports_dir / match.group(1)).read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="(figures/[^"]+\.png)"', inline, body)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{HTML_STYLE}</style></head><body>\n{body}\n</body></html>\n")
