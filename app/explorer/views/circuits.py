"""Circuits: every circuit JSON under the runs folders (and `--circuits` folders) as a layered graph
with a legend and a |score| threshold, its metrics and prompts, and each node's edges on click. An
attribution graph (kind "attribution-graph") has a view of its own (`app.explorer.attribution_view`)."""

import json
import os
from pathlib import Path

import streamlit as st

from app.explorer.attribution_graph import is_attribution_graph, load_graph_file, read_graph
from app.explorer.attribution_view import show_attribution_graph
from app.explorer.circuit_info import (
    config_table,
    curve_figure,
    edges_table,
    find_circuit_files,
    metrics_table,
    node_edges,
    prompts_note,
    prompts_table,
    search_folders,
)
from app.explorer.circuit_plot import circuit_figure, default_threshold, display_name, shown
from app.explorer.data import cached, describe_feature, go_to_feature, open_store, store_paths, store_roots
from app.explorer.launch import CIRCUITS_ENV
from circuits.graph import Circuit, CircuitError, load_circuit
from workbench.errors import WorkbenchError


@cached("cache_data", ttl=30, show_spinner=False)
def circuit_files(entries: tuple[str, ...], stores: tuple[str, ...]) -> list[str]:
    return find_circuit_files(search_folders(entries, stores))


def _label(path: str) -> str:
    """A circuit file as the picker shows it: its name, then its folder."""
    return f"{Path(path).name}  ·  {Path(path).parent}"


def _store(path: str | None):
    try:
        return open_store(path) if path else None
    except (WorkbenchError, OSError):
        return None


def node_names(circuit: Circuit) -> tuple[dict[str, str], dict[str, str]]:
    """({node id: '#12 · description'} of feature nodes whose store is here, {node id: 'code'}
    for the features of codebook stores)."""
    names, kinds = {}, {}
    for node in circuit.nodes:
        if node.kind != "feature" or node.feature is None:
            continue
        store = _store(node.store)
        text = describe_feature(store, node.feature) if store is not None else ""
        names[node.id] = f"#{node.feature} · {text}" if text else f"#{node.feature}"
        if store is not None and store.meta.get("architecture") == "codebook":
            kinds[node.id] = "code"
    return names, kinds


def pick_circuit() -> tuple[Circuit, str] | None:
    """The circuit chosen (a found file or an upload) and a key naming it; None when none."""
    entries = tuple(p for p in os.environ.get(CIRCUITS_ENV, "").split(os.pathsep) if p)
    stores = tuple(store_paths(tuple(store_roots())))
    files = circuit_files(entries + tuple(store_roots()), stores)
    source = st.selectbox("Circuit file", files, format_func=_label, key="circuit_file") if files else None
    with st.expander("Upload a circuit JSON"):
        uploaded = st.file_uploader("a *.circuit.json file", type=["json"], key="circuit_upload")
    try:
        graph = attribution_graph(uploaded, source)
        if graph is None and uploaded is not None:
            return Circuit.from_json(
                json.loads(uploaded.getvalue()), uploaded.name
            ), f"upload:{uploaded.name}"
        if graph is None and source:
            return load_circuit(source), source
    except (CircuitError, ValueError) as exc:
        st.error(str(exc))
        return None
    if graph is not None:  # kind "attribution-graph": its own view, and nothing after it
        show_attribution_graph(graph, f"upload:{uploaded.name}" if uploaded is not None else source)
        st.stop()
    st.info(
        "No circuit files (*.circuit.json) found under ./runs, the stores' folders or `--circuits` "
        "folders. Write one with `workbench circuits` (it saves under runs/circuits/)."
    )
    return None


def attribution_graph(uploaded, source: str | None):
    """The attribution graph uploaded or picked, None for another kind of circuit file."""
    if uploaded is not None:
        obj = json.loads(uploaded.getvalue())
        return read_graph(obj, uploaded.name) if is_attribution_graph(obj) else None
    return load_graph_file(source) if source else None


def show_summary(circuit: Circuit) -> None:
    """Metrics beside the prompts (folded: they are long) and the config that made the circuit."""
    left, right = st.columns([2, 3])
    left.subheader("Metrics")
    left.table(metrics_table(circuit).set_index("metric"))
    if (curve := curve_figure(circuit)) is not None:
        left.plotly_chart(curve, width="stretch", key="faithfulness_curve")
    right.subheader("Prompts")
    right.caption(prompts_note(circuit))
    prompts = prompts_table(circuit)
    if prompts is not None:
        with right.expander("clean and corrupted prompts", expanded=False):
            st.table(prompts)
    if circuit.config:
        with right.expander("How it was made (rerun: `workbench circuits --config FILE`)"):
            st.table(config_table(circuit).set_index("setting"))


def threshold_slider(circuit: Circuit, only: bool, key: str) -> float:
    """The |score| threshold; its default (about the top 100 edges drawn) is set again when the
    circuit or the in-circuit toggle changes."""
    top = max((abs(e.score) for e in circuit.edges), default=0.0)
    if st.session_state.get("edge_threshold_for") != (key, only):
        st.session_state["edge_threshold_for"] = (key, only)
        st.session_state["edge_threshold"] = default_threshold(circuit, only)
    st.session_state["edge_threshold"] = min(float(st.session_state.get("edge_threshold", 0.0)), top)
    return st.slider(
        "Hide edges (and nodes) with |score| below",
        0.0,
        max(top, 1e-12),
        step=max(top, 1e-12) / 500,
        format="%.4g",
        key="edge_threshold",
    )


def chosen_node(circuit: Circuit, points: list, names: dict[str, str]) -> str | None:
    """The node picked by a click (a new click wins) or in the node picker below the graph."""
    ids = [n.id for n in circuit.nodes]
    clicked = next((p.get("customdata") for p in points if p.get("customdata") in ids), None)
    if clicked is not None and clicked != st.session_state.get("circuit_clicked"):
        st.session_state["circuit_node"] = clicked  # before the picker is drawn
    st.session_state["circuit_clicked"] = clicked
    if st.session_state.get("circuit_node") not in ids:
        st.session_state["circuit_node"] = None
    return st.selectbox(
        "Node details (click a node, or pick one)",
        [None, *ids],
        format_func=lambda i: "—" if i is None else f"{names[i]}  ({i})" if names[i] != i else i,
        key="circuit_node",
    )


def show_node(circuit: Circuit, node_id: str, names: dict[str, str]) -> None:
    node = next(n for n in circuit.nodes if n.id == node_id)
    st.markdown(f"**{names[node.id]}** · {node.kind} · score {node.score:.4g}")
    if node.kind == "feature" and node.feature is not None:
        store = _store(node.store)
        if store is None:
            st.caption(f"its feature store {node.store!r} is not on this machine")
        else:
            st.caption(f"feature {node.feature} of {node.store}")
            if st.button(f"Open feature #{node.feature}", key="circuit_open_feature"):
                go_to_feature(node.feature, node.store)
    incoming, outgoing = node_edges(circuit, node.id)
    incoming["from"], outgoing["to"] = incoming["from"].map(names), outgoing["to"].map(names)
    a, b = st.columns(2)
    a.caption(f"{len(incoming)} incoming edges")
    a.dataframe(incoming, hide_index=True, key="node_in")
    b.caption(f"{len(outgoing)} outgoing edges")
    b.dataframe(outgoing, hide_index=True, key="node_out")


st.title("Circuits")
picked = pick_circuit()
if picked is None:
    st.stop()
circuit, circuit_key = picked
model = circuit.metrics.get("model") or circuit.config.get("model") or ""
st.caption(f"task **{circuit.task}** · method **{circuit.method}**" + (f" · model {model}" if model else ""))
names, kinds = node_names(circuit)
names = {n.id: names.get(n.id) or display_name(n) for n in circuit.nodes}
left, right = st.columns([1, 3])
only = left.toggle(
    "Circuit only", value=True, key="only_circuit", help="Hide the nodes and edges the method did not keep"
)
with right:
    threshold = threshold_slider(circuit, only, circuit_key)
view = shown(circuit, only, threshold)
st.caption(
    f"{len(view.edges)} of {view.candidates} edges drawn (|score| ≥ {threshold:.4g}), "
    f"{len(view.nodes)} nodes; edge width follows |score|; click a node for its edges"
)
event = st.plotly_chart(
    circuit_figure(circuit, only, threshold, names, kinds),
    on_select="rerun",
    selection_mode="points",
    key="circuit_graph",
)
try:  # a plotly selection event (item access: a dict when set through session state)
    points = list(event["selection"]["points"])
except (KeyError, TypeError):
    points = []
node_id = chosen_node(circuit, points, names)
if node_id is not None:
    show_node(circuit, node_id, names)
show_summary(circuit)

st.subheader("Edges drawn, by |score|")
drawn = edges_table(view.edges)  # named as the graph names them (L3.H1, MLP 0), ids kept
drawn.insert(0, "from", drawn.source.map(names))
drawn.insert(1, "to", drawn.target.map(names))
st.dataframe(drawn, hide_index=True, key="circuit_edges")
