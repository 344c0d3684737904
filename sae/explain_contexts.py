"""The contexts of detection scoring: which examples the explainer sees, which are held out, and
contexts where a feature does not fire.

Held out: a feature's quantile examples (a uniform sample of its firings, so weak activations
count) that overlap no top example, permuted by a generator seeded from (seed, feature); the
first `holdout` that overlap no other held-out one are held out, and the rest, less those that
overlap a held-out one, may be shown. Non-activating: random spans of cached windows, each
encoded with the dictionary from the cache's own activations at the store's hook, kept for a
feature only where it is 0 on every token of the span (checked, not assumed).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.seeding import generator
from workbench.store import Example, FeaturePage, FeatureStore

POOL_SPANS = 256
"""Candidate non-activating spans drawn (once for all features), from at most `_MAX_SHARDS` shards."""
_MAX_SHARDS = 4


class Context(NamedTuple):
    tokens: list[int]
    label: int
    """1: a held-out activating example; 0: a span where the feature is 0 on every token."""
    window: int
    start: int
    """Window position of tokens[0]."""


class Split(NamedTuple):
    shown: list[Example]
    """Shown to the explainer: top examples first, then quantile examples not held out."""
    held_out: list[Example]
    """Activating examples kept from the explainer, for scoring."""


def _overlap(a: Example, b: Example) -> bool:
    return a.window == b.window and a.start < b.start + len(b.tokens) and b.start < a.start + len(a.tokens)


def split_examples(page: FeaturePage, examples: int, holdout: int, seed: int) -> Split:
    """Shown and held-out examples of one feature; the same (page, examples, holdout, seed) give
    the same split. Half of `examples` (rounded down) are quantile examples when there are enough."""
    candidates = [q for q in page.quantiles if not any(_overlap(q, t) for t in page.top)]
    order = torch.randperm(len(candidates), generator=generator(seed, "explain-holdout", page.feature))
    held: list[Example] = []
    for i in order.tolist():
        if len(held) < holdout and not any(_overlap(candidates[i], h) for h in held):
            held.append(candidates[i])
    rest = [
        candidates[i]
        for i in order.tolist()
        if not any(candidates[i] is h or _overlap(candidates[i], h) for h in held)
    ]
    n_rest = min(len(rest), examples // 2)
    top = page.top[: examples - n_rest]
    n_rest = min(len(rest), examples - len(top))
    return Split(top + sorted(rest[:n_rest], key=lambda e: -e.activation), held)


def held_out_contexts(split: Split) -> list[Context]:
    return [Context(e.tokens, 1, e.window, e.start) for e in split.held_out]


def silent_contexts(
    store: FeatureStore, features: Sequence[int], length: int, count: int, seed: int
) -> dict[int, list[Context]]:
    """Up to `count` spans of `length` tokens per feature where it never fires, from the cache
    and dictionary the store was built from (store.meta "cache", "dictionary_path", "hook").
    Raises WorkbenchError (one line) when either is missing or does not match the store."""
    from sae.io import load
    from workbench.cache_reader import ActivationCache

    meta = store.meta
    if not meta.get("cache") or not meta.get("dictionary_path"):
        raise WorkbenchError("the store names no cache or dictionary")
    cache = ActivationCache(meta["cache"])
    cache.require_tokens("finding contexts where a feature is silent")
    dictionary = load(meta["dictionary_path"])
    hook = meta["hook"]
    cache.expect(hook=hook, width=dictionary.d_in)
    if dictionary.n_latents != store.n_latents:
        raise WorkbenchError(
            f"{meta['dictionary_path']}: {dictionary.n_latents} latents, the store has {store.n_latents}"
        )
    length = max(1, min(length, cache.context_length - 1))
    windows, starts, rows = _spans(cache, hook, length, seed)
    index = torch.tensor(list(features), dtype=torch.long)
    with torch.no_grad():
        acts = torch.cat(
            [dictionary.encode(chunk).to_dense()[:, index] for chunk in rows.split(max(1, 4096 // length))]
        )  # [spans * length, features] -> is each feature silent over each span?
    silent = acts.reshape(len(windows), length, len(index)).amax(dim=1) <= 0
    tokens = cache.tokens
    out = {}
    for j, feature in enumerate(features):
        spans = silent[:, j].nonzero().flatten()
        pick = spans[torch.randperm(len(spans), generator=generator(seed, "explain-negatives", feature))]
        out[int(feature)] = [
            Context(tokens[windows[s], starts[s] : starts[s] + length].tolist(), 0, windows[s], starts[s])
            for s in pick[:count].tolist()
        ]
    return out


def _spans(cache, hook: str, length: int, seed: int) -> tuple[list[int], list[int], torch.Tensor]:
    """(windows, starts, activations [spans * length, d]) of up to POOL_SPANS random spans, one
    per window, read from at most _MAX_SHARDS shards in a seeded order (the BOS position skipped)."""
    g = generator(seed, "explain-negative-spans")
    ctx = cache.context_length
    shards = cache.shard_rows(hook)
    windows, starts, blocks = [], [], []
    for index in torch.randperm(len(shards), generator=g)[:_MAX_SHARDS].tolist():
        first_row, n_rows = shards[index]
        first = -(-first_row // ctx)  # whole windows inside the shard
        n_windows = (first_row + n_rows) // ctx - first
        if n_windows <= 0:
            continue
        x = cache.shard(hook, index).float()
        for w in torch.randperm(n_windows, generator=g)[: POOL_SPANS - len(windows)].tolist():
            start = 1 + int(torch.randint(ctx - length, (1,), generator=g))
            row = (first + w) * ctx + start - first_row
            windows.append(first + w)
            starts.append(start)
            blocks.append(x[row : row + length])
        if len(windows) >= POOL_SPANS:
            break
    if not windows:
        raise WorkbenchError(f"{cache.path}: no whole window in any shard of {hook}")
    return windows, starts, torch.cat(blocks)
