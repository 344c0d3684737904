"""The circuit graph of the Circuits page (plotly): nodes by layer, a legend of node kinds and edge
signs, edges below a |score| threshold hidden, and what a reader needs to name a node."""

from __future__ import annotations

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


def _positions(nodes: list[Node]) -> tuple[dict[str, tuple[int, float]], int]:
    """Node id -> (layer, slot): each layer's nodes top to bottom, centred on 0; and the most
    nodes in one layer."""
    per_layer: dict[int, list[str]] = {}
    for node in sorted(nodes, key=lambda n: (n.layer, n.kind, -abs(n.score), n.id)):
        per_layer.setdefault(node.layer, []).append(node.id)
    position = {}
    for layer, ids in per_layer.items():
        for slot, node_id in enumerate(ids):
            position[node_id] = (layer, (len(ids) - 1) / 2 - slot)
    return position, max((len(ids) for ids in per_layer.values()), default=1)


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
        full = [names.get(n.id) or n.label or n.id for n in group]
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
                name=legend,
                legendgroup="nodes",
                legendgrouptitle_text="nodes",
            )
        )
    ticks = layer_ticks(view.nodes)
    low, high = min(ticks, default=0), max(ticks, default=1)
    figure.update_layout(
        height=min(220 + 44 * tallest, 1400),
        margin=dict(l=40, r=40, t=50, b=60),
        title=f"{circuit.task} · {circuit.method}",
        xaxis=dict(
            tickmode="array",
            tickvals=list(ticks),
            ticktext=list(ticks.values()),
            range=[low - 0.4, high + 0.9],  # room for the labels right of the last layer
            showgrid=False,
            zeroline=False,
        ),
        yaxis=dict(showticklabels=False, showgrid=False, zeroline=False),
        legend=dict(orientation="h", yanchor="top", y=-0.06, x=0),
        hovermode="closest",
        clickmode="event+select",
    )
    return figure


def _draw_edges(figure: go.Figure, edges: list[Edge], position: dict, top: float, bins: int = 4) -> None:
    """Edges as a few line traces (sign x width bin: one trace per edge is slow at hundreds),
    then one trace of invisible midpoints that shows each edge's score on hover."""
    groups: dict[tuple[bool, int], list[Edge]] = {}
    for edge in edges:
        strength = min(int(bins * abs(edge.score) / top), bins - 1)
        groups.setdefault((edge.score >= 0, strength), []).append(edge)
    legend_done = set()
    for (positive, strength), group in sorted(groups.items()):
        xs, ys = [], []
        for edge in group:
            (x0, y0), (x1, y1) = position[edge.source], position[edge.target]
            xs += [x0, x1, None]
            ys += [y0, y1, None]
        opacity = 0.35 + 0.15 * strength
        figure.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                hoverinfo="skip",
                line=dict(
                    width=0.8 + 1.6 * strength, color=(POSITIVE if positive else NEGATIVE).format(opacity)
                ),
                name="positive edge" if positive else "negative edge",
                legendgroup="positive" if positive else "negative",
                showlegend=positive not in legend_done,
            )
        )
        legend_done.add(positive)
    if edges:
        figure.add_trace(
            go.Scatter(
                x=[(position[e.source][0] + position[e.target][0]) / 2 for e in edges],
                y=[(position[e.source][1] + position[e.target][1]) / 2 for e in edges],
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
