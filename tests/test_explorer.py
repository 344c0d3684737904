"""Every explorer page under Streamlit's AppTest: navigation, search, the live box, circuits,
steering. (The real-browser test is tests/test_explorer_browser.py.)"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from app.explorer.formats import escape_markdown, shorten
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


def test_runs_page_compares_the_stores_and_names_the_chosen_one_in_the_url(app, tiny_run):
    assert app.title[0].value == "Runs"
    table = app.dataframe[0].value
    store = FeatureStore(tiny_run)
    dead = int((store.features(limit=1000).density == 0).sum())
    row = table.iloc[0]
    assert row.store == "topk" and row.latents == 48 and row.path == str(tiny_run / "features.duckdb")
    assert (row.FVU, row.L0) == (0.5, 4.0)  # the run's metrics, as saved with the dictionary
    assert row["dead %"] == pytest.approx(100 * dead / 48)
    assert {"CE score", "KL score", "KL"} <= set(table.columns)
    assert app.selectbox(key="run_choice").value == "topk" and app.query_params["store"] == "topk"
    assert not app.get("plotly_chart")  # one store: nothing to plot against


def table(at, key: str):
    return next(d.value for d in at.dataframe if d.key == key)


def captions(at) -> str:
    return "\n".join(c.value for c in at.caption)


def clicked_row(at, key: str, row: int):
    """Select row `row` of the table `key` (as a click does) and rerun."""
    at.session_state[key] = {"selection": {"rows": [row], "columns": [], "cells": []}}
    return at.run()


def test_features_table_shows_summaries_and_a_row_click_opens_that_feature(app, tiny_run):
    at = open_page(app, "features")
    store = FeatureStore(tiny_run)
    shown = table(at, "feature_table")
    assert shown.feature.tolist()[:5] == store.features(limit=5).feature.tolist()
    summaries = store.summaries()
    assert shown.summary.tolist() == [summaries[f] for f in shown.feature]
    assert sum(bool(s) for s in shown.summary) > len(shown) // 2  # most features have one
    row = 3
    clicked_row(at, "feature_table", row)
    assert at.title[0].value == f"Feature {shown.feature[row]}"
    assert at.query_params == {"store": "topk", "feature": str(shown.feature[row])}
    assert "store topk" in captions(at)  # the page says which store it shows


def test_a_click_on_a_summary_cell_opens_its_feature(app):
    """In a browser a click on a cell selects the cell, not the row (only the checkbox column
    selected rows, so clicking a summary did nothing)."""
    at = open_page(app, "features")
    shown = table(at, "feature_table")
    at.session_state["feature_table"] = {"selection": {"rows": [], "columns": [], "cells": [[5, "summary"]]}}
    at.run()
    assert at.title[0].value == f"Feature {shown.feature[5]}"


def peak_text(store: FeatureStore, feature: int) -> str:
    example = store.feature(feature).top[0]
    return store.token_texts([example.tokens[example.position - example.start]])[0]


def fires_on(store: FeatureStore, feature: int, text: str) -> bool:
    """Whether `feature` fires, in one of its kept examples, on a token whose text is `text`."""
    page = store.feature(feature)
    return any(
        a > 0 and t == text
        for e in page.top + page.quantiles
        for t, a in zip(store.token_texts(e.tokens), e.activations)
    )


def test_token_search_is_exact_and_says_how_many_it_found(app, tiny_run):
    at = open_page(app, "features")
    store = FeatureStore(tiny_run)
    texts = [peak_text(store, f) for f in store.features(limit=12).feature]
    token = next((t for t in texts if t.startswith(" ") and len(t) > 2), texts[0])
    expected = store.search_tokens(token)
    at.text_input(key="token_query").input(token).run()
    assert f"{expected.total:,} features fire on token {token!r} (showing {len(expected.table)})" in captions(
        at
    )
    found = table(at, "token_hits")
    assert found.feature.tolist() == expected.table.feature.tolist()
    assert all(fires_on(store, f, token) for f in found.feature[:8])  # the exact text, not a part of one
    assert found.summary.tolist() == [store.summaries()[f] for f in found.feature]
    newline = store.search_tokens("\n")
    at.text_input(key="token_query").input("\\n").run()  # typed as backslash-n
    assert newline.total > 0 and f"{newline.total:,} features fire on token '\\n'" in captions(at)
    clicked_row(at, "token_hits", 0)
    assert at.title[0].value == f"Feature {newline.table.feature[0]}"


def test_words_search_finds_summaries_and_opens_the_feature(app, tiny_run):
    store = FeatureStore(tiny_run)
    summaries = {f: s for f, s in store.summaries().items() if s}
    feature, summary = next(iter(summaries.items()))
    word = summary.split()[0]
    at = open_page(app, "features")
    at.text_input(key="words_query").input(word).run()
    found = table(at, "word_hits")
    assert feature in found.feature.tolist() and all(word.casefold() in s.casefold() for s in found.summary)
    clicked_row(at, "word_hits", found.feature.tolist().index(feature))
    assert at.title[0].value == f"Feature {feature}"


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
    shown = table(at, "text_hits_table")
    assert shown.summary.tolist() == [FeatureStore(tiny_run).summaries()[f] for f in shown.feature]
    clicked_row(at, "text_hits_table", 1)
    assert at.title[0].value == f"Feature {shown.feature[1]}"


def test_feature_page_shows_histogram_examples_and_the_live_box(app, tiny_run, tiny_model):
    store = FeatureStore(tiny_run)
    feature = int(store.features(limit=1).feature[0])
    at = open_page(app, "feature", feature_id=feature)
    assert at.title[0].value == f"Feature {feature}"
    page = store.feature(feature)
    html = [h.proto.body for h in at.get("html")]
    assert len(html) == 4  # top examples, quantile groups, promoted and suppressed logits
    groups = sorted({e.bin for e in page.quantiles}, reverse=True)
    assert html[1].count("<details") == len(groups) and html[1].count('class="example') == len(page.quantiles)
    top = html[0]
    assert "white-space:pre-wrap" in top and "&nbsp;" not in top
    printed = re.findall(r'<span class="wb-act">([^<]*)</span>', top)
    assert printed == [f"{e.activation:.3g}" for e in page.top]  # each example's activation, in order
    text = "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?"
    at.text_area(key="live_text").input(text)
    at.button(key="live_run").click().run()
    expected = live_reference(tiny_model, tiny_run, text)[:, feature].max()
    assert f"max activation on your text: {float(expected):.3g}" in at.caption[-1].value


def test_histogram_axis_covers_the_bins_that_hold_data(app, tiny_run):
    store = FeatureStore(tiny_run)
    feature = int(store.features(limit=1).feature[0])
    at = open_page(app, "feature", feature_id=feature)
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    low, high = figure["layout"]["xaxis"]["range"]
    edges, counts = np.log10(store.histogram_edges()), np.array(store.feature(feature).histogram)
    full = np.flatnonzero(counts)
    assert low <= edges[full[0]] and edges[full[-1] + 1] <= high  # every bar with data is in view
    assert low >= edges[full[0]] - 0.2 and high <= edges[full[-1] + 1] + 0.2  # and little else
    assert high - low < edges[-1] - edges[0]


def test_deep_links_back_and_bad_ids(app, tiny_run):
    store = FeatureStore(tiny_run)
    feature = int(store.features(limit=1).feature[0])
    neighbour = int(store.feature(feature).neighbours.other[0])
    app.query_params.update(store="topk", feature=str(feature))
    at = app.switch_page("views/feature.py").run()
    assert at.title[0].value == f"Feature {feature}" and at.query_params["store"] == "topk"
    at.button(key=f"neighbour_{neighbour}").click().run()
    assert at.title[0].value == f"Feature {neighbour}" and at.query_params["feature"] == str(neighbour)
    assert at.number_input(key="feature_box").value == neighbour
    at.query_params["feature"] = str(feature)  # what the browser's Back sends
    at.run()
    assert at.title[0].value == f"Feature {feature}" and at.number_input(key="feature_box").value == feature
    for bad, says in (
        ("99999", "outside this store's 0..47"),
        ("abc", "not a feature id"),
        ("-3", "not a feature"),
    ):
        at.query_params["feature"] = bad
        at.run()
        assert not at.title and len(at.error) == 1 and says in at.error[0].value
        assert "\n" not in at.error[0].value
    at.query_params.update(store="nowhere", feature="1")
    at.run()
    assert not at.title and "No store named 'nowhere'" in at.error[0].value


def test_cooccurring_feature_buttons_show_summaries_and_open_the_feature(app, tiny_run):
    store = FeatureStore(tiny_run)
    feature = next(int(f) for f in store.features(limit=48).feature if len(store.feature(f).cooccurrence))
    other = int(store.feature(feature).cooccurrence.other[0])
    at = open_page(app, "feature", feature_id=feature)
    button = at.button(key=f"cooccur_{other}")
    summary = store.summaries()[other]
    assert button.label.startswith(f"\\#{other}") and escape_markdown(shorten(summary, 60)) in button.label
    button.click().run()
    assert at.title[0].value == f"Feature {other}" and at.query_params["feature"] == str(other)


def copied_store(tiny_run, folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "features.duckdb").write_bytes((tiny_run / "features.duckdb").read_bytes())
    return folder / "features.duckdb"


def test_label_saved_beside_the_store_explanations_shown(tiny_run, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from workbench.explanations import write_explanations

    store_file = copied_store(tiny_run, tmp_path / "mine")
    before = store_file.read_bytes()
    detection = {"accuracy": 0.85, "f1": 0.8, "precision": 0.9, "recall": 0.72, "n": 20}
    entry = {"explanation": "speaker names before a colon", "source": "llm", "explainer": "tiny-llm"}
    write_explanations(store_file, {6: {**entry, "detection": detection}}, {"model": "tiny-llm"})
    monkeypatch.setenv("WORKBENCH_STORES", str(tmp_path))
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.run()
    at = open_page(at, "feature", feature_id=6)
    assert at.markdown[0].value == "### speaker names before a colon"  # no label: the explanation
    assert "accuracy 0.85 · F1 0.80" in captions(at) and "n = 20" in captions(at)
    at.query_params["feature"] = "5"
    at.run()
    at.text_input(key="label_5").input("KING speaker tag")
    at.text_area(key="notes_5").input("fires after newlines")
    next(b for b in at.button if b.label == "Save label").click().run()
    assert not at.exception
    saved = json.loads((tmp_path / "mine" / "features.labels.json").read_text())
    assert saved["labels"]["5"] == {"label": "KING speaker tag", "notes": "fires after newlines"}
    assert store_file.read_bytes() == before  # the store itself is never written
    assert at.markdown[0].value == "### KING speaker tag"  # the label is the feature's title now
    at = open_page(at, "features")
    shown = table(at, "feature_table").set_index("feature")
    assert shown.label[5] == "KING speaker tag" and shown.explanation[6] == entry["explanation"]
    at.text_input(key="words_query").input("SPEAKER").run()
    assert table(at, "word_hits").feature.tolist() == [5, 6]  # labels first, then explanations


def test_steer_jump_carries_the_feature_and_a_strength_in_max_activations(app, tiny_run):
    store = FeatureStore(tiny_run)
    feature = int(store.features(limit=1).feature[0])
    at = open_page(app, "feature", feature_id=feature)
    at.number_input(key="steer_scale").set_value(2.5)
    at.button(key="steer_this").click().run()
    assert at.session_state["steer_features"] == [feature] and at.session_state["steer_strength"] == 2.5
    assert at.title[0].value == "Steering"


def test_similar_features_in_another_store_of_the_same_hook(tiny_run, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    copied_store(tiny_run, tmp_path / "copy")
    monkeypatch.setenv("WORKBENCH_STORES", f"{tiny_run}{os.pathsep}{tmp_path}")
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.run()
    assert at.dataframe[0].value.store.tolist() == ["topk", "copy"] and len(at.get("plotly_chart")) == 1
    at = open_page(at, "feature", feature_id=7)
    at.toggle(key="similar_on").set_value(True).run()
    first = next(b for b in at.button if b.key and b.key.startswith("similar_"))
    assert first.key == "similar_7" and "cos 1.00" in first.label  # the same dictionary: itself
    first.click().run()
    assert at.title[0].value == "Feature 7" and at.query_params["store"] == "copy"


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


def test_longer_contexts_read_the_cache_windows(app, tiny_run):
    from sae.contexts import context_activations

    store = FeatureStore(tiny_run)
    feature = int(store.features(limit=1).feature[0])
    example = store.feature(feature).top[0]
    at = open_page(app, "feature", feature_id=feature)
    at.toggle(key="long_context").set_value(True).run()
    first = at.get("html")[0].proto.body.split('class="example')[1]
    tokens, acts = context_activations(store, example, 32)
    assert len(tokens) > len(example.tokens)  # ± 32 tokens, not the stored few
    assert first.count('class="tok') == len(tokens)
    assert f'title="{max(acts):.3g}"' in first and f">{example.activation:.3g}</span>" in first
