"""`workbench bench explore`, store part: the explorer's store queries on a store of full size.

A synthetic store of the size `workbench analyze` writes for a 16,384-latent dictionary over
1 M tokens: every live feature with its top and quantile examples (contexts and per-token
activations), the token → feature index, logit effects, decoder neighbours, correlated neurons,
co-occurrence, summaries, the per-head decoder split of an attention-output (hook_z) dictionary
and a 50,257-token vocabulary (byte tokens, newlines, leading spaces).
Random but well formed: the token windows are drawn from a Zipf law (as text is), each feature
prefers a few tokens and its examples peak on occurrences of them, cut from those windows (so
`long_context` reads them back from the windows' tokens.safetensors, written beside the store as
its cache). It is written once with `workbench.store.write_store` and reused (the folder's name
holds its sizes, seed and schema version). `time_queries` then times each store query the pages
make, interleaved, in one process.
"""

from __future__ import annotations

import gc
import string
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from workbench.bench import median
from workbench.store import SCHEMA_VERSION, FeatureStore, StoreError, list_column, write_store

QUERY_TARGET_MS = 50.0
VOCAB = 50_257
"""GPT-2's vocabulary size."""
COMMON = [" the", ",", ".", "\n", " and", " of", " to", " a", " I", " in", ":", " you", " my", " that"]
"""The most frequent token texts, in Zipf rank order (token ids 0, 1, ...)."""
N_HEADS = 12
"""Heads of the store's hook (GPT-2 small's blocks.0.attn.hook_z: 12 heads × 64 = d_in 768)."""
_DEAD = 0.02
"""Fraction of features that never fire."""


def default_folder() -> Path:
    return Path(tempfile.gettempdir()) / "workbench-bench-explore"


def store_name(n_latents: int, tokens: int, seed: int) -> str:
    """The cached store's folder: its sizes, seed, schema version and analyze's per-feature sizes
    (examples and their context), so a store built by older defaults is not reused."""
    from sae.analyze import AnalyzeConfig

    c = AnalyzeConfig()
    shape = f"top{c.top}-q{c.quantile_bins}x{c.per_bin}-ctx{c.context_before}+{c.context_after}"
    return f"synthetic-{n_latents}x{tokens}-v{SCHEMA_VERSION}-{shape}-seed{seed}"


def synthetic_store(folder: str | Path | None, n_latents: int, tokens: int, seed: int = 0) -> Path:
    """The synthetic store's path under `folder` (default: a folder in the system's temp
    folder), built first when it is not there yet (tens of seconds at 16k x 1M). Raises StoreError
    when it cannot be written."""
    home = Path(folder) if folder else default_folder()
    path = home / store_name(n_latents, tokens, seed) / "features.duckdb"
    if path.is_file():
        try:
            FeatureStore(path).close()
            return path
        except StoreError:
            pass  # a store of an older schema, or a damaged one: rebuilt below
    meta, tables = synthetic_tables(n_latents, tokens, seed=seed, cache=path.parent)
    return write_store(path, meta, tables)


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    """Token texts: COMMON first, then random words (most with a leading space), then 256 byte
    tokens (`<0xE2>`, rare as in GPT-2's vocabulary)."""
    n = max(size - len(COMMON) - 256, 0)
    lengths = rng.integers(1, 9, n)
    letters = "".join(np.array(list(string.ascii_letters))[rng.integers(0, 52, int(lengths.sum()))])
    ends = np.cumsum(lengths).tolist()
    words = [
        (" " if i % 5 else "") + letters[end - length : end]
        for i, (end, length) in enumerate(zip(ends, lengths.tolist()))
    ]
    return (COMMON + words + [f"<0x{b:02X}>" for b in range(256)])[:size]


def _windows(rng: np.random.Generator, n_windows: int, context: int, vocab: int) -> np.ndarray:
    """[n_windows, context] int32 tokens, Zipf-Mandelbrot distributed (p ∝ 1/(rank + 2.7))."""
    p = 1.0 / (np.arange(vocab) + 2.7)
    return rng.choice(vocab, size=(n_windows, context), p=p / p.sum()).astype(np.int32)


def synthetic_tables(
    n_latents: int, tokens: int, *, seed: int = 0, cache: str | Path = "", context: int = 128
) -> tuple[dict, dict[str, pa.Table]]:
    """(meta, tables) of a well-formed store (see the module docstring) at `analyze`'s default
    sizes per feature; the token windows are saved to `cache`/tokens.safetensors when `cache`
    is given (as a cache's would be)."""
    from sae.analyze import AnalyzeConfig
    from sae.summaries import add_summaries

    config = AnalyzeConfig()
    rng = np.random.default_rng(seed)
    n_windows = max(1, -(-tokens // context))
    windows = _windows(rng, n_windows, context, VOCAB)
    windows[:, 0] = VOCAB - 1  # BOS: never analyzed
    if cache:
        _save_windows(Path(cache), windows)
    texts = _vocabulary(rng, VOCAB - 1) + ["<|endoftext|>"]
    n_tokens = n_windows * (context - 1)
    features = _features(rng, n_latents, n_tokens, config.histogram_bins)
    examples = _examples(rng, windows, features["fired"], features["max_activation"], config)
    logits = rng.integers(0, VOCAB - 1, (n_latents, config.logit_tokens)).astype(np.int32)
    tables = {
        "features": _features_table(features),
        "examples": examples,
        "logits": _logits(logits, config.logit_tokens),
        "neighbours": _ranked_table(
            rng, np.arange(n_latents), config.neighbours, "other", n_latents, "cosine"
        ),
        "neurons": _ranked_table(rng, np.arange(n_latents), config.neurons, "neuron", 768, "correlation"),
        "cooccurrence": _cooccurrence(rng, features["fired"], config.cooccurrence_top, n_tokens),
        "vocab": pa.table({"token": np.arange(VOCAB, dtype=np.int32), "text": texts}),
        "heads": _heads(rng, n_latents, N_HEADS),
    }
    add_summaries(tables, texts, context)  # the summary column and the token index, as analyze adds them
    meta = {
        "n_latents": n_latents,
        "d_in": 768,
        "architecture": "topk",
        "k": 32,
        "hook": "blocks.0.attn.hook_z",
        "n_heads": N_HEADS,
        "model": "synthetic",
        "cache": str(Path(cache).resolve()) if cache else "",
        "dictionary_path": "",
        "tokens_analyzed": n_tokens,
        "context_length": context,
        "histogram_edges": np.logspace(-2, 1.6, config.histogram_bins + 1).tolist(),
        "metrics": {"fvu": 0.1, "l0": 32.0},
        "config": {"synthetic": True, "seed": seed},
    }
    return meta, tables


def _heads(rng: np.random.Generator, n: int, n_heads: int) -> pa.Table:
    """The `heads` table of an attention-output (hook_z) store: per feature, a decoder norm per
    head, most of it on one or two heads (as Kissane et al. 2024 find), and the shares."""
    norms = rng.gamma(0.3, 1.0, (n, n_heads)) + 1e-3
    shares = norms / norms.sum(1, keepdims=True)
    return pa.table(
        {
            "feature": np.repeat(np.arange(n, dtype=np.int32), n_heads),
            "head": np.tile(np.arange(n_heads, dtype=np.int16), n),
            "norm": norms.reshape(-1).astype(np.float32),
            "share": shares.reshape(-1).astype(np.float32),
        }
    )


def _save_windows(folder: Path, windows: np.ndarray) -> None:
    import torch

    from workbench.files import save_tensors_atomic

    folder.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(folder / "tokens.safetensors", {"tokens": torch.from_numpy(windows)})


def _features(rng: np.random.Generator, n: int, n_tokens: int, bins: int) -> dict[str, np.ndarray]:
    density = np.clip(10 ** rng.normal(-3.0, 0.8, n), 1.0 / n_tokens, 0.2)
    fired = np.maximum(1, np.round(density * n_tokens)).astype(np.int64)
    fired[rng.random(n) < _DEAD] = 0
    peak = np.exp(rng.normal(1.5, 0.5, n)) * (fired > 0)
    shape = np.exp(-0.5 * ((np.arange(bins) - bins * 0.7) / (bins * 0.12)) ** 2)
    histogram = rng.poisson(fired[:, None] * (shape / shape.sum())[None, :]).astype(np.int32)
    return {
        "feature": np.arange(n, dtype=np.int32),
        "fired": fired,
        "density": fired / n_tokens,
        "mean_activation": peak * rng.uniform(0.2, 0.5, n),
        "max_activation": peak,
        "histogram": histogram,
    }


def _features_table(columns: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({**columns, "histogram": list_column(columns["histogram"], pa.int32())})


def _examples(
    rng: np.random.Generator, windows: np.ndarray, fired: np.ndarray, peak: np.ndarray, config
) -> pa.Table:
    """Top examples (the feature's largest activations) then quantile groups, as analyze orders
    them; each peaks on an occurrence of one of its feature's three preferred tokens."""
    n_windows, context = windows.shape
    width = min(config.context_before + config.context_after + 1, context)
    flat = windows.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=VOCAB)
    first = np.cumsum(counts) - counts
    seen = np.flatnonzero((counts > 0) & (np.arange(VOCAB) != VOCAB - 1))
    n = len(fired)
    by_frequency = flat[rng.integers(0, flat.size, (n, 3))]
    preferred = np.where(rng.random((n, 3)) < 0.5, by_frequency, seen[rng.integers(0, len(seen), (n, 3))])
    preferred = np.where(preferred == VOCAB - 1, seen[0], preferred)  # a BOS drawn: never a peak
    parts = []
    for kind, per_feature in (("top", config.top), ("quantile", config.quantile_bins * config.per_bin)):
        kept = np.minimum(fired, per_feature)
        feature = np.repeat(np.arange(n), kept)
        index = np.arange(len(feature)) - np.repeat(np.cumsum(kept) - kept, kept)  # within its feature
        size = np.maximum(kept[feature], 1)
        if kind == "top":
            group, rank = np.zeros_like(index), index
            activation = peak[feature] * (1 - 0.5 * index / per_feature)
        else:
            group = index * config.quantile_bins // size
            rank = index - -(-group * size // config.quantile_bins)
            activation = peak[feature] * 0.9 * (group + rng.random(len(group))) / config.quantile_bins
        token = preferred[feature, rng.choice(3, len(feature), p=[0.6, 0.3, 0.1])]
        flat_position = order[first[token] + (rng.random(len(token)) * counts[token]).astype(np.int64)]
        window, position = flat_position // context, flat_position % context
        start = np.clip(position - config.context_before, 0, context - width)
        columns = start[:, None] + np.arange(width)
        acts = np.where(rng.random(columns.shape) < 0.25, rng.random(columns.shape) * 0.6, 0.0)
        acts = acts * activation[:, None]
        acts[np.arange(len(acts)), position - start] = activation
        parts.append(
            {
                "feature": feature.astype(np.int32),
                "kind": np.full(len(feature), kind),
                "bin": group.astype(np.int16),
                "rank": rank.astype(np.int16),
                "activation": activation.astype(np.float32),
                "window_id": window.astype(np.int32),
                "position": position.astype(np.int16),
                "start": start.astype(np.int16),
                "tokens": windows[window[:, None], columns],
                "activations": acts.astype(np.float32),
            }
        )
    joined = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    joined["tokens"] = list_column(joined["tokens"], pa.int32())
    joined["activations"] = list_column(joined["activations"], pa.float32())
    return pa.table(joined)


def _logits(top_tokens: np.ndarray, k: int) -> pa.Table:
    n = len(top_tokens)
    rng = np.random.default_rng(n)
    effect = np.sort(rng.exponential(0.3, (n, k)), axis=1)[:, ::-1] + 0.1
    sides = [("top", top_tokens, effect), ("bottom", rng.integers(0, VOCAB - 1, (n, k)), -effect)]
    return pa.table(
        {
            "feature": np.concatenate([np.repeat(np.arange(n), k)] * 2).astype(np.int32),
            "side": np.concatenate([np.full(n * k, side) for side, _, _ in sides]),
            "rank": np.tile(np.arange(k), 2 * n).astype(np.int16),
            "token": np.concatenate([tokens.ravel() for _, tokens, _ in sides]).astype(np.int32),
            "effect": np.concatenate([values.ravel() for _, _, values in sides]).astype(np.float32),
        }
    )


def _ranked_table(
    rng: np.random.Generator, features: np.ndarray, k: int, column: str, high: int, value: str
) -> pa.Table:
    """k rows per feature: `column` drawn from [0, high) (never the feature itself when they are
    features), `value` decreasing with rank."""
    n = len(features)
    other = rng.integers(0, high, (n, k))
    if column == "other":
        other = np.where(other == features[:, None], (other + 1) % high, other)
    values = np.sort(rng.uniform(0.05, 0.9, (n, k)), axis=1)[:, ::-1]
    return pa.table(
        {
            "feature": np.repeat(features, k).astype(np.int32),
            "rank": np.tile(np.arange(k), n).astype(np.int16),
            column: other.ravel().astype(np.int32),
            value: values.ravel().astype(np.float32),
        }
    )


def _cooccurrence(rng: np.random.Generator, fired: np.ndarray, k: int, n_tokens: int) -> pa.Table:
    alive = np.flatnonzero(fired > 0)
    table = _ranked_table(rng, alive, k, "other", len(fired), "rate")
    other = table["other"].to_numpy()
    lift = table["rate"].to_numpy() / np.maximum(fired[other] / n_tokens, 1e-9)
    return table.append_column("lift", pa.array(lift.astype(np.float32)))


def query_cases(store: FeatureStore, seed: int = 0) -> dict[str, object]:
    """{name: call} of each store query the explorer's pages make, each call with the next of a
    seeded stream of arguments (random live features, examples); long_context only when the
    store's cache is on this machine."""
    rng = np.random.default_rng(seed)
    alive = store.features(min_density=1e-12, limit=store.n_latents).feature.to_numpy()
    pick = lambda: int(alive[rng.integers(0, len(alive))])  # noqa: E731
    frequent, middling = COMMON[0], store.token_texts([300])[0]  # ranks 0 and 300 of the Zipf law
    cases = {
        "open store": lambda: FeatureStore(store.path).close(),
        "features() 5,000 by density": lambda: store.features(limit=5000),
        "feature(N)": lambda: store.feature(pick()),
    }
    cases["summaries() all"] = lambda: store.summaries()
    cases["summaries(10 ids)"] = lambda: store.summaries([pick() for _ in range(10)])
    cases[f"search_tokens({frequent!r})"] = lambda: store.search_tokens(frequent)
    cases[f"search_tokens({middling!r})"] = lambda: store.search_tokens(middling)
    cases["search_text('the')"] = lambda: store.search_text("the")
    if store.long_context(store.feature(int(alive[0])).top[0]):
        examples = [
            page.top[0] for page in map(store.feature, alive[rng.integers(0, len(alive), 16)]) if page.top
        ]
        cases["long_context(example)"] = lambda: store.long_context(examples[rng.integers(0, len(examples))])
    return cases


def _interleaved(cases: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each call, cases interleaved in every round; one garbage collection per round
    (workbench.bench.interleaved collects before every call, which costs more than these queries)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        gc.collect()
        for name, call in cases.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


def time_queries(path: str | Path, repeats: int = 20, seed: int = 0) -> list[dict]:
    """One row per query of `query_cases`: its first call (cold caches: vocabulary, summaries),
    then the median and max of `repeats` more, calls interleaved across queries, milliseconds,
    with the issue's target (50 ms) and whether the median meets it."""
    store = FeatureStore(path)
    try:
        cases = query_cases(store, seed)
        times = _interleaved(cases, repeats + 1)
    finally:
        store.close()
    rows = []
    for name, seconds in times.items():
        later = [s * 1e3 for s in seconds[1:]] or [seconds[0] * 1e3]
        middle = median(later)
        rows.append(
            {
                "query": name,
                "first_ms": round(seconds[0] * 1e3, 1),
                "median_ms": round(middle, 1),
                "max_ms": round(max(later), 1),
                "target_ms": QUERY_TARGET_MS,
                "met": "yes" if middle <= QUERY_TARGET_MS else "NO",
            }
        )
    return rows
