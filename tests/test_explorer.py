"""Every explorer page under Streamlit's AppTest: navigation, search, the live box, circuits,
steering. (The real-browser test is tests/test_explorer_browser.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from circuits.graph import Circuit, Edge, Node
from tests.conftest import STORE_HOOK
from workbench.store import FeatureStore

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "explorer" / "main.py")


@pytest.fixture
def app(tiny_run, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_STORES", str(tiny_run))
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.run()
    assert not at.exception
    return at


def open_page(at, page: str, **state):
    for key, value in state.items():
        at.session_state[key] = value
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    return at


def test_runs_page_lists_the_store(app, tiny_run):
    assert app.title[0].value == "Runs"
    table = app.dataframe[0].value
    assert table.store.tolist() == [str(tiny_run / "features.duckdb")] and table.latents[0] == 48
    assert app.selectbox[0].value == str(tiny_run / "features.duckdb")


def test_features_page_sorts_and_searches_by_token(app, tiny_run):
    at = open_page(app, "features")
    store = FeatureStore(tiny_run)
    table = at.dataframe[-1].value
    assert table.feature.tolist()[:5] == store.features(limit=5).feature.tolist()
    feature = int(table.feature[0])
    example = store.feature(feature).top[0]
    peak = store.token_texts([example.tokens[example.position - example.start]])[0]
    at.text_input(key="token_query").input(peak).run()
    assert feature in at.dataframe[0].value.feature.tolist()


def live_reference(tiny_model, tiny_run, text):
    import sae

    dictionary = sae.load(tiny_run)
    tokens = tiny_model.tokenize(text)
    x = tiny_model.run_with_cache(tokens, [STORE_HOOK])[STORE_HOOK][0]
    with torch.no_grad():
        acts = dictionary.encode(x).to_dense()
    acts[0] = 0
    return acts


def test_free_text_search_ranks_the_features_that_fire(app, tiny_run, tiny_model):
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    at = open_page(app, "features")
    at.text_area(key="text_query").input(text)
    at.button(key="find_features").click().run()
    assert not at.exception
    hits = at.session_state["text_hits"]
    peak = live_reference(tiny_model, tiny_run, text).max(0).values
    assert int(hits.feature[0]) == int(peak.argmax())
    assert hits.max_activation[0] == pytest.approx(float(peak.max()), rel=1e-4)


def test_feature_page_shows_histogram_examples_and_the_live_box(app, tiny_run, tiny_model):
    store = FeatureStore(tiny_run)
    feature = int(store.features(limit=1).feature[0])
    at = open_page(app, "feature", feature_id=feature)
    assert at.title[0].value == f"Feature {feature}"
    page = store.feature(feature)
    html = [h.proto.body for h in at.get("html")]
    assert len(html) == len(page.top) + len(page.quantiles) and all('class="tok"' in h for h in html)
    assert len(at.get("plotly_chart")) == 3  # histogram, top and bottom logit effects
    text = "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?"
    at.text_area(key="live_text").input(text)
    at.button(key="live_run").click().run()
    expected = live_reference(tiny_model, tiny_run, text)[:, feature].max()
    assert f"max activation on your text: {float(expected):.3g}" in at.caption[-1].value


def test_neighbour_buttons_open_the_neighbour(app, tiny_run):
    store = FeatureStore(tiny_run)
    feature = int(store.features(limit=1).feature[0])
    neighbour = int(store.feature(feature).neighbours.other[0])
    at = open_page(app, "feature", feature_id=feature)
    at.button(key=f"neighbour_{neighbour}").click().run()
    assert at.title[0].value == f"Feature {neighbour}"


def test_steering_page_generates_baseline_and_steered_text(app, tiny_run):
    store = FeatureStore(tiny_run)
    feature = int(store.features(limit=1).feature[0])
    at = open_page(app, "steering", steer_features=[feature])
    assert at.multiselect[0].value == [feature]
    at.number_input(key=f"strength_{feature}").set_value(0.0)
    at.button(key="steer_generate").click().run()
    baseline, steered = (t.value for t in at.text)
    assert baseline == steered and baseline.startswith("ROMEO:")  # strength 0 changes nothing
    at.number_input(key=f"strength_{feature}").set_value(200.0)
    at.button(key="steer_generate").click().run()
    baseline_again, steered = (t.value for t in at.text)
    assert baseline_again == baseline and steered != baseline


def write_circuit(path: Path, store: Path) -> None:
    nodes = [
        Node("embed", "embed", 0, "tokens"),
        Node("f3", "feature", 1, "feature 3", 0.9, hook=STORE_HOOK, feature=3, store=str(store)),
        Node("a1.0", "head", 1, "L1H0", 0.2, in_circuit=False),
        Node("logits", "logits", 2, "logits"),
    ]
    edges = [
        Edge("embed", "f3", 0.8),
        Edge("f3", "logits", 0.7),
        Edge("embed", "a1.0", 0.01, in_circuit=False),
    ]
    Circuit(nodes, edges, task="toy", method="hand", metrics={"faithfulness": 0.9}).save(path)


def test_circuits_page_draws_a_circuit_and_refuses_a_bad_one(tiny_run, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    good, bad = tmp_path / "toy.circuit.json", tmp_path / "bad.circuit.json"
    write_circuit(good, tiny_run / "features.duckdb")
    bad.write_text(json.dumps({"format_version": 1, "nodes": [], "edges": [{"source": "x", "target": "y"}]}))
    monkeypatch.setenv("WORKBENCH_STORES", str(tiny_run))
    monkeypatch.setenv("WORKBENCH_CIRCUITS", f"{good}:{bad}")
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.switch_page("views/circuits.py").run()
    assert not at.exception and len(at.get("plotly_chart")) == 1
    edges = at.dataframe[0].value
    assert edges.source.tolist()[0] == "embed" and edges.score.tolist()[0] == 0.8
    at.selectbox(key="circuit_file").set_value(str(bad)).run()
    assert "unknown node" in at.error[0].value


def test_a_click_on_a_feature_node_names_its_store_and_feature(tiny_run, tmp_path):
    from app.explorer.data import clicked_feature
    from circuits.graph import load_circuit

    write_circuit(tmp_path / "toy.circuit.json", tiny_run / "features.duckdb")
    circuit = load_circuit(tmp_path / "toy.circuit.json")
    assert clicked_feature(circuit, [{"customdata": "embed"}]) is None
    assert clicked_feature(circuit, [{"customdata": "embed"}, {"customdata": "f3"}]) == (
        str(tiny_run / "features.duckdb"),
        3,
    )


def test_live_box_says_why_when_the_dictionary_is_gone(tiny_run, tmp_path, monkeypatch):
    import duckdb
    from streamlit.testing.v1 import AppTest

    moved = tmp_path / "features.duckdb"
    moved.write_bytes((tiny_run / "features.duckdb").read_bytes())
    with duckdb.connect(str(moved)) as con:
        con.execute(
            "UPDATE meta SET value = ? WHERE key = 'dictionary_path'", [json.dumps(str(tmp_path / "gone"))]
        )
    monkeypatch.setenv("WORKBENCH_STORES", str(moved))
    at = AppTest.from_file(MAIN, default_timeout=60)
    at = open_page(at, "feature", feature_id=1)
    at.text_area(key="live_text").input("some text")
    at.button(key="live_run").click().run()
    assert "is not on this machine" in at.warning[0].value
    at = open_page(at, "steering")
    assert "is not on this machine" in at.warning[0].value
