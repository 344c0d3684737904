"""Attribution graphs on the Circuits page: reading a circuit JSON of kind "attribution-graph"
(written by `workbench circuits --transcoders`, `circuits.graphs`), re-pruning it by node
influence, and its plotly figure. No Streamlit here, so each piece is tested directly.

Layout (as circuit-tracer's and Neuronpedia's graph views): token positions on x (the token
strings as tick labels), layers on y (the token embeddings at the bottom, layer -1; the logits on
top, layer n_layers); the nodes of one (layer, position) cell side by side within it. Node size
follows the node's own share of the targets' influence, colour its type; an edge is a line whose
width follows |weight| and colour its sign.

A node's "influence" in the file is circuit-tracer's cumulative share (`circuits.graph_prune`):
the nodes sorted by influence on the targets, the running sum over the total, so the strongest
node has the smallest value. A node's own share is its "share" when the file gives one, else the
step from the previous cumulative value among the file's nodes. Re-pruning at τ keeps the feature
and error nodes whose cumulative share is at most the first one ≥ τ (circuit-tracer's rule), so it
only tightens what the file holds (pruned at `pruning.node_threshold`); embeddings and logits
always stay; an edge stays when both its ends do.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from app.explorer.circuit_plot import add_edge_traces
from circuits.graph import CircuitError
from workbench.store import STORE_FILE

KIND = "attribution-graph"
NODE_TYPES = {  # type: (legend name, marker symbol, colour)
    "embedding": ("token embedding", "square", "#7f7f7f"),
    "feature": ("transcoder feature", "circle", "#ff7f0e"),
    "error": ("error (what the transcoder misses)", "x", "#8c564b"),
    "logit": ("output logit", "star", "#d62728"),
}
PRUNED_TYPES = ("feature", "error")
"""The node types the influence slider removes; embeddings and logits always stay."""
MAX_LAYERS = 1024
"""The most layers a graph file may draw (the logits' layer): more is a corrupt file, not a model."""
SLOT = 0.5
"""Horizontal room of one node, in units of a token column: a position whose busiest cell holds
more nodes than fit in one unit gets a wider column (the last position usually holds most)."""


@dataclass
class GraphNode:
    id: str
    type: str
    layer: int
    position: int
    feature: int | None = None
    activation: float | None = None
    influence: float = 0.0
    """Cumulative influence share (see the module docstring): smaller is stronger."""
    label: str = ""
    share: float | None = None
    """The node's own share of the influence (the file's "share", else derived by `own_shares`)."""


@dataclass
class GraphEdge:
    source: str
    target: str
    weight: float


@dataclass
class AttributionGraphFile:
    """An attribution graph as the explorer reads it (the fields of the JSON it draws)."""

    nodes: list[GraphNode]
    edges: list[GraphEdge]
    model: str = ""
    prompt: str = ""
    token_strings: list[str] = field(default_factory=list)
    transcoders: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    pruning: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def node_threshold(self) -> float:
        """The influence share the file was pruned at (1 when it does not say)."""
        value = self.pruning.get("node_threshold")
        return float(value) if isinstance(value, (int, float)) and 0 < value <= 1 else 1.0

    @property
    def n_layers(self) -> int:
        logits = [n.layer for n in self.nodes if n.type == "logit"]
        return max(logits) if logits else max((n.layer + 1 for n in self.nodes), default=0)

    def store_of(self, node: GraphNode) -> str | None:
        """The feature store of `node`'s transcoder (the entry of its layer): the one the file
        names, else its folder's features.duckdb when `workbench analyze` built it afterwards."""
        for entry in self.transcoders:
            if entry.get("layer") != node.layer:
                continue
            if entry.get("store"):
                return str(entry["store"])
            built = Path(str(entry.get("path") or "")) / STORE_FILE
            return str(built) if entry.get("path") and built.is_file() else None
        return None


def is_attribution_graph(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("kind") == KIND


def read_graph(obj: dict, where: str = "graph", folder: Path | None = None) -> AttributionGraphFile:
    """The graph in a parsed JSON object; CircuitError (one line) for what the explorer cannot
    draw: another format_version, nodes or edges missing fields, an edge naming an unknown node,
    a non-finite number, a position outside the token list, a layer outside the model's.
    A relative store path is read against `folder` (the JSON's), else the current folder."""
    if obj.get("format_version") != 1:
        raise CircuitError(
            f"{where}: unknown format_version {obj.get('format_version')!r} (this workbench reads 1)"
        )
    nodes = [_node(n, f"{where}: node {i}") for i, n in enumerate(_list(obj, "nodes", where))]
    ids = {n.id for n in nodes}
    if len(ids) != len(nodes):
        raise CircuitError(f"{where}: duplicate node ids")
    edges = []
    for i, e in enumerate(_list(obj, "edges", where)):
        try:
            edge = GraphEdge(str(e["source"]), str(e["target"]), float(e["weight"]))
        except (KeyError, TypeError, ValueError):
            raise CircuitError(f"{where}: edge {i} needs source, target and a numeric weight") from None
        if edge.source not in ids or edge.target not in ids:
            raise CircuitError(f"{where}: edge {edge.source!r} -> {edge.target!r} names an unknown node")
        edges.append(edge)
    transcoders = [dict(t) for t in obj.get("transcoders") or [] if isinstance(t, dict)]
    for entry in transcoders:
        entry["store"] = _resolved(entry.get("store"), folder)
    parts = {key: obj.get(key) or {} for key in ("pruning", "metrics", "config")}
    if not all(isinstance(v, dict) for v in parts.values()):
        raise CircuitError(f"{where}: pruning, metrics and config must be objects")
    token_strings = [str(t) for t in obj.get("token_strings") or []]
    _check_numbers(nodes, edges, len(token_strings) or len(obj.get("tokens") or []), where)
    own_shares(nodes)
    return AttributionGraphFile(
        nodes,
        edges,
        model=str(obj.get("model", "")),
        prompt=str(obj.get("prompt", "")),
        token_strings=token_strings,
        transcoders=transcoders,
        targets=[t for t in obj.get("targets") or [] if isinstance(t, dict)],
        **parts,
    )


def load_graph_file(path: str | Path) -> AttributionGraphFile | None:
    """The attribution graph at `path`; None when the file holds another kind of circuit (or is
    not JSON: the ordinary circuit reader says why)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return read_graph(obj, str(path), Path(path).absolute().parent) if is_attribution_graph(obj) else None


def _list(obj: dict, key: str, where: str) -> list:
    value = obj.get(key)
    if not isinstance(value, list):
        raise CircuitError(f"{where}: {key!r} must be a list")
    return value


def _node(raw: object, where: str) -> GraphNode:
    if not isinstance(raw, dict):
        raise CircuitError(f"{where}: expected an object")
    try:
        node = GraphNode(
            id=str(raw["id"]),
            type=str(raw["type"]),
            layer=int(raw["layer"]),
            position=int(raw["position"]),
            feature=None if raw.get("feature") is None else int(raw["feature"]),
            activation=None if raw.get("activation") is None else float(raw["activation"]),
            influence=float(raw.get("influence") or 0.0),
            label=str(raw.get("label") or ""),
            share=None if raw.get("share") is None else float(raw["share"]),
        )
    except KeyError as exc:
        raise CircuitError(f"{where}: missing {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise CircuitError(f"{where}: {exc}") from None
    if node.type not in NODE_TYPES:
        raise CircuitError(f"{where}: unknown type {node.type!r} (one of {', '.join(NODE_TYPES)})")
    if node.type == "feature" and node.feature is None:
        raise CircuitError(f"{where}: a feature node names no feature")
    return node


def _check_numbers(nodes: list[GraphNode], edges: list[GraphEdge], n_tokens: int, where: str) -> None:
    """CircuitError (one line) for a NaN/Inf weight, activation, influence or share (the figure
    cannot place or size it), a position outside the prompt's `n_tokens` tokens, a layer outside
    -1 (embeddings) .. the logits' layer (the model's n_layers, at most MAX_LAYERS) or a negative
    feature id: each would otherwise stop the page or stall it laying out a million columns."""
    for edge in edges:
        if not math.isfinite(edge.weight):
            raise CircuitError(f"{where}: edge {edge.source} -> {edge.target} has weight {edge.weight}")
    if nodes and n_tokens == 0:
        raise CircuitError(f"{where}: no token_strings (or tokens) to place the nodes on")
    logit_layers = {n.layer for n in nodes if n.type == "logit"}
    if len(logit_layers) > 1:
        raise CircuitError(f"{where}: logit nodes on several layers {sorted(logit_layers)}")
    top = next(iter(logit_layers), max((n.layer + 1 for n in nodes), default=0))
    if not 0 <= top <= MAX_LAYERS:
        raise CircuitError(f"{where}: the logits' layer {top} is outside 0..{MAX_LAYERS}")
    for node in nodes:
        for name in ("activation", "influence", "share"):
            value = getattr(node, name)
            if value is not None and not math.isfinite(value):
                raise CircuitError(f"{where}: node {node.id} has {name} {value}")
        if not 0 <= node.position < n_tokens:
            raise CircuitError(
                f"{where}: node {node.id} is at position {node.position}; the prompt has {n_tokens} tokens"
            )
        wanted = {"embedding": (-1, -1), "logit": (top, top)}.get(node.type, (0, top - 1))
        if not wanted[0] <= node.layer <= wanted[1]:
            raise CircuitError(
                f"{where}: {node.type} node {node.id} is on layer {node.layer} "
                f"(its layers: {wanted[0]}..{wanted[1]})"
            )
        if node.feature is not None and node.feature < 0:
            raise CircuitError(f"{where}: node {node.id} names feature {node.feature}")


def _resolved(store: object, folder: Path | None) -> str | None:
    if not store:
        return None
    path = Path(str(store)).expanduser()
    if path.is_absolute():
        return str(path)
    for candidate in ([folder / path] if folder else []) + [path.absolute()]:
        if candidate.exists():
            return str(candidate)
    return str(store)


def own_shares(nodes: list[GraphNode]) -> None:
    """Fill each ranked node's `share` the file does not give (logits are not ranked: 0): its
    cumulative influence minus the previous node's, in cumulative order (an upper bound where
    the file dropped nodes between them)."""
    previous = 0.0
    for node in sorted((n for n in nodes if n.type != "logit"), key=lambda n: n.influence):
        if node.share is None:
            node.share = max(node.influence - previous, 0.0)
        previous = node.influence
    for node in nodes:
        if node.share is None:
            node.share = 0.0


# --- pruning -----------------------------------------------------------------------------------
def pruned(graph: AttributionGraphFile, threshold: float) -> tuple[list[GraphNode], list[GraphEdge]]:
    """The nodes and edges kept at influence share `threshold` (see the module docstring); at or
    above the file's own threshold, everything in the file."""
    if threshold >= graph.node_threshold:
        return list(graph.nodes), list(graph.edges)
    ranked = [n.influence for n in graph.nodes if n.type != "logit"]
    cutoff = min((v for v in ranked if v >= threshold), default=math.inf)
    nodes = [n for n in graph.nodes if n.type not in PRUNED_TYPES or n.influence <= cutoff]
    ids = {n.id for n in nodes}
    return nodes, [e for e in graph.edges if e.source in ids and e.target in ids]


# --- names and the figure ------------------------------------------------------------------------
def token_text(graph: AttributionGraphFile, position: int) -> str:
    """The token at `position`, quoted with its spaces and newlines visible ('?' when unknown)."""
    strings = graph.token_strings
    return repr(strings[position]) if 0 <= position < len(strings) else "?"


def node_name(graph: AttributionGraphFile, node: GraphNode) -> str:
    """How a reader names a node: L1 #12 @3, error L1 @3, token 'the' @3, logit ' the'."""
    if node.type == "feature":
        return f"L{node.layer} #{node.feature} @{node.position}"
    if node.type == "error":
        return f"error L{node.layer} @{node.position}"
    if node.type == "embedding":
        return f"token {token_text(graph, node.position)} @{node.position}"
    return f"logit {node.label or node.id}"


def hover_text(graph: AttributionGraphFile, node: GraphNode, description: str = "") -> str:
    """A node's hover: name, feature id, activation, influence, label (the store's description
    of a feature when given, else the file's label)."""
    lines = [f"<b>{node_name(graph, node)}</b> · {NODE_TYPES[node.type][0]}"]
    if node.type == "feature":
        lines.append(f"feature {node.feature} of layer {node.layer}'s transcoder")
    lines.append(f"at {token_text(graph, node.position)} (position {node.position})")
    numbers = [f"influence share {node.share:.3g} (cumulative {node.influence:.3g})"]
    if node.activation is not None:
        numbers.insert(0, f"activation {node.activation:.3g}")
    lines.append(" · ".join(numbers))
    text = description or (node.label if node.type == "feature" else "")
    if text:
        lines.append(_short(text, 80))
    return "<br>".join(lines)


def _short(text: str, width: int) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


def column_centres(graph: AttributionGraphFile, nodes: list[GraphNode]) -> list[float]:
    """The x of each token position's column centre: columns are 1 wide, or SLOT per node of their
    busiest (layer, position) cell when that is wider, side by side from 0."""
    n_positions = max(len(graph.token_strings), max((n.position + 1 for n in graph.nodes), default=1))
    busiest = [0] * n_positions
    cells: dict[tuple[int, int], int] = {}
    for node in nodes:
        cells[node.layer, node.position] = cells.get((node.layer, node.position), 0) + 1
        busiest[node.position] = max(busiest[node.position], cells[node.layer, node.position])
    widths = [max(1.0, (count + 1) * SLOT) for count in busiest]
    ends = list(itertools.accumulate(widths))
    return [end - width / 2 for end, width in zip(ends, widths)]


def node_positions(
    graph: AttributionGraphFile, nodes: list[GraphNode], centres: list[float] | None = None
) -> dict[str, tuple[float, float]]:
    """Node id -> (x, y): x around its token's column centre (`column_centres`), the nodes of one
    (layer, position) cell side by side, strongest influence first, errors last; y the layer."""
    centres = centres or column_centres(graph, nodes)
    cells: dict[tuple[int, int], list[GraphNode]] = {}
    for node in nodes:
        cells.setdefault((node.layer, node.position), []).append(node)
    out = {}
    for (layer, position), group in cells.items():
        group.sort(key=lambda n: (n.type == "error", n.influence, n.id))
        step = min(SLOT, 0.8 / len(group)) if len(group) * SLOT <= 1 else SLOT
        for slot, node in enumerate(group):
            out[node.id] = (centres[position] + (slot - (len(group) - 1) / 2) * step, float(layer))
    return out


def marker_size(influence: float, largest: float) -> float:
    """7 to 22 px, by the square root of the node's own influence share (area follows it)."""
    share = max(influence, 0.0) / largest if largest > 0 else 0.0
    return 7.0 + 15.0 * math.sqrt(min(share, 1.0))


def graph_figure(
    graph: AttributionGraphFile,
    nodes: list[GraphNode],
    edges: list[GraphEdge],
    descriptions: dict[str, str] | None = None,
) -> go.Figure:
    """The figure of `nodes` and `edges` (a `pruned` view of `graph`). `descriptions`: node id ->
    the store's description of a feature (hover). Each node's id rides in `customdata` so a click
    can be resolved."""
    descriptions = descriptions or {}
    centres = column_centres(graph, nodes)
    position = node_positions(graph, nodes, centres)
    figure = go.Figure()
    _draw_edges(figure, graph, edges, position)
    largest = max((n.share for n in nodes if n.type in PRUNED_TYPES), default=0.0)
    for kind, (legend, symbol, colour) in NODE_TYPES.items():
        group = [n for n in nodes if n.type == kind]
        if not group:
            continue
        sizes = [16.0 if kind in ("embedding", "logit") else marker_size(n.share, largest) for n in group]
        figure.add_trace(
            go.Scatter(
                x=[position[n.id][0] for n in group],
                y=[position[n.id][1] for n in group],
                mode="markers",
                customdata=[n.id for n in group],
                hovertext=[hover_text(graph, n, descriptions.get(n.id, "")) for n in group],
                hoverinfo="text",
                marker=dict(size=sizes, symbol=symbol, color=colour, line=dict(width=1, color="black")),
                unselected=dict(marker=dict(opacity=0.7)),
                name=legend,
            )
        )
    layers = list(range(-1, graph.n_layers + 1))
    figure.update_layout(
        height=min(max(420, 140 + 80 * len(layers)), 1400),
        margin=dict(l=30, r=30, t=70, b=90),
        xaxis=dict(
            tickmode="array",
            tickvals=centres,
            ticktext=[_short(token_text(graph, p), 12) for p in range(len(centres))],
            tickangle=-45,
            range=[
                min([x for x, _ in position.values()] + centres) - 0.6,
                max([x for x, _ in position.values()] + centres) + 0.6,
            ],
            showgrid=False,
            zeroline=False,
        ),
        yaxis=dict(
            tickmode="array",
            tickvals=layers,
            ticktext=["embeddings"] + [f"layer {i}" for i in layers[1:-1]] + ["logits"],
            range=[-1.6, graph.n_layers + 0.6],
            zeroline=False,
        ),
        legend=dict(orientation="h", yanchor="bottom", y=1.01, x=0, font=dict(size=11)),
        hovermode="closest",
        clickmode="event+select",
    )
    return figure


def _draw_edges(
    figure: go.Figure, graph: AttributionGraphFile, edges: list[GraphEdge], position: dict, bins: int = 4
) -> None:
    """Edges as a few line traces (sign x width bin: one trace per edge is slow at hundreds), not
    hoverable: hover points on thousands of edges would catch the clicks meant for the nodes (the
    node details and the edges table give the weights)."""
    top = max((abs(e.weight) for e in edges), default=1.0) or 1.0
    add_edge_traces(
        figure,
        edges,
        lambda e: e.weight,
        lambda e: (position[e.source], position[e.target]),
        top,
        (0.6, 1.4),
        (0.3, 0.15),
        bins,
    )
