"""The circuit graph of the Circuits page (plotly): nodes by layer, a legend of node kinds and edge
signs, edges below a |score| threshold hidden, and what a reader needs to name a node."""

from __future__ import annotations

import re
from dataclasses import dataclass

import plotly.graph_objects as go

from circuits.graph import Circuit, Edge, Node

DEFAULT_EDGES = 100
"""Edges drawn at the default threshold: more is a hairball."""
KINDS = {  # kind: (legend name, marker symbol, colour)
    "embed": ("input (embeddings)", "square", "#7f7f7f"),
    "head": ("attention head", "circle", "#1f77b4"),
    "mlp": ("MLP", "square", "#2ca02c"),
    "feature": ("dictionary feature", "diamond", "#ff7f0e"),
    "code": ("codebook code", "hexagon", "#9467bd"),
    "error": ("dictionary error term", "x", "#8c564b"),
    "logits": ("logits", "star", "#d62728"),
}
POSITIVE, NEGATIVE = "rgba(40, 120, 200, {})", "rgba(200, 60, 60, {})"
LABEL_WIDTH = 28


@dataclass
class Shown:
    """What the figure draws: nodes, edges, and how many edges passed the filters before the
    threshold (for the 'N of M edges' caption)."""

    nodes: list[Node]
    edges: list[Edge]
    candidates: int


def candidate_edges(circuit: Circuit, only_circuit: bool) -> list[Edge]:
    return [e for e in circuit.edges if e.in_circuit or not only_circuit]


def default_threshold(circuit: Circuit, only_circuit: bool, top: int = DEFAULT_EDGES) -> float:
    """The |score| of the `top`-th strongest candidate edge (0 when there are no more than
    `top`): the threshold at which about `top` edges are drawn."""
    scores = sorted((abs(e.score) for e in candidate_edges(circuit, only_circuit)), reverse=True)
    return float(scores[top - 1]) if len(scores) > top else 0.0


def shown(circuit: Circuit, only_circuit: bool, threshold: float) -> Shown:
    """Edges with |score| >= threshold (only the circuit's, if `only_circuit`); nodes at their
    ends, and nodes whose own |score| reaches the threshold (the circuit's, if `only_circuit`)."""
    candidates = candidate_edges(circuit, only_circuit)
    edges = [e for e in candidates if abs(e.score) >= threshold]
    ends = {e.source for e in edges} | {e.target for e in edges}
    nodes = [
        n
        for n in circuit.nodes
        if n.id in ends or ((n.in_circuit or not only_circuit) and abs(n.score) >= threshold)
    ]
    return Shown(nodes, edges, len(candidates))


def layer_ticks(nodes: list[Node]) -> dict[int, str]:
    """{layer: tick text}: 'input' and 'logits' where a layer holds only those, a feature
    circuit's hook name, else 'layer N' (the graph's layer 0 is the embeddings, so a block's
    nodes sit at its index + 1)."""
    ticks: dict[int, str] = {}
    for layer in sorted({n.layer for n in nodes}):
        here = [n for n in nodes if n.layer == layer]
        kinds, hooks = {n.kind for n in here}, {n.hook for n in here if n.hook}
        if kinds == {"embed"}:
            ticks[layer] = "input"
        elif kinds == {"logits"}:
            ticks[layer] = "logits"
        elif len(hooks) == 1:
            ticks[layer] = hooks.pop()
        else:
            ticks[layer] = f"block {layer - 1}" if kinds <= {"head", "mlp"} else f"layer {layer}"
    return ticks


MLP_OFFSET = 0.45
"""A block's MLP sits right of its heads (which feed it), so head -> MLP edges do not run
through the heads stacked in the same column."""


def _positions(nodes: list[Node]) -> tuple[dict[str, tuple[float, float]], int]:
    """Node id -> (x, y): x the layer (MLPs offset by MLP_OFFSET), each column's nodes top to
    bottom centred on 0; and the most nodes in one column."""
    columns: dict[float, list[str]] = {}
    for node in sorted(nodes, key=lambda n: (n.layer, n.kind, -abs(n.score), n.id)):
        x = node.layer + (MLP_OFFSET if node.kind == "mlp" else 0.0)
        columns.setdefault(x, []).append(node.id)
    position = {}
    for x, ids in columns.items():
        for slot, node_id in enumerate(ids):
            position[node_id] = (x, (len(ids) - 1) / 2 - slot)
    return position, max((len(ids) for ids in columns.values()), default=1)


_HEAD, _MLP = re.compile(r"^a(\d+)\.(\d+)$"), re.compile(r"^m(\d+)$")


def display_name(node: Node) -> str:
    """A node as a reader names it: L1.H3 for head a1.3, MLP 2 for m2, else its label or id."""
    if node.label and node.label != node.id:
        return node.label
    head, mlp = _HEAD.match(node.id), _MLP.match(node.id)
    if node.kind == "head" and head:
        return f"L{head.group(1)}.H{head.group(2)}"
    if node.kind == "mlp" and mlp:
        return f"MLP {mlp.group(1)}"
    return node.label or node.id


def short(text: str, width: int = LABEL_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def circuit_figure(
    circuit: Circuit,
    only_circuit: bool = False,
    threshold: float = 0.0,
    names: dict[str, str] | None = None,
    kinds: dict[str, str] | None = None,
) -> go.Figure:
    """The layered graph of what `shown` keeps. `names`: node id -> display name (e.g.
    '#12 · KING ×14'; default the node's label); `kinds`: node id -> kind to draw instead of its
    own (e.g. 'code' for a codebook's features). Edge width follows |score|, colour its sign; each
    node's id rides in `customdata` so a click can be resolved; edges show their score on hover
    at their midpoint."""
    names, kinds = names or {}, kinds or {}
    view = shown(circuit, only_circuit, threshold)
    position, tallest = _positions(view.nodes)
    top = max((abs(e.score) for e in view.edges), default=1.0) or 1.0
    figure = go.Figure()
    _draw_edges(figure, view.edges, position, top)
    by_kind: dict[str, list[Node]] = {}
    for node in view.nodes:
        by_kind.setdefault(kinds.get(node.id, node.kind), []).append(node)
    for kind, group in by_kind.items():
        legend, symbol, colour = KINDS.get(kind, (kind, "circle", "#444444"))
        full = [names.get(n.id) or display_name(n) for n in group]
        figure.add_trace(
            go.Scatter(
                x=[position[n.id][0] for n in group],
                y=[position[n.id][1] for n in group],
                mode="markers+text",
                text=[short(name) for name in full],
                textposition="middle right",
                textfont=dict(size=11),
                customdata=[n.id for n in group],
                hovertext=[
                    f"{name}<br>{legend} · {n.id}<br>score {n.score:.4g}"
                    + ("" if n.in_circuit else "<br>(not in the circuit)")
                    for name, n in zip(full, group)
                ],
                hoverinfo="text",
                marker=dict(size=14, symbol=symbol, color=colour, line=dict(width=1, color="black")),
                unselected=dict(marker=dict(opacity=0.6), textfont=dict(color="#555555")),
                name=legend,
            )
        )
    ticks = layer_ticks(view.nodes)
    low, high = min(ticks, default=0), max(ticks, default=1)
    figure.update_layout(
        height=min(max(480, 160 + 56 * tallest), 1600),
        margin=dict(l=30, r=30, t=90, b=40),
        title=dict(text=f"{circuit.task} · {circuit.method}", y=0.98, yanchor="top"),
        xaxis=dict(
            tickmode="array",
            tickvals=list(ticks),
            ticktext=list(ticks.values()),
            range=[low - 0.4, high + 0.9],  # room for the labels right of the last layer
            showgrid=False,
            zeroline=False,
        ),
        yaxis=dict(showticklabels=False, showgrid=False, zeroline=False),
        legend=dict(orientation="h", yanchor="bottom", y=1.01, x=0, font=dict(size=11)),
        hovermode="closest",
        clickmode="event+select",
    )
    return figure


def edge_path(
    start: tuple[float, float], end: tuple[float, float], steps: int = 10
) -> list[tuple[float, float]]:
    """Points of an edge: a straight line between neighbouring columns; an arc bowing upward by
    a fifth of its span when it skips columns, so edges along one row (the residual path:
    embed -> MLP -> MLP -> logits) stay apart instead of drawing over each other."""
    (x0, y0), (x1, y1) = start, end
    span = abs(x1 - x0)
    if span <= 1.05:
        return [start, end]
    bow = 0.2 * span
    points = []
    for i in range(steps + 1):
        t = i / steps
        points.append((x0 + (x1 - x0) * t, y0 + (y1 - y0) * t + 4 * bow * t * (1 - t)))
    return points


def add_edge_traces(
    figure: go.Figure,
    edges: list,
    weight_of,
    points_of,
    top: float,
    width: tuple[float, float],
    opacity: tuple[float, float],
    bins: int = 4,
) -> None:
    """Edges as a few line traces, one per (sign, width bin) (one trace per edge is slow at
    hundreds), not hoverable. `weight_of(edge)` the signed weight binned against `top`,
    `points_of(edge)` its [(x, y), ...] path; a bin b draws at width[0] + width[1]·b and
    opacity[0] + opacity[1]·b. Shared by the circuit and the attribution-graph figures."""
    groups: dict[tuple[bool, int], list] = {}
    for edge in edges:
        strength = min(int(bins * abs(weight_of(edge)) / top), bins - 1)
        groups.setdefault((weight_of(edge) >= 0, strength), []).append(edge)
    legend_done = set()
    for (positive, strength), group in sorted(groups.items()):
        xs, ys = [], []
        for edge in group:
            points = points_of(edge)
            xs += [x for x, _ in points] + [None]
            ys += [y for _, y in points] + [None]
        colour = (POSITIVE if positive else NEGATIVE).format(opacity[0] + opacity[1] * strength)
        figure.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                hoverinfo="skip",
                line=dict(width=width[0] + width[1] * strength, color=colour),
                name="positive edge" if positive else "negative edge",
                legendgroup="positive" if positive else "negative",
                showlegend=positive not in legend_done,
            )
        )
        legend_done.add(positive)


def _draw_edges(figure: go.Figure, edges: list[Edge], position: dict, top: float, bins: int = 4) -> None:
    """Edges as a few line traces (`add_edge_traces`), then one trace of invisible midpoints
    that shows each edge's score on hover."""
    paths = {id(e): edge_path(position[e.source], position[e.target]) for e in edges}
    add_edge_traces(
        figure, edges, lambda e: e.score, lambda e: paths[id(e)], top, (0.8, 1.6), (0.35, 0.15), bins
    )
    if edges:
        middles = [_middle(paths[id(e)]) for e in edges]
        figure.add_trace(
            go.Scatter(
                x=[x for x, _ in middles],
                y=[y for _, y in middles],
                mode="markers",
                marker=dict(size=6, opacity=0),
                hovertext=[
                    f"{e.source} → {e.target}{f' ({e.input})' if e.input else ''}: {e.score:.4g}"
                    for e in edges
                ],
                hoverinfo="text",
                showlegend=False,
                name="edge scores",
            )
        )


def _middle(points: list[tuple[float, float]]) -> tuple[float, float]:
    if len(points) == 2:
        return ((points[0][0] + points[1][0]) / 2, (points[0][1] + points[1][1]) / 2)
    return points[len(points) // 2]
