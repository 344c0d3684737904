"""The Circuits page under Streamlit's AppTest: where circuit files are found (a store path, ./runs,
`--circuits DIR`), the legend and integer layer ticks, the |score| threshold, node details, the
labeled metrics and the prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from circuits.graph import Circuit, Edge, Node, load_circuit
from tests.conftest import STORE_HOOK

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "explorer" / "main.py")


def circuits_page(monkeypatch, roots: list[str], circuits: tuple[str, ...] | list[str] = ()):
    """The Circuits page in the environment `workbench explore ROOTS --circuits ...` gives it."""
    from streamlit.testing.v1 import AppTest

    from app.explorer.launch import CIRCUITS_ENV, DEVICE_ENV, STORES_ENV, explorer_env

    env = explorer_env(roots, "cpu", circuits)
    for name in (STORES_ENV, DEVICE_ENV, CIRCUITS_ENV):
        monkeypatch.setenv(name, env[name])
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.switch_page("views/circuits.py").run()
    assert not at.exception, at.exception
    return at


def layered(n_layers: int = 5, heads: int = 6, seed: int = 0) -> Circuit:
    """A dense circuit: every head feeds every head of the next layer (150+ edges)."""
    rng = random.Random(seed)
    layers = [["embed"]] + [[f"a{i}.{h}" for h in range(heads)] for i in range(n_layers)] + [["logits"]]
    nodes = [Node("embed", "embed", 0, "embed")]
    nodes += [
        Node(i, "head", layer, f"L{layer - 1}H{i.split('.')[1]}", 1.0)
        for layer in range(1, n_layers + 1)
        for i in layers[layer]
    ]
    nodes.append(Node("logits", "logits", n_layers + 1, "logits"))
    edges = [
        Edge(s, t, rng.uniform(-1, 1), True, "q" if t.startswith("a") else "")
        for up, down in zip(layers, layers[1:])
        for s in up
        for t in down
    ]
    return Circuit(nodes, edges, task="toy", method="hand", metrics={"faithfulness": {"resample": 0.5}})


def drawn_edges(at) -> int:
    """Edges in the figure: the hover midpoints' trace holds one point per edge."""
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    return sum(len(t["x"]) for t in spec["data"] if t.get("name") == "edge scores")


def test_a_circuit_written_with_the_default_out_is_found_from_a_store_path(
    capsys, tiny_run, tmp_path, monkeypatch
):
    from tests.test_cli import run_cli

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run_cli(
        capsys, "circuits", "--task", "or-gate", "--prompts", "8", "--steps", "2", "--edges", "5"
    )
    assert code == 0, err
    written = work / "runs" / "circuits" / "or-gate-eap-ig.circuit.json"
    assert written.is_file()
    at = circuits_page(
        monkeypatch, [str(tiny_run / "features.duckdb")]
    )  # as `workbench explore STORE` in work/
    monkeypatch.chdir(elsewhere)  # the server's folders are absolute
    at.run()
    assert at.selectbox(key="circuit_file").value == str(written)
    metrics = at.table[0].value
    saved = json.loads(written.read_text())
    assert (
        metrics.loc["faithfulness (resample ablation)", "value"]
        == f"{saved['metrics']['faithfulness']['resample']:.4g}"
    )
    assert "ROC AUC of edge scores vs the planted circuit" in metrics.index
    assert metrics.loc["edges kept", "value"] == "5"
    prompts = at.table[1].value
    assert prompts["clean"].tolist() == saved["prompts"]["clean"] and len(prompts) == 8
    assert "8 of the task's 8 prompts" in "\n".join(c.value for c in at.caption)


def test_circuits_folders_given_to_explore_are_listed(tiny_run, tmp_path, monkeypatch, capsys):
    from app.explorer.launch import explorer_env
    from tests.test_cli import run_cli
    from workbench.errors import WorkbenchError

    folder = tmp_path / "mine" / "deeper"
    folder.mkdir(parents=True)
    layered().save(folder / "dense.circuit.json")
    monkeypatch.chdir(tmp_path)
    at = circuits_page(monkeypatch, [str(tiny_run)], circuits=[str(tmp_path / "mine")])
    assert at.selectbox(key="circuit_file").value == str(folder / "dense.circuit.json")
    with pytest.raises(WorkbenchError, match="no such file or folder"):
        explorer_env([str(tiny_run)], circuits=[str(tmp_path / "gone")])
    code, _, err = run_cli(capsys, "explore", str(tiny_run), "--circuits", str(tmp_path / "gone"))
    assert code != 0 and err.strip().splitlines()[-1].endswith("gone: no such file or folder")


def test_the_threshold_slider_hides_weak_edges(tiny_run, tmp_path, monkeypatch):
    circuit = layered()
    assert len(circuit.edges) > 150
    circuit.save(tmp_path / "dense.circuit.json")
    monkeypatch.chdir(tmp_path)
    at = circuits_page(monkeypatch, [str(tiny_run)], circuits=[str(tmp_path)])
    assert drawn_edges(at) == 100  # the default: the strongest 100, not a hairball
    assert len(at.dataframe[-1].value) == 100
    scores = sorted((abs(e.score) for e in circuit.edges), reverse=True)
    at.slider(key="edge_threshold").set_value(scores[19]).run()
    assert drawn_edges(at) == 20 and len(at.dataframe[-1].value) == 20
    at.slider(key="edge_threshold").set_value(0.0).run()
    assert drawn_edges(at) == len(circuit.edges)


def test_a_click_on_a_head_shows_its_edges(tiny_run, tmp_path, monkeypatch):
    circuit = layered()
    circuit.save(tmp_path / "dense.circuit.json")
    monkeypatch.chdir(tmp_path)
    at = circuits_page(monkeypatch, [str(tiny_run)], circuits=[str(tmp_path)])
    at.session_state["circuit_graph"] = {
        "selection": {"points": [{"customdata": "a1.2"}], "point_indices": [0]}
    }
    at.run()
    assert not at.exception
    incoming, outgoing = at.dataframe[0].value, at.dataframe[1].value  # then the edges drawn
    expect_in = sorted((e for e in circuit.edges if e.target == "a1.2"), key=lambda e: -abs(e.score))
    labels = {n.id: n.label for n in circuit.nodes}  # shown by name (L0H1), not id (a0.1)
    assert incoming["from"].tolist() == [labels[e.source] for e in expect_in]
    assert incoming.score.tolist() == pytest.approx([e.score for e in expect_in])
    assert sorted(outgoing["to"]) == sorted(labels[e.target] for e in circuit.edges if e.source == "a1.2")


def test_a_feature_node_shows_its_summary_and_opens_its_page(tiny_run, tmp_path, monkeypatch):
    from workbench.store import FeatureStore

    store = FeatureStore(tiny_run)
    feature = int(store.features(limit=1).feature[0])
    nodes = [
        Node("embed", "embed", 0, "tokens"),
        Node("f", "feature", 1, f"#{feature}", 0.9, hook=STORE_HOOK, feature=feature, store=str(store.path)),
        Node("logits", "logits", 2, "logits"),
    ]
    Circuit(nodes, [Edge("embed", "f", 0.8), Edge("f", "logits", 0.7)], task="toy").save(
        tmp_path / "f.circuit.json"
    )
    monkeypatch.chdir(tmp_path)
    at = circuits_page(monkeypatch, [str(tiny_run)], circuits=[str(tmp_path)])
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    labels = [t for trace in spec["data"] for t in trace.get("text") or []]
    assert store.summaries([feature])[feature] and any(label.startswith(f"#{feature} · ") for label in labels)
    at.selectbox(key="circuit_node").set_value("f").run()
    assert f"feature {feature} of {store.path}" in "\n".join(c.value for c in at.caption)
    at.button(key="circuit_open_feature").click().run()
    assert not at.exception and str(feature) in at.title[0].value


def test_layer_ticks_are_integers_named_by_what_they_hold():
    from app.explorer.circuit_plot import circuit_figure

    nodes = [
        Node("embed", "embed", 0),
        Node("h/1", "feature", 1, hook="blocks.0.hook_resid_post", feature=1),
        Node("h/error", "error", 1, hook="blocks.0.hook_resid_post"),
        Node("g/2", "feature", 2, hook="blocks.1.hook_resid_post", feature=2),
        Node("logits", "logits", 3),
    ]
    edges = [Edge("embed", "h/1", 1.0), Edge("h/1", "g/2", -0.5), Edge("g/2", "logits", 0.2)]
    figure = circuit_figure(Circuit(nodes, edges), threshold=0.0)
    assert list(figure.layout.xaxis.tickvals) == [0, 1, 2, 3]
    assert list(figure.layout.xaxis.ticktext) == ["input", *(n.hook for n in nodes[1:4:2]), "logits"]
    legend = {t.name for t in figure.data if t.showlegend is not False}
    assert {"input (embeddings)", "dictionary feature", "dictionary error term", "logits"} <= legend
    assert {"positive edge", "negative edge"} <= legend


def test_an_older_relative_store_path_is_read_against_the_json_folder(tiny_run, tmp_path, monkeypatch):
    beside, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    beside.mkdir(), elsewhere.mkdir()
    (beside / "features.duckdb").write_bytes((tiny_run / "features.duckdb").read_bytes())
    path = beside / "old.circuit.json"
    Circuit([Node("f", "feature", 1, feature=1, store="features.duckdb")], []).save(path)
    monkeypatch.chdir(elsewhere)
    assert load_circuit(path).nodes[0].store == str(beside / "features.duckdb")
    monkeypatch.chdir(tmp_path)  # written from here: run/features.duckdb is found against the current folder
    Circuit([Node("f", "feature", 1, feature=1, store="run/features.duckdb")], []).save(path)
    assert load_circuit(path).nodes[0].store == str(tmp_path / "run" / "features.duckdb")
