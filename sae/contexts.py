"""A feature's activations over an example's longer context, re-encoded from the cache.

The store keeps each example's short context (`AnalyzeConfig.context_before/after`); the
explorer's "longer context" reads the example's window ± radius tokens from the cache
(`FeatureStore.long_context`) and the activations there by encoding the cache's activation rows
of those tokens with the store's dictionary, as `workbench analyze` did (BOS rows read 0).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from sae.base import Dictionary
from workbench.store import Example, FeatureStore, StoreError

_DICTIONARIES: OrderedDict[tuple[str, int], Dictionary] = OrderedDict()
_LOCK = threading.Lock()
_KEPT = 4


def context_activations(
    store: FeatureStore, example: Example, radius: int = 32, feature: int | None = None
) -> tuple[list[int], list[float]] | None:
    """(tokens, activations) of `feature` (default: the example's) over `example`'s window from
    `radius` tokens before its peak to `radius` after (clipped to the window); the tokens are
    `store.long_context`'s. None when the cache or the dictionary (meta "dictionary_path") is
    not on this machine; StoreError / CacheError / DictionaryError (one line) when they do not
    match the store."""
    feature = example.feature if feature is None else int(feature)
    if not 0 <= feature < store.n_latents:
        raise StoreError(f"feature {feature} is outside this store's 0..{store.n_latents - 1}")
    folder = store.meta.get("dictionary_path") or ""
    if not folder or not Path(folder).is_dir():
        return None
    span = store.long_context(example, radius)
    cache_folder = store.cache_folder()
    if span is None or cache_folder is None or not (cache_folder / "manifest.json").is_file():
        return None
    tokens, start = span
    dictionary = _dictionary(Path(folder))
    x = cache_rows(store, int(example.window), start, len(tokens))
    with torch.no_grad():
        codes = dictionary.encode(x.float()).to_dense()
    if codes.shape[1] != store.n_latents:
        raise StoreError(
            f"{folder}: the dictionary has {codes.shape[1]} latents, the store {store.n_latents}; "
            "rerun `workbench analyze`"
        )
    acts = codes[:, feature].clone()
    if start == 0:
        acts[0] = 0.0  # the BOS row, never analyzed
    return tokens, acts.tolist()


def cache_rows(store: FeatureStore, window: int, start: int, n: int) -> torch.Tensor:
    """The cache's activation rows [n, d] at the store's hook for window positions start..start+n,
    read by slicing the shard files (no shard is loaded whole)."""
    from safetensors import safe_open

    from workbench.cache_reader import ActivationCache

    folder = store.cache_folder()
    if folder is None:
        raise StoreError(f"{store.path}: its cache {store.meta.get('cache')!r} is not on this machine")
    cache = ActivationCache(folder)  # CacheError (one line) without a readable manifest
    hook = store.meta["hook"]
    cache.expect(hook=hook)
    first = window * cache.context_length + start
    parts, offset = [], 0
    for info in cache.manifest.hooks[hook][1]:
        low, high = max(first, offset), min(first + n, offset + info.rows)
        if low < high:
            try:
                with safe_open(str(cache.path / info.file), framework="pt") as handle:
                    parts.append(handle.get_slice("activations")[low - offset : high - offset])
            except Exception as exc:  # missing, truncated or foreign file
                raise StoreError(
                    f"{cache.path / info.file}: unreadable activations ({str(exc).splitlines()[0]})"
                ) from None
        offset += info.rows
    rows = torch.cat(parts) if parts else torch.zeros(0)
    if len(rows) != n:
        raise StoreError(f"{cache.path}: rows {first}..{first + n} are not all in the cache")
    return rows


def _dictionary(folder: Path) -> Dictionary:
    """The dictionary of `folder`, loaded once while its weights file is unchanged (a few kept)."""
    from sae.io import load

    stamp = max((p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()), default=0)
    key = (str(folder.resolve()), stamp)
    with _LOCK:
        if key in _DICTIONARIES:
            _DICTIONARIES.move_to_end(key)
            return _DICTIONARIES[key]
    dictionary = load(folder).eval()
    with _LOCK:
        _DICTIONARIES[key] = dictionary
        while len(_DICTIONARIES) > _KEPT:
            _DICTIONARIES.popitem(last=False)
    return dictionary
