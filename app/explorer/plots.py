"""Plotly figures and highlighted-token HTML for the explorer pages (every string escaped).

Examples are plain text in a `white-space: pre-wrap` block, so they wrap at any width and keep
their spaces (leading ones included); each token is a span whose background opacity is its
activation over the feature's maximum, with the value in its tooltip, and each example prints
its own maximum activation in front of it. A page draws all its examples in one `st.html` call.
"""

from __future__ import annotations

import html
import math
from typing import NamedTuple, Sequence

import numpy as np
import plotly.graph_objects as go

from app.explorer.formats import format_activation

ACCENT = "255, 110, 30"
_CSS = (
    "<style>"
    ".wb-ex{display:flex;gap:.6em;align-items:baseline;margin:0 0 .35em 0;max-width:100%}"
    ".wb-act{flex:0 0 3.6em;text-align:right;font:12px monospace;color:#666}"
    ".wb-ctx{flex:1 1 auto;min-width:0;white-space:pre-wrap;overflow-wrap:anywhere;"
    "font-family:monospace;font-size:13px;line-height:1.7}"
    ".wb-ctx .tok{border-radius:3px}"
    ".wb-ctx .peak{border-bottom:2px solid #000}"
    ".wb-ctx .far{color:#888}"
    ".wb-group{margin:0 0 .4em 0}.wb-group summary{cursor:pointer;font-size:14px;margin:0 0 .3em 0}"
    ".wb-logits{border-collapse:collapse;font:13px monospace;width:100%}"
    ".wb-logits td{padding:1px 6px;white-space:pre-wrap;overflow-wrap:anywhere}"
    "</style>"
)


class ExampleRow(NamedTuple):
    """One example to draw: token texts, their activations, the peak's index (or None), and the
    value printed in front (the example's maximum activation)."""

    tokens: Sequence[str]
    activations: Sequence[float]
    peak: int | None
    value: float


def histogram_figure(
    edges: Sequence[float], counts: Sequence[int], title: str = "Activation histogram"
) -> go.Figure:
    """Counts over log-spaced bins on a log x axis (bars span their bin); the axis covers the
    bins that hold data (with a tenth of a decade either side), not every bin the store has."""
    edges = np.asarray(edges, dtype=float)
    counts = np.asarray(counts)
    centres = np.sqrt(edges[:-1] * edges[1:])
    span = data_range(edges, counts)
    figure = go.Figure(
        go.Bar(
            x=centres,
            y=counts.tolist(),
            width=np.diff(edges),
            marker_color=f"rgb({ACCENT})",
            hovertemplate="activation %{x:.3g}<br>count %{y}<extra></extra>",
        )
    )
    figure.update_layout(
        title=title,
        xaxis=dict(type="log", title="activation", range=span, **log_ticks(span)),
        yaxis_title="tokens",
        height=260,
        margin=dict(l=40, r=10, t=40, b=40),
        bargap=0,
    )
    return figure


def log_ticks(span: list[float] | None) -> dict:
    """Ticks at 1, 2 and 5 times each power of ten inside `span` ([log10 low, log10 high]),
    printed in full: plotly's own log ticks read "2 5 1 2 5", where 0.2 looks like 2."""
    if span is None:
        return {}
    low, high = span
    values = [
        m * 10.0**e
        for e in range(int(np.floor(low)), int(np.ceil(high)) + 1)
        for m in (1, 2, 5)
        if low <= np.log10(m * 10.0**e) <= high
    ]
    return {"tickvals": values, "ticktext": [f"{v:g}" for v in values]} if len(values) >= 2 else {}


def data_range(edges: Sequence[float], counts: Sequence[int]) -> list[float] | None:
    """[log10 low, log10 high] spanning the non-empty bins, for a log axis; None when none is."""
    full = np.flatnonzero(np.asarray(counts) > 0)
    if not len(full):
        return None
    low, high = float(edges[full[0]]), float(edges[full[-1] + 1])
    return [math.log10(low) - 0.1, math.log10(high) + 0.1]


def token_html(text: str) -> str:
    """A token made visible: escaped, a newline shown as ↵ (a tab as →); spaces stay spaces, which
    the pre-wrap block keeps (never &nbsp;, which would stop the line from wrapping)."""
    return html.escape(text).replace("\n", "↵").replace("\t", "→") or "&#8203;"


def _spans(row: ExampleRow, scale: float) -> str:
    spans = []
    for i, (token, value) in enumerate(zip(row.tokens, row.activations)):
        alpha = min(max(float(value) / scale, 0.0), 1.0) if np.isfinite(value) else 0.0
        classes = "tok peak" if i == row.peak else "tok"
        title = format_activation(value) if np.isfinite(value) else "not computed"
        spans.append(
            f'<span class="{classes}" title="{title}" style="background: rgba({ACCENT}, {alpha:.2f})">'
            f"{token_html(token)}</span>"
        )
    return "".join(spans)


def examples_html(rows: Sequence[ExampleRow], scale: float) -> str:
    """All `rows` as one HTML block: per example its maximum activation, then its tokens."""
    scale = scale if scale > 0 else 1.0
    parts = [_CSS, '<div class="wb-examples">']
    for row in rows:
        parts.append(
            f'<div class="example wb-ex"><span class="wb-act">{format_activation(row.value)}</span>'
            f'<div class="wb-ctx">{_spans(row, scale)}</div></div>'
        )
    parts.append("</div>")
    return "".join(parts)


def grouped_examples_html(groups: Sequence[tuple[str, Sequence[ExampleRow]]], scale: float) -> str:
    """Titled groups of examples, each a collapsible <details> block (the first one open), all in
    one HTML block: one element for the browser to draw, not one per group."""
    parts = [_CSS]
    for i, (title, rows) in enumerate(groups):
        body = examples_html(rows, scale).removeprefix(_CSS)
        parts.append(
            f'<details class="wb-group"{" open" if i == 0 else ""}><summary>{html.escape(title)}</summary>'
            f"{body}</details>"
        )
    return "".join(parts)


def highlight_html(
    tokens: Sequence[str], activations: Sequence[float], scale: float, peak: int | None = None
) -> str:
    """One text highlighted by activation (the live box), its maximum printed in front."""
    value = max((float(a) for a in activations), default=0.0)
    return examples_html([ExampleRow(tokens, activations, peak, value)], scale)


def logits_html(texts: Sequence[str], effects: Sequence[float], positive: bool) -> str:
    """A two-column list of tokens (quoted, spaces and escapes visible) and their logit effect."""
    colour = "40, 120, 200" if positive else "200, 60, 60"
    top = max((abs(float(e)) for e in effects), default=1.0) or 1.0
    rows = [
        f'<tr><td style="background: rgba({colour}, {abs(float(e)) / top * 0.6:.2f})">'
        f"{html.escape(repr(t))}</td><td>{float(e):+.3f}</td></tr>"
        for t, e in zip(texts, effects)
    ]
    return _CSS + '<table class="wb-logits">' + "".join(rows) + "</table>"
