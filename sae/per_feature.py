"""Bounded per-feature selections over a stream: each feature keeps the `size` entries with the
smallest keys seen so far, with a payload per entry.

With key = -activation this is a top-N heap; with key = an independent uniform random number it
is a uniform sample without replacement (a bottom-k sketch: the `size` smallest keys of a stream
are a uniform sample of it, and the smallest keys of a union are the smallest of the parts').
Memory is [features, size] whatever the stream's length; each `offer` costs a sort of the
entries that beat their feature's current worst key, so it gets cheaper as the stream goes on.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Payload = dict[str, Tensor]


class SmallestKeys:
    def __init__(self, n_features: int, size: int, payload: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.size = size
        self.keys = torch.full((n_features, size), float("inf"))  # each row sorted ascending
        self.data = {name: torch.zeros((n_features, size, *shape), dtype=dtype) for name, (shape, dtype) in payload.items()}

    def count(self) -> Tensor:
        """Entries held per feature, [features]."""
        return torch.isfinite(self.keys).sum(dim=1)

    def offer(self, features: Tensor, keys: Tensor, make_payload: Callable[[Tensor], Payload]) -> None:
        """Offer entries (feature [M], key [M]); `make_payload(idx)` builds the payload of the
        entries `idx` (into these arrays) that are candidates, so it is computed only for those."""
        beats = (keys < self.keys[features, -1]).nonzero().squeeze(1)
        if beats.numel() == 0:
            return
        order = beats[torch.argsort(keys[beats], stable=True)]
        order = order[torch.argsort(features[order], stable=True)]  # by feature, then key
        touched, counts = torch.unique_consecutive(features[order], return_counts=True)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rank = torch.arange(order.numel()) - first
        keep = rank < self.size
        chosen, rank = order[keep], rank[keep]
        slot = torch.repeat_interleave(torch.arange(touched.numel()), counts.clamp(max=self.size))

        merged_keys = torch.full((touched.numel(), 2 * self.size), float("inf"))
        merged_keys[:, : self.size] = self.keys[touched]
        merged_keys[slot, self.size + rank] = keys[chosen].float()
        new_keys, picked = merged_keys.topk(self.size, dim=1, largest=False, sorted=True)
        payload = make_payload(chosen)
        for name, store in self.data.items():
            merged = torch.zeros((touched.numel(), 2 * self.size, *store.shape[2:]), dtype=store.dtype)
            merged[:, : self.size] = store[touched]
            merged[slot, self.size + rank] = payload[name].to(store.dtype)
            index = picked.view(*picked.shape, *([1] * (store.dim() - 2))).expand(-1, -1, *store.shape[2:])
            store[touched] = merged.gather(1, index)
        self.keys[touched] = new_keys
