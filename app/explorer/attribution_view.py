"""The Circuits page's view of an attribution graph (kind "attribution-graph"): the prompt and its
target logits, the graph (`app.explorer.attribution_graph`) with an influence slider that only
tightens the file's pruning, hover with each feature's store description, and a click on a
feature node that opens its page in its transcoder's store (other nodes show their edges)."""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from app.explorer.attribution_graph import (
    AttributionGraphFile,
    GraphNode,
    graph_figure,
    node_name,
    pruned,
)
from app.explorer.data import descriptions, go_to_feature, open_store
from workbench.errors import WorkbenchError

CHART_KEY = "attribution_graph"


def _store(path: str | None):
    try:
        return open_store(os.path.realpath(path)) if path and os.path.isfile(path) else None
    except (WorkbenchError, OSError):
        return None


def feature_descriptions(graph: AttributionGraphFile) -> dict[str, str]:
    """{node id: the store's description} of the feature nodes whose store is on this machine."""
    wanted: dict[str, list[GraphNode]] = {}
    for node in graph.nodes:
        if node.type == "feature" and (path := graph.store_of(node)):
            wanted.setdefault(path, []).append(node)
    out = {}
    for path, nodes in wanted.items():
        store = _store(path)
        if store is None:
            continue
        found = descriptions(store, sorted({n.feature for n in nodes if n.feature < store.n_latents}))
        out.update({n.id: found[n.feature] for n in nodes if found.get(n.feature)})
    return out


def influence_slider(graph: AttributionGraphFile, key: str) -> float:
    """The influence share kept (at most the file's own; reset when another graph is shown)."""
    top = graph.node_threshold
    if st.session_state.get("graph_threshold_for") != key:
        st.session_state["graph_threshold_for"] = key
        st.session_state["graph_node_threshold"] = top
    return st.slider(
        "Keep the strongest feature and error nodes, up to this cumulative share of the influence",
        0.01,
        max(top, 0.01),
        step=0.01,
        key="graph_node_threshold",
        help=f"the file was pruned at {top:g}: the slider can only prune further",
    )


def clicked_node(graph: AttributionGraphFile, event) -> str | None:
    """A node id newly clicked in the chart (the last handled click is remembered in a plain
    session key, so a selection Streamlit kept does not act twice), else None."""
    try:
        points = list(event["selection"]["points"])
    except (KeyError, TypeError):
        points = []
    ids = {n.id for n in graph.nodes}
    clicked = next((p.get("customdata") for p in points if p.get("customdata") in ids), None)
    previous = st.session_state.get("graph_clicked")
    st.session_state["graph_clicked"] = clicked
    return clicked if clicked != previous else None


def show_attribution_graph(graph: AttributionGraphFile, key: str) -> None:
    targets = ", ".join(
        f"{t.get('token_string', t.get('token'))!r} (p {t.get('probability', float('nan')):.3g})"
        for t in graph.targets
    )
    st.caption(
        f"attribution graph · model **{graph.model or '?'}** · {len(graph.token_strings)} tokens"
        + (f" · targets {targets}" if targets else "")
    )
    st.markdown(f"> {graph.prompt}" if graph.prompt else "")
    threshold = influence_slider(graph, key)
    nodes, edges = pruned(graph, threshold)
    names = {n.id: node_name(graph, n) for n in graph.nodes}
    texts = feature_descriptions(graph)
    features = sum(n.type == "feature" for n in nodes)
    st.caption(
        f"{features} of {sum(n.type == 'feature' for n in graph.nodes)} features, {len(edges)} of "
        f"{len(graph.edges)} edges drawn; size follows influence, edge width |weight| (blue +, red −); "
        "click a feature to open its page, another node for its edges"
    )
    event = st.plotly_chart(
        graph_figure(graph, nodes, edges, texts), on_select="rerun", selection_mode="points", key=CHART_KEY
    )
    by_id = {n.id: n for n in graph.nodes}
    clicked = clicked_node(graph, event)
    if clicked is not None:
        node = by_id[clicked]
        if node.type == "feature" and _store(graph.store_of(node)) is not None:
            go_to_feature(node.feature, graph.store_of(node))
        st.session_state["graph_node"] = clicked  # before the picker is drawn
    if st.session_state.get("graph_node") not in by_id:
        st.session_state["graph_node"] = None
    chosen = st.selectbox(
        "Node details (click a node, or pick one)",
        [None, *(n.id for n in nodes)],
        format_func=lambda i: "—" if i is None else names[i],
        key="graph_node",
    )
    if chosen is not None:
        show_node(graph, by_id[chosen], edges, names, texts.get(chosen, ""))
    show_tables(graph, edges, names)


def show_node(graph, node: GraphNode, edges, names: dict[str, str], description: str) -> None:
    activation = "" if node.activation is None else f" · activation {node.activation:.4g}"
    st.markdown(
        f"**{names[node.id]}** · {node.type} · influence share {node.share:.4g} "
        f"(cumulative {node.influence:.4g}){activation}"
    )
    if description or node.label:
        st.caption(description or node.label)
    if node.type == "feature":
        store = graph.store_of(node)
        if _store(store) is None:
            st.caption(f"its transcoder's feature store {store!r} is not on this machine")
        elif st.button(f"Open feature #{node.feature}", key="graph_open_feature"):
            go_to_feature(node.feature, store)
    a, b = st.columns(2)
    for column, mine, other, title in ((a, "target", "source", "from"), (b, "source", "target", "to")):
        rows = sorted((e for e in edges if getattr(e, mine) == node.id), key=lambda e: -abs(e.weight))
        column.caption(f"{len(rows)} {'incoming' if title == 'from' else 'outgoing'} edges drawn")
        column.dataframe(
            pd.DataFrame(
                [{title: names[getattr(e, other)], "weight": e.weight} for e in rows],
                columns=[title, "weight"],
            ),
            hide_index=True,
            key=f"graph_{title}",
        )


def show_tables(graph: AttributionGraphFile, edges, names: dict[str, str]) -> None:
    """The targets, the transcoders (what each reads and writes, its store), the metrics and the
    pruning, and the edges drawn."""
    left, right = st.columns([2, 3])
    left.subheader("Metrics")
    rows = [(k.replace("_", " "), _text(v)) for k, v in graph.metrics.items()]
    rows += [(f"pruning: {k.replace('_', ' ')}", _text(v)) for k, v in graph.pruning.items()]
    left.table(pd.DataFrame(rows, columns=["metric", "value"]).set_index("metric"))
    right.subheader("Targets")
    right.table(
        pd.DataFrame(
            [{k: t.get(k) for k in ("token_string", "token", "probability", "logit")} for t in graph.targets],
            columns=["token_string", "token", "probability", "logit"],
        )
    )
    right.subheader("Transcoders")
    right.table(
        pd.DataFrame(
            [
                {
                    "layer": t.get("layer"),
                    "transcoder": f"reads {t.get('hook')}, writes {t.get('out_hook')}",
                    "store": t.get("store") or "none (run `workbench analyze` on it)",
                }
                for t in graph.transcoders
            ],
            columns=["layer", "transcoder", "store"],
        )
    )
    st.subheader("Edges drawn, by |weight|")
    frame = pd.DataFrame(
        [{"from": names[e.source], "to": names[e.target], "weight": e.weight} for e in edges],
        columns=["from", "to", "weight"],
    )
    st.dataframe(
        frame.reindex(frame.weight.abs().sort_values(ascending=False).index),
        hide_index=True,
        key="graph_edges",
    )


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
