"""The explorer's pure helpers: store names in links, densities, token queries and feature ids
as a reader means them (no Streamlit run needed)."""

from __future__ import annotations

import os


def test_store_names_in_links(tmp_path, monkeypatch):
    from app.explorer.data import store_from_key, store_key, store_names

    for folder in ("runs/a/topk", "runs/b/topk", "solo"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "features.duckdb").touch()
    roots = (str(tmp_path / "runs"), str(tmp_path / "solo" / "features.duckdb"))
    monkeypatch.setenv("WORKBENCH_STORES", os.pathsep.join(roots))
    assert list(store_names(roots)) == ["a/topk", "b/topk", "solo"]
    for index, name in enumerate(["a/topk", "b/topk", "solo"]):
        path = os.path.realpath(tmp_path / ("runs/" + name if "/" in name else name) / "features.duckdb")
        assert store_key(path) == name and store_from_key(name) == path == store_from_key(str(index))
    assert store_from_key("c/topk") is None and store_from_key("7") is None
    assert store_from_key("/etc/passwd") is None


def test_densities_token_queries_and_ids_read_as_meant():
    from app.explorer.formats import format_density, parse_feature_id, parse_token_query

    assert format_density(3.2e-05) == "3.2e-05 · 1 in 31,000"
    assert format_density(0.0035) == "0.35% · 1 in 290" and format_density(0) == "never fired"
    assert parse_token_query("\\n") == "\n" and parse_token_query(" the") == " the"
    assert parse_token_query("\\s\\t\\\\x\\q") == " \t\\x\\q"
    assert parse_feature_id("12", 48) == (12, "")
    for bad in ("48", "-3", "abc", "1.5", "", "١٢"):
        feature, why = parse_feature_id(bad, 48)
        assert feature is None and why and "\n" not in why


def test_histogram_ticks_print_their_values_in_full():
    """Plotly's log ticks read '2 5 1 2 5' over 0.2-5, where 0.2 and 2 look alike."""
    import math

    from app.explorer.plots import histogram_figure, log_ticks

    ticks = log_ticks([math.log10(0.3), math.log10(7)])
    assert ticks["ticktext"] == ["0.5", "1", "2", "5"] and ticks["tickvals"] == [0.5, 1.0, 2.0, 5.0]
    edges = [0.1 * 1.2**i for i in range(30)]
    counts = [0] * 5 + [3] * 10 + [0] * 14
    axis = histogram_figure(edges, counts).layout.xaxis
    low, high = 10 ** axis.range[0], 10 ** axis.range[1]
    assert all(low <= v <= high for v in axis.tickvals) and "0.2" in axis.ticktext


def test_an_offline_token_match_score_is_not_shown_as_a_detection_score():
    from app.explorer.feature_sections import detection_text

    scores = {"accuracy": 0.5, "f1": 0.67, "precision": 0.5, "recall": 1.0, "n": 10}
    assert detection_text({**scores, "scorer": "llm"}).startswith("detection score: accuracy 0.50")
    offline = detection_text({**scores, "scorer": "token-match"})
    assert (
        offline.startswith("token-match rule (offline, no language model)")
        and "chance accuracy 0.50" in offline
    )
