"""Circuits: draw a circuit JSON from the circuits engine; click a feature node to open it."""

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from app.explorer.circuit_plot import circuit_figure
from app.explorer.data import cached, clicked_feature, go_to_feature, store_roots
from circuits.graph import Circuit, CircuitError, load_circuit

CIRCUITS_ENV = "WORKBENCH_CIRCUITS"


@cached("cache_data", ttl=30, show_spinner=False)
def circuit_files(roots: tuple[str, ...]) -> list[str]:
    found = []
    for root in map(Path, roots):
        folder = root if root.is_dir() else root.parent
        found.extend(str(p) for p in sorted(folder.rglob("*.circuit.json")))
    return sorted(set(found))


st.title("Circuits")
given = [p for p in os.environ.get(CIRCUITS_ENV, "").split(os.pathsep) if p]
files = given + [f for f in circuit_files(tuple(store_roots())) if f not in given]
source = st.selectbox("Circuit file", files, key="circuit_file") if files else None
uploaded = st.file_uploader("or upload a circuit JSON", type=["json"], key="circuit_upload")
try:
    if uploaded is not None:
        import json

        circuit = Circuit.from_json(json.loads(uploaded.getvalue()), uploaded.name)
    elif source:
        circuit = load_circuit(source)
    else:
        st.info("No circuit files (*.circuit.json) found. Write one with `workbench circuits --out FILE`.")
        st.stop()
except (CircuitError, ValueError) as exc:
    st.error(str(exc))
    st.stop()

if circuit.metrics:
    st.json(circuit.metrics, expanded=False)
only = st.toggle("Only nodes and edges in the circuit", value=True, key="only_circuit")
event = st.plotly_chart(
    circuit_figure(circuit, only), on_select="rerun", selection_mode="points", key="circuit_graph"
)
points = event.selection.points if event is not None and event.selection else []
target = clicked_feature(circuit, points)
if target is not None:
    store, feature = target
    if store:
        st.session_state["store"] = store
    go_to_feature(feature)
elif points:
    st.write(f"selected: {', '.join(str(p.get('customdata')) for p in points)}")

st.subheader("Edges by |score|")
edges = pd.DataFrame([e.__dict__ for e in circuit.edges])
if not edges.empty:
    st.dataframe(edges.reindex(edges.score.abs().sort_values(ascending=False).index), hide_index=True)
