"""`workbench bench explore`'s store part at a tiny size: the synthetic store is a well-formed
store (it opens, its tables agree with each other, every query the pages make returns rows),
and the query timing table has a row per query with its target. The browser part is exercised
by tests/test_explorer_browser.py; no speed is asserted anywhere."""

from __future__ import annotations

import numpy as np
import pytest

from app.bench_explore import ExploreBenchConfig, page_checks
from app.bench_explore_store import COMMON, QUERY_TARGET_MS, synthetic_store, synthetic_tables, time_queries
from workbench.errors import ConfigError
from workbench.store import FeatureStore

N_LATENTS, TOKENS = 64, 4096


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("synthetic"), N_LATENTS, TOKENS, seed=3)


def test_the_synthetic_store_opens_with_every_table_a_store_has(synthetic):
    from workbench import store as store_module

    store = FeatureStore(synthetic)
    assert store.n_latents == N_LATENTS and store.meta["tokens_analyzed"] == TOKENS // 128 * 127
    counts = {t: store._query(f"SELECT count(*) AS n FROM {t}").n[0] for t in store_module._TABLES}
    assert all(counts[t] > 0 for t in counts), counts
    assert counts["vocab"] == 50_257 and counts["features"] == N_LATENTS
    store.close()


def test_its_examples_are_cut_from_the_token_windows_and_peak_where_they_say(synthetic):
    store = FeatureStore(synthetic)
    alive = store.features(min_density=1e-12, limit=N_LATENTS)
    assert 0 < len(alive) < N_LATENTS + 1
    for feature in alive.feature[:8]:
        page = store.feature(int(feature))
        assert page.top and page.summary and page.summary != "never fired"
        values = [e.activation for e in page.top]
        assert values == sorted(values, reverse=True) and values[0] <= page.max_activation + 1e-5
        for example in page.top[:3] + page.quantiles[:3]:
            offset = example.position - example.start
            assert 0 <= offset < len(example.tokens) and example.position > 0  # never the BOS
            assert example.activations[offset] == pytest.approx(max(example.activations))
            tokens, start = store.long_context(example)  # checks the window against the example
            assert start <= example.start and len(tokens) > len(example.tokens)
        bins = {e.bin for e in page.quantiles}
        assert bins and max(bins) < 10
    store.close()


def test_token_search_and_text_search_find_what_the_examples_hold(synthetic):
    store = FeatureStore(synthetic)
    hits = store.search_tokens(COMMON[0])
    assert hits.total > 0 and len(hits.table) == min(hits.total, 50)
    feature = int(hits.table.feature[0])
    page = store.feature(feature)
    assert any(" the" in store.token_texts(e.tokens) for e in page.top + page.quantiles)
    word = store.summaries([feature])[feature].split('"')[1]
    assert feature in store.search_text(word).feature.tolist()
    store.close()


def test_a_built_store_is_reused_and_tables_follow_the_seed(synthetic, tmp_path):
    stamp = synthetic.stat().st_mtime_ns
    assert synthetic_store(synthetic.parent.parent, N_LATENTS, TOKENS, seed=3) == synthetic
    assert synthetic.stat().st_mtime_ns == stamp
    meta_a, a = synthetic_tables(16, 1024, seed=1)
    _, b = synthetic_tables(16, 1024, seed=1)
    _, c = synthetic_tables(16, 1024, seed=2)
    assert a["examples"].equals(b["examples"]) and not a["examples"].equals(c["examples"])
    assert meta_a["cache"] == "" and not (tmp_path / "tokens.safetensors").exists()


def test_the_query_table_times_every_query_against_its_target(synthetic):
    rows = time_queries(synthetic, repeats=1)
    names = [row["query"] for row in rows]
    for expected in (
        "feature(N)",
        "features()",
        "summaries()",
        "search_tokens(",
        "search_text(",
        "long_context(",
    ):
        assert any(name.startswith(expected) for name in names), names
    for row in rows:
        assert row["target_ms"] == QUERY_TARGET_MS and row["met"] in ("yes", "NO")
        assert 0 <= row["median_ms"] <= row["max_ms"] and row["first_ms"] >= 0
        assert (row["met"] == "yes") == (row["median_ms"] <= QUERY_TARGET_MS)


def test_config_and_page_checks():
    with pytest.raises(ConfigError, match="unknown part 'browser'"):
        ExploreBenchConfig(parts=("browser",))
    with pytest.raises(ConfigError):
        ExploreBenchConfig(repeats=0)
    checks = page_checks(feature=7, store="demo")
    assert [c.name.split()[0] for c in checks] == ["Runs", "Features", "Feature", "Circuits", "Steering"]
    feature = checks[2]
    assert feature.path == "/feature?store=demo&feature=7"
    import re

    assert re.search(feature.heading, 'Feature 7 · "KING" ×3') and not re.search(
        feature.heading, "Feature 70"
    )
    assert np.all([c.path.count("store=demo") == 1 for c in checks])


def test_the_command_has_help_and_refuses_a_missing_store_in_one_line(capsys, tmp_path):
    from app.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "explore", "--help"])
    assert exit_.value.code == 0 and "--repeats" in capsys.readouterr().out
    assert main(["bench", "explore", "--parts", "pages", "--store", str(tmp_path / "none.duckdb")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no feature store" in error


def test_a_page_row_judges_each_way_in_by_its_median():
    from app.bench_explore import _page_row

    row = _page_row("Runs", [5.0, 0.5, 0.7, 0.6], [0.3, 2.0, 1.9], None)
    assert row["first_s"] == 5.0 and row["new_tab_median_s"] == 0.6 and row["new_tab_max_s"] == 0.7
    assert row["in_app_median_s"] == 1.9 and row["met_new_tab"] == "yes" and row["met_in_app"] == "NO"
    failed = _page_row("Circuits", [], [], "Timeout 60000ms exceeded.")
    assert failed["met_new_tab"] == failed["met_in_app"] == "NO" and failed["failed"].startswith("Timeout")
