"""The feature store: one DuckDB file per dictionary, written by `sae.analyze`, read by the explorer.

Tables (SCHEMA_VERSION 3; `meta` holds it, with the run's model, hook, architecture, metrics,
the cache and dictionary paths and the histogram's bin edges, every value JSON-encoded):

    meta(key, value)
    features(feature, fired, density, mean_activation, max_activation, histogram INTEGER[],
             summary)                                   -- a one-line summary of the data
    examples(feature, kind 'top'|'quantile', bin, rank, activation, window_id, position, start,
             tokens INTEGER[], activations REAL[])      -- position: the peak, within the window
    token_features(token, feature, hits, peaks, max_activation)  -- sorted by token: per token,
             the features firing on it in their kept examples (hits: positions; peaks: examples
             that peak there; max_activation: the largest activation on it)
    logits(feature, side 'top'|'bottom', rank, token, effect)
    neighbours(feature, rank, other, cosine)
    neurons(feature, rank, neuron, correlation)
    cooccurrence(feature, rank, other, rate, lift)      -- rate = P(other fires | feature fires)
    vocab(token, text)                                  -- byte tokens as <0xE2>
    heads(feature, head, norm, share)                   -- hook_z dictionaries only (else empty):
             each decoder row's norm per head block and its share of their sum (`sae.attention_heads`)

Version 1 stores (no summary, no token_features) still open: summaries read '' and token
search scans the examples. Version 1 and 2 stores have no heads table: their pages show none.
Beside the read-only store `<dir>/<stem>.duckdb` live the writable
`<stem>.labels.json` (`workbench.labels`) and `<stem>.explanations.json` (`workbench.explanations`).

`write_store` writes a complete file under a temporary name and renames it, so a reader never
sees half a store. `FeatureStore` opens one read-only; every query is a small indexed read (or
a pruned scan of a table sorted by its key), and whole-store lists (summaries) are read once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from workbench.errors import WorkbenchError
from workbench.explanations import explanations_path, read_explanations
from workbench.labels import Labels, match_text

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
STORE_FILE = "features.duckdb"

_TABLES = {
    "meta": "key VARCHAR PRIMARY KEY, value VARCHAR",
    "features": "feature INTEGER PRIMARY KEY, fired BIGINT, density DOUBLE, mean_activation DOUBLE, "
    "max_activation DOUBLE, histogram INTEGER[], summary VARCHAR",
    "examples": "feature INTEGER, kind VARCHAR, bin SMALLINT, rank SMALLINT, activation REAL, "
    "window_id INTEGER, position SMALLINT, start SMALLINT, tokens INTEGER[], activations REAL[]",
    "token_features": "token INTEGER, feature INTEGER, hits INTEGER, peaks INTEGER, max_activation REAL",
    "logits": "feature INTEGER, side VARCHAR, rank SMALLINT, token INTEGER, effect REAL",
    "neighbours": "feature INTEGER, rank SMALLINT, other INTEGER, cosine REAL",
    "neurons": "feature INTEGER, rank SMALLINT, neuron INTEGER, correlation REAL",
    "cooccurrence": "feature INTEGER, rank SMALLINT, other INTEGER, rate REAL, lift REAL",
    "vocab": "token INTEGER PRIMARY KEY, text VARCHAR",
    "heads": "feature INTEGER, head SMALLINT, norm REAL, share REAL",
}
_INDEXED = ("examples", "logits", "neighbours", "neurons", "cooccurrence", "heads")
_SORTED = {"token_features": "token, feature"}  # zone maps prune a filtered scan of sorted rows


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
        order = f" ORDER BY {_SORTED[name]}" if name in _SORTED else ""
        con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM incoming{order}")
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
    feature: int = -1
    """The feature whose example this is."""


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
    summary: str = ""
    heads: pd.DataFrame = field(default_factory=pd.DataFrame)
    """head, norm, share: the decoder row per attention head (hook_z stores; else empty)."""


class TokenHits(NamedTuple):
    """`search_tokens`' answer: `table` (feature, summary, hits, peaks, max_activation, density),
    at most `limit` rows, and `total`, the number of matching features before the limit."""

    table: pd.DataFrame
    total: int


_SORTABLE = {"feature", "fired", "density", "mean_activation", "max_activation"}
_HIT_COLUMNS = ["feature", "summary", "hits", "peaks", "max_activation", "density"]
_TEXT_COLUMNS = ["feature", "summary", "label", "explanation", "where"]


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
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{self.path}: store schema version {version!r}, this workbench reads "
                f"{SCHEMA_VERSION}; rebuild it with `workbench analyze`"
            )
        self.version: int = version
        self.n_latents = int(self.meta.get("n_latents", 0))
        self._vocab: dict[int, str] | None = None
        self._by_text: dict[str, list[int]] | None = None
        self._by_folded: dict[str, list[int]] | None = None
        self._summaries: dict[int, str] | None = None
        self._folded: list[tuple[int, str]] | None = None
        self._labels: Labels | None = None
        self._explained: tuple[object, dict[int, dict]] = (None, {})

    def _query(self, sql: str, *params) -> pd.DataFrame:
        return self._con.cursor().execute(sql, list(params)).df()

    def close(self) -> None:
        self._con.close()

    @property
    def _summary_sql(self) -> str:
        return "coalesce(summary, '')" if self.version >= 2 else "''"

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
        """The per-feature statistics and summary, sorted and filtered by density."""
        if order_by not in _SORTABLE:
            raise StoreError(f"cannot sort features by {order_by!r} (one of {', '.join(sorted(_SORTABLE))})")
        direction = "DESC" if descending else "ASC"
        return self._query(
            f"SELECT feature, fired, density, mean_activation, max_activation, "
            f"{self._summary_sql} AS summary FROM features "
            f"WHERE density >= ? AND density <= ? ORDER BY {order_by} {direction}, feature LIMIT ? OFFSET ?",
            min_density,
            max_density,
            int(limit),
            int(offset),
        )

    def summaries(self, features: list[int] | None = None) -> dict[int, str]:
        """{feature: one-line summary} of `features` (every feature when None; '' for unknown
        ids and version 1 stores). The whole column is read once and kept in memory."""
        if self._summaries is None:
            frame = self._query(f"SELECT feature, {self._summary_sql} AS summary FROM features")
            self._summaries = dict(zip(frame["feature"].tolist(), frame["summary"].tolist()))
        if features is None:
            return dict(self._summaries)
        return {int(f): self._summaries.get(int(f), "") for f in features}

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
        stats = self._query(
            f"SELECT *, {self._summary_sql} AS summary_text FROM features WHERE feature = ?", int(feature)
        )
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
            summary=str(row.summary_text),
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
                int(feature),
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
        if self.version >= 3:  # older stores have no heads table
            page.heads = self._query(
                "SELECT head, norm, share FROM heads WHERE feature = ? ORDER BY head", int(feature)
            )
        return page

    # --- search --------------------------------------------------------------------------
    def token_ids(self, text: str, case: bool = True) -> list[int]:
        """Vocabulary ids whose text is exactly `text` (spaces and newlines count; `case=False`
        compares casefolded texts)."""
        if self._by_text is None:
            by_text: dict[str, list[int]] = {}
            for token, token_text in self.vocab.items():
                by_text.setdefault(token_text, []).append(token)
            self._by_text = by_text
        if case:
            return sorted(self._by_text.get(text, []))
        if self._by_folded is None:
            by_folded: dict[str, list[int]] = {}
            for token_text, ids in self._by_text.items():
                by_folded.setdefault(token_text.casefold(), []).extend(ids)
            self._by_folded = by_folded
        return sorted(self._by_folded.get(text.casefold(), []))

    def search_tokens(self, text: str, limit: int = 50, case: bool = True) -> TokenHits:
        """Features that fire on the token `text` (exact text: " the" is not "thee"; "\\n" is a
        newline token) at any position of their kept (top and quantile) examples, most examples
        peaking there first, then most firing positions, then largest activation there.
        `total` counts every matching feature; `table` holds the first `limit`."""
        ids = self.token_ids(text, case) if text else []
        if not ids:
            return TokenHits(pd.DataFrame(columns=_HIT_COLUMNS), 0)
        listed = ", ".join(str(int(t)) for t in ids)
        if self.version >= 2:
            source = (
                f"SELECT feature, hits, peaks, max_activation FROM token_features WHERE token IN ({listed})"
            )
        else:  # version 1: no token table; scan the examples
            source = (
                "SELECT feature, 1 AS hits, (i = position - start + 1)::INTEGER AS peaks, "
                "a AS max_activation FROM (SELECT feature, position, start, unnest(tokens) AS t, "
                "unnest(activations) AS a, unnest(range(1, len(tokens) + 1)) AS i FROM examples) "
                f"WHERE a > 0 AND t IN ({listed})"
            )
        frame = self._query(
            f"WITH hit AS ({source}), per AS (SELECT feature, sum(hits)::BIGINT AS hits, "
            "sum(peaks)::BIGINT AS peaks, max(max_activation) AS max_activation FROM hit GROUP BY feature) "
            f"SELECT per.feature, {self._summary_sql} AS summary, per.hits, per.peaks, per.max_activation, "
            "f.density, count(*) OVER () AS total FROM per JOIN features f ON f.feature = per.feature "
            "ORDER BY per.peaks DESC, per.hits DESC, per.max_activation DESC, per.feature LIMIT ?",
            int(limit),
        )
        total = int(frame["total"].iloc[0]) if len(frame) else 0
        return TokenHits(frame.drop(columns="total").reset_index(drop=True), total)

    def search_text(self, query: str, limit: int = 50) -> pd.DataFrame:
        """Features whose label, notes, explanation or summary contains `query` (case-insensitive):
        columns feature, summary, label, explanation, where (the fields that matched, e.g.
        "label, summary"); labels first, then explanations, then summaries, then by feature.
        `attrs["total"]` counts every match before `limit`."""
        needle = query.strip().casefold()
        if not needle:
            frame = pd.DataFrame(columns=_TEXT_COLUMNS)
            frame.attrs["total"] = 0
            return frame
        self.summaries([])  # reads the column once
        summaries = self._summaries or {}
        if self._folded is None:
            self._folded = [(f, text.casefold()) for f, text in summaries.items()]
        labels, explained = self.labels.all(), self.explanations()
        matched, order = match_text(needle, self._folded, labels, explained)
        rows = [
            (
                f,
                summaries.get(f, ""),
                labels.get(f, {}).get("label", ""),
                str(explained.get(f, {}).get("explanation", "")),
                ", ".join(matched[f]),
            )
            for f in order[: int(limit)]
        ]
        frame = pd.DataFrame(rows, columns=_TEXT_COLUMNS)
        frame.attrs["total"] = len(order)
        return frame

    # --- companion files -------------------------------------------------------------------
    @property
    def labels(self) -> Labels:
        """The writable labels file beside the store (`workbench.labels.Labels`)."""
        if self._labels is None:
            self._labels = Labels(self.path)
        return self._labels

    def explanations(self) -> dict[int, dict]:
        """{feature: explanation entry} from the explanations file beside the store ({} when
        there is none); re-read only when the file changes."""
        path = explanations_path(self.path)
        try:
            stat = path.stat()
            stamp: object = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp is None:
            return {}
        if stamp != self._explained[0]:
            self._explained = (stamp, read_explanations(self.path))
        return dict(self._explained[1])

    def cache_folder(self) -> Path | None:
        """The cache the store was built from (meta "cache"), None when it is not on this machine.
        A relative path (stores before issue 20) is tried from the working directory, then from
        each folder above the store."""
        recorded = Path(self.meta.get("cache") or "")
        if not str(self.meta.get("cache") or ""):
            return None
        tries = (
            [recorded] if recorded.is_absolute() else [recorded, *(p / recorded for p in self.path.parents)]
        )
        return next((folder for folder in tries if folder.is_dir()), None)

    def long_context(self, example: Example, radius: int = 32) -> tuple[list[int], int] | None:
        """(tokens, start) of `example`'s window from `radius` tokens before its peak to `radius`
        after (clipped to the window), read from the cache's tokens.safetensors; `start` is the
        window position of tokens[0]. None when the cache is not on this machine; StoreError when
        the cache no longer holds the store's windows."""
        from workbench.cache_reader import TOKENS_FILE

        folder = self.cache_folder()
        tokens_file = folder / TOKENS_FILE if folder else None
        if tokens_file is None or not tokens_file.is_file():
            return None
        row = _window_tokens(tokens_file, int(example.window))
        low = max(0, int(example.position) - int(radius))
        high = min(len(row), int(example.position) + int(radius) + 1)
        if row[example.start : example.start + len(example.tokens)].tolist() != list(example.tokens):
            raise StoreError(
                f"{tokens_file}: window {example.window} differs from the store's example "
                "(the cache was rebuilt); rerun `workbench analyze`"
            )
        return row[low:high].tolist(), low


def _window_tokens(tokens_file: Path, window: int) -> np.ndarray:
    """One window's tokens, read without loading the whole file."""
    from safetensors import safe_open

    try:
        with safe_open(str(tokens_file), framework="np") as handle:
            rows = handle.get_slice("tokens")
            n_windows = rows.get_shape()[0]
            if not 0 <= window < n_windows:
                raise StoreError(
                    f"{tokens_file}: no window {window} (it holds {n_windows}); the cache is not the "
                    "store's; rerun `workbench analyze`"
                )
            return np.asarray(rows[window : window + 1][0])
    except StoreError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise StoreError(f"{tokens_file}: unreadable token windows ({str(exc).splitlines()[0]})") from None


def find_stores(roots: list[str | os.PathLike]) -> list[Path]:
    """Store files given directly, or found (recursively) under the given folders."""
    found: list[Path] = []
    for root in map(Path, roots):
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(sorted(root.rglob(STORE_FILE)))
    return found
