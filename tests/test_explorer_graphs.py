"""Attribution graphs on the Circuits page: a graph JSON written per the contract (kind
"attribution-graph", `circuits.graphs`) whose features link to the session's tiny store, drawn
with token strings on x and layers on y, pruned tighter by the influence slider, and a click on a
feature node opening its feature page; malformed files are refused in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_explorer_circuits import circuits_page

TOKENS = ["<|bos|>", "ROMEO", ":", " the"]


def synthetic_graph(store: str | None, features: list[int]) -> dict:
    """A 2-layer graph over TOKENS: every (layer, position) holds one feature of `features` (in
    turn) and an error node; edges run from each node to the nodes above it, signs alternating.
    Own influence falls with a feature's index (errors and embeddings weaker), written as
    circuits.graphs does: "influence" is the cumulative share in that order."""
    n_layers, nodes, edges = 2, [], []
    for p, text in enumerate(TOKENS):
        nodes.append({"id": f"t.{p}", "type": "embedding", "layer": -1, "position": p, "own": 0.02})
    rank = 0
    for layer in range(n_layers):
        for p in range(len(TOKENS)):
            feature = features[rank % len(features)]
            nodes.append(
                {
                    "id": f"f.{layer}.{p}.{feature}",
                    "type": "feature",
                    "layer": layer,
                    "position": p,
                    "feature": feature,
                    "activation": 1.0 + rank,
                    "own": 0.2 / (1 + rank),
                    "label": f"feature {feature}",
                }
            )
            rank += 1
    for layer in range(n_layers):
        for p in range(len(TOKENS)):
            nodes.append(
                {"id": f"e.{layer}.{p}", "type": "error", "layer": layer, "position": p, "own": 0.01}
            )
    total, running = sum(n["own"] for n in nodes), 0.0
    for node in sorted(nodes, key=lambda n: -n["own"]):
        running += node.pop("own")
        node["influence"] = running / total
    nodes.append(
        {
            "id": "l.262",
            "type": "logit",
            "layer": n_layers,
            "position": len(TOKENS) - 1,
            "influence": 0.0,
            "label": "' the'",
        }
    )
    by_layer: dict[int, list[str]] = {}
    for node in nodes:
        by_layer.setdefault(node["layer"], []).append(node["id"])
    for i, (low, high) in enumerate(zip(sorted(by_layer), sorted(by_layer)[1:])):
        for j, source in enumerate(by_layer[low]):
            for target in by_layer[high][:3]:
                edges.append({"source": source, "target": target, "weight": (-1) ** (i + j) * (1 + j) / 4})
    return {
        "format_version": 1,
        "kind": "attribution-graph",
        "model": "tiny",
        "prompt": "ROMEO: the",
        "tokens": [0, 11, 12, 13],
        "token_strings": TOKENS,
        "transcoders": [
            {
                "layer": layer,
                "path": "runs/tc",
                "hook": f"blocks.{layer}.ln2.hook_normalized",
                "out_hook": f"blocks.{layer}.hook_mlp_out",
                "store": store,
            }
            for layer in range(n_layers)
        ],
        "targets": [{"token": 262, "token_string": " the", "probability": 0.31, "logit": 4.2}],
        "nodes": nodes,
        "edges": edges,
        "pruning": {"node_threshold": 0.8, "edge_threshold": 0.98, "nodes_before": 99, "edges_before": 999},
        "metrics": {"completeness": 0.93, "replacement_score": 0.71, "seconds": 0.5},
    }


@pytest.fixture
def graph_file(tiny_run, tmp_path) -> Path:
    from workbench.store import FeatureStore

    store = FeatureStore(tiny_run / "features.duckdb")
    fired = store.features(limit=3).feature.tolist()
    store.close()
    path = tmp_path / "graphs" / "tiny-graph.circuit.json"
    path.parent.mkdir()
    path.write_text(json.dumps(synthetic_graph(str(tiny_run / "features.duckdb"), [int(f) for f in fired])))
    return path


def test_the_figure_puts_tokens_on_x_layers_on_y_and_sizes_by_influence():
    from app.explorer.attribution_graph import NODE_TYPES, graph_figure, pruned, read_graph

    graph = read_graph(synthetic_graph(None, [3, 5]))
    figure = graph_figure(graph, *pruned(graph, 1.0))
    assert list(figure.layout.xaxis.ticktext) == [repr(t) for t in TOKENS]
    assert list(figure.layout.yaxis.tickvals) == [-1, 0, 1, 2]
    assert list(figure.layout.yaxis.ticktext) == ["embeddings", "layer 0", "layer 1", "logits"]
    traces = {t.name: t for t in figure.data}
    features = traces[NODE_TYPES["feature"][0]]
    sizes = dict(zip(features.customdata, features.marker.size))
    cumulative = {n.id: n.influence for n in graph.nodes}
    ranked = sorted(sizes, key=lambda i: cumulative[i])  # strongest first
    assert [sizes[i] for i in ranked] == sorted(sizes.values(), reverse=True) and sizes[ranked[0]] == 22
    strongest = next(n for n in graph.nodes if n.id == ranked[0])
    assert strongest.share == pytest.approx(strongest.influence)  # the first node's share is its own
    assert features.marker.color != traces[NODE_TYPES["error"][0]].marker.color
    first = next(n for n in graph.nodes if n.type == "feature" and n.position == 2 and n.layer == 1)
    x, y = (
        features.x[list(features.customdata).index(first.id)],
        features.y[list(features.customdata).index(first.id)],
    )
    assert abs(x - figure.layout.xaxis.tickvals[2]) < 0.5 and y == 1  # its token's column, its layer's row
    drawn = [(x, y) for t in figure.data if t.customdata is not None for x, y in zip(t.x, t.y)]
    assert len(set(drawn)) == len(drawn) == len(graph.nodes)  # no node hides another
    hover = features.hovertext[list(features.customdata).index(first.id)]
    assert f"feature {first.feature}" in hover and "activation" in hover and "influence" in hover
    assert {"positive edge", "negative edge"} <= {t.name for t in figure.data}
    lines = [t for t in figure.data if t.mode == "lines"]
    assert sum(t.x.count(None) for t in lines) == len(graph.edges)  # one segment per edge
    assert all(t.hoverinfo == "skip" for t in lines)  # clicks reach the nodes


def test_the_slider_only_tightens_the_files_pruning():
    from app.explorer.attribution_graph import pruned, read_graph

    graph = read_graph(synthetic_graph(None, [3]))
    assert pruned(graph, 0.8) == (graph.nodes, graph.edges)  # the file's own threshold: all of it
    previous = len(graph.nodes)
    for threshold in (0.6, 0.4, 0.2, 0.05):
        nodes, edges = pruned(graph, threshold)
        ids = {n.id for n in nodes}
        assert len(nodes) <= previous
        previous = len(nodes)
        dropped = [n for n in graph.nodes if n.id not in ids]
        assert dropped and all(n.type in ("feature", "error") for n in dropped)  # embeddings, logits stay
        kept = sorted(n.influence for n in nodes if n.type in ("feature", "error"))
        assert all(d.influence > kept[-1] for d in dropped)  # the strongest are kept
        # circuit-tracer's rule: up to and including the first cumulative share reaching the threshold
        assert kept[-1] >= threshold and (len(kept) == 1 or kept[-2] < threshold)
        assert all(e.source in ids and e.target in ids for e in edges)
    assert [n.id for n in pruned(graph, 0.05)[0] if n.type == "feature"] == ["f.0.0.3"]


def test_a_store_built_after_the_graph_is_found_in_the_transcoders_folder(tmp_path):
    from app.explorer.attribution_graph import read_graph

    obj = synthetic_graph(None, [3])
    obj["transcoders"][1]["path"] = str(tmp_path)
    graph = read_graph(obj)
    feature = next(n for n in graph.nodes if n.type == "feature" and n.layer == 1)
    assert graph.store_of(feature) is None
    (tmp_path / "features.duckdb").write_bytes(b"")  # `workbench analyze` ran since
    assert graph.store_of(feature) == str(tmp_path / "features.duckdb")


def test_a_malformed_graph_is_refused_in_one_line():
    from app.explorer.attribution_graph import read_graph
    from circuits.graph import CircuitError

    graph = synthetic_graph(None, [3])
    graph["edges"].append({"source": "f.0.0.3", "target": "nowhere", "weight": 1.0})
    with pytest.raises(CircuitError, match="names an unknown node"):
        read_graph(graph)
    graph = synthetic_graph(None, [3])
    graph["nodes"][0]["type"] = "head"
    with pytest.raises(CircuitError, match=r"unknown type 'head'"):
        read_graph(graph)


def test_the_circuits_page_draws_a_graph_and_a_feature_click_opens_its_page(
    tiny_run, graph_file, tmp_path, monkeypatch
):
    from workbench.store import FeatureStore

    monkeypatch.chdir(tmp_path)
    at = circuits_page(monkeypatch, [str(tiny_run)], circuits=[str(graph_file.parent)])
    assert at.selectbox(key="circuit_file").value == str(graph_file)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    drawn = [i for t in spec["data"] for i in t.get("customdata") or []]
    graph = json.loads(graph_file.read_text())
    assert sorted(drawn) == sorted(n["id"] for n in graph["nodes"])
    store = FeatureStore(tiny_run / "features.duckdb")
    feature_node = next(n for n in graph["nodes"] if n["type"] == "feature")
    summary = store.summaries([feature_node["feature"]])[feature_node["feature"]]
    hovers = [h for t in spec["data"] for h in t.get("hovertext") or []]
    assert summary and any(summary[:40] in h for h in hovers)  # the store's description, not the file's label
    at.slider(key="graph_node_threshold").set_value(0.2).run()
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert len([i for t in spec["data"] for i in t.get("customdata") or []]) < len(drawn)
    assert "completeness" in at.table[0].value.index
    assert (
        at.table[2].value.transcoder[0] == "reads blocks.0.ln2.hook_normalized, writes blocks.0.hook_mlp_out"
    )

    at.slider(key="graph_node_threshold").set_value(0.8).run()
    at.session_state["attribution_graph"] = {
        "selection": {"points": [{"customdata": "e.1.2"}], "point_indices": [0]}
    }
    at.run()  # an error node: its edges below the graph
    assert not at.exception and at.selectbox(key="graph_node").value == "e.1.2"
    assert len(at.dataframe[0].value) == sum(e["target"] == "e.1.2" for e in graph["edges"])
    at.session_state["attribution_graph"] = {
        "selection": {"points": [{"customdata": feature_node["id"]}], "point_indices": [0]}
    }
    at.run()  # a feature node: its page in the transcoder's store
    assert not at.exception
    assert at.title[0].value == f"Feature {feature_node['feature']}"
    assert summary in "\n".join(m.value for m in at.markdown)


def test_non_finite_numbers_and_nodes_outside_the_prompt_or_the_layers_are_refused_in_one_line():
    """What made the page crash (a NaN weight, as Python's json writes it) or stall laying out a
    million columns (a node at position 10**6) is refused by read_graph; a valid graph's columns
    are laid out in linear time."""
    from app.explorer.attribution_graph import column_centres, read_graph
    from circuits.graph import CircuitError

    def broken(change) -> dict:
        graph = json.loads(json.dumps(synthetic_graph(None, [3])))
        change(graph)
        return json.loads(json.dumps(graph))  # NaN / Infinity through the JSON text, as in a file

    feature = 4  # synthetic_graph's nodes: 4 embeddings, then the features
    cases = {
        "weight nan": lambda g: g["edges"][0].update(weight=float("nan")),
        "activation inf": lambda g: g["nodes"][feature].update(activation=float("inf")),
        "influence nan": lambda g: g["nodes"][feature].update(influence=float("nan")),
        "share -inf": lambda g: g["nodes"][feature].update(share=float("-inf")),
        "position 1000000; the prompt has 4 tokens": lambda g: g["nodes"][feature].update(position=10**6),
        "position -1": lambda g: g["nodes"][0].update(position=-1),
        "on layer 1000000": lambda g: g["nodes"][feature].update(layer=10**6),
        "on layer 2 (its layers: 0..1)": lambda g: g["nodes"][feature].update(layer=2),
        "embedding node t.0 is on layer 0": lambda g: g["nodes"][0].update(layer=0),
        "logits' layer 1000000000": lambda g: g["nodes"][-1].update(layer=10**9),
        "no token_strings": lambda g: (g.pop("token_strings"), g.pop("tokens")),
        "names feature -3": lambda g: g["nodes"][feature].update(feature=-3),
    }
    for message, change in cases.items():
        with pytest.raises(CircuitError, match=re.escape(message)) as error:
            read_graph(broken(change))
        assert "\n" not in str(error.value)
    tokens_only = read_graph(broken(lambda g: g.pop("token_strings")))  # "tokens" still count them
    assert len(column_centres(tokens_only, tokens_only.nodes)) == len(TOKENS)
