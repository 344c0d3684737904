"""Plotly figures and highlighted-token HTML for the explorer pages (every string escaped)."""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

ACCENT = "255, 110, 30"


def histogram_figure(
    edges: Sequence[float], counts: Sequence[int], title: str = "Activation histogram"
) -> go.Figure:
    """Counts over log-spaced bins, drawn on a log x axis (bars span their bin)."""
    edges = np.asarray(edges, dtype=float)
    centres = np.sqrt(edges[:-1] * edges[1:])
    figure = go.Figure(
        go.Bar(
            x=centres,
            y=list(counts),
            width=np.diff(edges),
            marker_color=f"rgb({ACCENT})",
            hovertemplate="activation %{x:.3g}<br>count %{y}<extra></extra>",
        )
    )
    figure.update_layout(
        title=title,
        xaxis_type="log",
        xaxis_title="activation",
        yaxis_title="tokens",
        height=280,
        margin=dict(l=40, r=10, t=40, b=40),
        bargap=0,
    )
    return figure


def logit_figure(
    texts: Sequence[str], token_ids: Sequence[int], effects: Sequence[float], title: str
) -> go.Figure:
    """Horizontal bars, one per token; labels carry the id, as distinct tokens can print alike."""
    colour = "rgb(40, 120, 200)" if title.lower().startswith("top") else "rgb(200, 60, 60)"
    labels = [f"{t!r} · {i}" for t, i in zip(texts, token_ids)]
    figure = go.Figure(go.Bar(x=list(effects), y=labels, orientation="h", marker_color=colour))
    figure.update_layout(
        title=title,
        height=40 + 22 * len(labels),
        margin=dict(l=10, r=10, t=40, b=20),
        yaxis=dict(autorange="reversed"),
    )
    return figure


def token_html(text: str) -> str:
    """A token made visible: escaped, newlines shown as ↵, leading spaces kept."""
    return html.escape(text).replace("\n", "↵").replace(" ", "&nbsp;") or "&#8203;"


def highlight_html(
    tokens: Sequence[str], activations: Sequence[float], scale: float, peak: int | None = None
) -> str:
    """Tokens with a background whose opacity is activation / scale; the peak is underlined."""
    scale = scale if scale > 0 else 1.0
    spans = []
    for i, (token, value) in enumerate(zip(tokens, activations)):
        alpha = min(max(float(value) / scale, 0.0), 1.0)
        style = f"background: rgba({ACCENT}, {alpha:.2f}); border-radius: 3px; padding: 0 1px;"
        if i == peak:
            style += " border-bottom: 2px solid black;"
        spans.append(
            f'<span class="tok" title="{float(value):.3f}" style="{style}">{token_html(token)}</span>'
        )
    return (
        '<div class="example" style="font-family: monospace; line-height: 1.8;">' + "".join(spans) + "</div>"
    )
