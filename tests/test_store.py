"""The feature store file: round trip, refusal of bad files in one line, search, the CLI."""

from __future__ import annotations

import json
import shutil

import duckdb
import pytest

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
