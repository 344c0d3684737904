"""The feature store: one DuckDB file per dictionary, written by `sae.analyze`, read by the explorer.

Tables (SCHEMA_VERSION 1; `meta` holds it, with the run's model, hook, architecture, metrics
and the histogram's bin edges, every value JSON-encoded):

    meta(key, value)
    features(feature, fired, density, mean_activation, max_activation, histogram INTEGER[])
    examples(feature, kind 'top'|'quantile', bin, rank, activation, window_id, position, start,
             tokens INTEGER[], activations REAL[])      -- position: the peak, within the window
    logits(feature, side 'top'|'bottom', rank, token, effect)
    neighbours(feature, rank, other, cosine)
    neurons(feature, rank, neuron, correlation)
    cooccurrence(feature, rank, other, rate, lift)      -- rate = P(other fires | feature fires)
    vocab(token, text)

`write_store` writes a complete file under a temporary name and renames it, so a reader never
sees half a store. `FeatureStore` opens one read-only; every query is a small indexed read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from workbench.errors import WorkbenchError

SCHEMA_VERSION = 1
STORE_FILE = "features.duckdb"

_TABLES = {
    "meta": "key VARCHAR PRIMARY KEY, value VARCHAR",
    "features": "feature INTEGER PRIMARY KEY, fired BIGINT, density DOUBLE, mean_activation DOUBLE, "
    "max_activation DOUBLE, histogram INTEGER[]",
    "examples": "feature INTEGER, kind VARCHAR, bin SMALLINT, rank SMALLINT, activation REAL, "
    "window_id INTEGER, position SMALLINT, start SMALLINT, tokens INTEGER[], activations REAL[]",
    "logits": "feature INTEGER, side VARCHAR, rank SMALLINT, token INTEGER, effect REAL",
    "neighbours": "feature INTEGER, rank SMALLINT, other INTEGER, cosine REAL",
    "neurons": "feature INTEGER, rank SMALLINT, neuron INTEGER, correlation REAL",
    "cooccurrence": "feature INTEGER, rank SMALLINT, other INTEGER, rate REAL, lift REAL",
    "vocab": "token INTEGER PRIMARY KEY, text VARCHAR",
}
_INDEXED = ("examples", "logits", "neighbours", "neurons", "cooccurrence")


class StoreError(WorkbenchError):
    """A missing, unreadable or outdated feature store."""


def write_store(path: str | os.PathLike, meta: Mapping[str, Any], tables: Mapping[str, pa.Table]) -> Path:
    """Write a complete store atomically; `tables` holds an Arrow table per table name."""
    path = Path(path)
    unknown = set(tables) - set(_TABLES)
    if unknown:
        raise StoreError(f"unknown store tables: {sorted(unknown)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(temporary))
        try:
            _fill(con, meta, tables)
        finally:
            con.close()
        os.replace(temporary, path)
    except duckdb.Error as exc:  # a full disk, a read-only folder: nothing is left behind
        raise StoreError(f"{path}: cannot write the store ({str(exc).splitlines()[0]})") from None
    finally:
        temporary.unlink(missing_ok=True)
        Path(f"{temporary}.wal").unlink(missing_ok=True)
    return path


def _fill(con, meta: Mapping[str, Any], tables: Mapping[str, pa.Table]) -> None:
    for name, columns in _TABLES.items():
        con.execute(f"CREATE TABLE {name} ({columns})")
    rows = {**meta, "schema_version": SCHEMA_VERSION}
    con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in rows.items()])
    for name, table in tables.items():
        con.register("incoming", table)
        con.execute(f"INSERT INTO {name} SELECT * FROM incoming")
        con.unregister("incoming")
    for name in _INDEXED:
        con.execute(f"CREATE INDEX {name}_by_feature ON {name} (feature)")
    con.execute("CHECKPOINT")


def list_column(rows: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """A [n, width] array as an Arrow list column (every list `width` long)."""
    rows = np.ascontiguousarray(rows)
    flat = pa.array(rows.reshape(-1), type=dtype)
    offsets = pa.array(
        np.arange(0, rows.size + 1, max(rows.shape[1], 1) if rows.ndim == 2 else 1, dtype=np.int32)
    )
    return pa.ListArray.from_arrays(offsets, flat)


@dataclass
class Example:
    activation: float
    window: int
    position: int
    """The peak token, as a position in its window."""
    start: int
    """The window position of tokens[0]."""
    tokens: list[int]
    activations: list[float]
    bin: int = 0


@dataclass
class FeaturePage:
    """Everything the explorer shows for one feature."""

    feature: int
    fired: int
    density: float
    mean_activation: float
    max_activation: float
    histogram: list[int]
    top: list[Example] = field(default_factory=list)
    quantiles: list[Example] = field(default_factory=list)
    logits: pd.DataFrame = field(default_factory=pd.DataFrame)
    neighbours: pd.DataFrame = field(default_factory=pd.DataFrame)
    neurons: pd.DataFrame = field(default_factory=pd.DataFrame)
    cooccurrence: pd.DataFrame = field(default_factory=pd.DataFrame)


_SORTABLE = {"feature", "fired", "density", "mean_activation", "max_activation"}


class FeatureStore:
    """A feature store opened read-only (safe to share between threads: one cursor per query)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / STORE_FILE
        if not self.path.is_file():
            raise StoreError(f"{self.path}: no feature store here (run `workbench analyze` first)")
        try:
            self._con = duckdb.connect(str(self.path), read_only=True)
            pairs = self._con.execute("SELECT key, value FROM meta").fetchall()
        except duckdb.Error as exc:
            raise StoreError(
                f"{self.path}: not a readable feature store ({str(exc).splitlines()[0]})"
            ) from None
        self.meta = {key: json.loads(value) for key, value in pairs}
        version = self.meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: store schema version {version!r}, this workbench reads "
                f"{SCHEMA_VERSION}; rebuild it with `workbench analyze`"
            )
        self.n_latents = int(self.meta.get("n_latents", 0))
        self._vocab: dict[int, str] | None = None

    def _query(self, sql: str, *params) -> pd.DataFrame:
        return self._con.cursor().execute(sql, list(params)).df()

    def close(self) -> None:
        self._con.close()

    # --- tables --------------------------------------------------------------------------
    def features(
        self,
        order_by: str = "density",
        descending: bool = True,
        min_density: float = 0.0,
        max_density: float = 1.0,
        limit: int = 1000,
        offset: int = 0,
    ) -> pd.DataFrame:
        """The per-feature statistics, sorted and filtered by density."""
        if order_by not in _SORTABLE:
            raise StoreError(f"cannot sort features by {order_by!r} (one of {', '.join(sorted(_SORTABLE))})")
        direction = "DESC" if descending else "ASC"
        return self._query(
            f"SELECT feature, fired, density, mean_activation, max_activation FROM features "
            f"WHERE density >= ? AND density <= ? ORDER BY {order_by} {direction}, feature LIMIT ? OFFSET ?",
            min_density,
            max_density,
            int(limit),
            int(offset),
        )

    def histogram_edges(self) -> list[float]:
        return list(self.meta["histogram_edges"])

    @property
    def vocab(self) -> dict[int, str]:
        if self._vocab is None:
            frame = self._query("SELECT token, text FROM vocab")
            self._vocab = dict(zip(frame["token"].tolist(), frame["text"].tolist()))
        return self._vocab

    def token_texts(self, tokens: list[int]) -> list[str]:
        vocab = self.vocab
        return [vocab.get(int(t), f"<{int(t)}>") for t in tokens]

    def feature(self, feature: int) -> FeaturePage:
        """One feature's page: statistics, examples, logit effects, neighbours, neurons, co-occurrence."""
        if not 0 <= int(feature) < self.n_latents:
            raise StoreError(f"feature {feature} is outside this store's 0..{self.n_latents - 1}")
        stats = self._query("SELECT * FROM features WHERE feature = ?", int(feature))
        if stats.empty:
            raise StoreError(f"feature {feature} is not in {self.path}")
        row = stats.iloc[0]
        examples = self._query(
            "SELECT * FROM examples WHERE feature = ? ORDER BY kind, bin DESC, rank", int(feature)
        )
        page = FeaturePage(
            int(feature),
            int(row.fired),
            float(row.density),
            float(row.mean_activation),
            float(row.max_activation),
            [int(c) for c in row.histogram],
        )
        for ex in examples.itertuples():
            item = Example(
                float(ex.activation),
                int(ex.window_id),
                int(ex.position),
                int(ex.start),
                [int(t) for t in ex.tokens],
                [float(a) for a in ex.activations],
                int(ex.bin),
            )
            (page.top if ex.kind == "top" else page.quantiles).append(item)
        page.logits = self._query(
            "SELECT side, rank, token, effect FROM logits WHERE feature = ? ORDER BY side DESC, rank",
            int(feature),
        )
        page.logits["text"] = self.token_texts(page.logits["token"].tolist())
        for name, order in (("neighbours", "rank"), ("neurons", "rank"), ("cooccurrence", "rank")):
            setattr(
                page,
                name,
                self._query(
                    f"SELECT * EXCLUDE (feature) FROM {name} WHERE feature = ? ORDER BY {order}", int(feature)
                ),
            )
        return page

    def search_tokens(self, text: str, limit: int = 20) -> pd.DataFrame:
        """Features whose top examples peak on a token whose text contains `text` (case-insensitive),
        ranked by how many of their top examples do, then by activation."""
        needle = text.strip().lower()
        if not needle:
            return pd.DataFrame(columns=["feature", "hits", "max_activation", "density"])
        return self._query(
            "WITH peaks AS (SELECT feature, activation, tokens[position - start + 1] AS token FROM examples "
            "WHERE kind = 'top') "
            "SELECT p.feature, count(*) AS hits, max(p.activation) AS max_activation, "
            "any_value(f.density) AS density "
            "FROM peaks p JOIN vocab v ON v.token = p.token JOIN features f ON f.feature = p.feature "
            "WHERE strpos(lower(v.text), ?) > 0 GROUP BY p.feature "
            "ORDER BY hits DESC, max_activation DESC LIMIT ?",
            needle,
            int(limit),
        )


def find_stores(roots: list[str | os.PathLike]) -> list[Path]:
    """Store files given directly, or found (recursively) under the given folders."""
    found: list[Path] = []
    for root in map(Path, roots):
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(sorted(root.rglob(STORE_FILE)))
    return found
