"""Bounded per-feature selections over a stream: each feature keeps the `size` entries with the
smallest keys seen so far, with a payload per entry.

With key = -activation this is a top-N heap; with key = an independent uniform random number it
is a uniform sample without replacement (a bottom-k sketch: the `size` smallest keys of a stream
are a uniform sample of it, and the smallest keys of a union are the smallest of the parts').
Memory is [features, size] whatever the stream's length. Slots are unordered (`in_key_order`
sorts them); an `offer` computes the payload only of the entries that get in and writes them
into the slots they evict, so its cost follows the entries, not the store. The arrays live on
the device given at construction (`to` moves them); offered entries must be there too.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Payload = dict[str, Tensor]


def ranked_within_groups(groups: Tensor, keys: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Entries sorted by group, then key (ascending, ties in input order): (the sorting indices,
    the distinct groups and their sizes in that order, each sorted entry's rank in its group)."""
    order = torch.argsort(keys, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    distinct, sizes = torch.unique_consecutive(groups[order], return_counts=True)
    rank = torch.arange(order.numel(), device=order.device) - torch.repeat_interleave(
        torch.cumsum(sizes, 0) - sizes, sizes
    )
    return order, distinct, sizes, rank


class SmallestKeys:
    def __init__(
        self,
        n_latents: int,
        size: int,
        payload: dict[str, tuple[tuple[int, ...], torch.dtype]],
        device: torch.device | str = "cpu",
    ):
        self.size = size
        self.keys = torch.full((n_latents, size), float("inf"), device=device)
        # the largest key held, per feature
        self.worst = torch.full((n_latents,), float("inf"), device=device)
        self.data = {
            name: torch.zeros((n_latents, size, *shape), dtype=dtype, device=device)
            for name, (shape, dtype) in payload.items()
        }

    def to(self, device: torch.device | str) -> "SmallestKeys":
        """Move the arrays to `device` (in place); returns self."""
        self.keys, self.worst = self.keys.to(device), self.worst.to(device)
        self.data = {name: value.to(device) for name, value in self.data.items()}
        return self

    def count(self) -> Tensor:
        """Entries held per feature, [features]."""
        return torch.isfinite(self.keys).sum(dim=1)

    def in_key_order(self) -> Tensor:
        """[features, size] slot indices sorting each feature's entries by key (empty slots last)."""
        return torch.argsort(self.keys, dim=1, stable=True)

    def offer(self, features: Tensor, keys: Tensor, make_payload: Callable[[Tensor], Payload]) -> None:
        """Offer entries (feature [M], key [M]); `make_payload(idx)` builds the payload of the
        entries `idx` (into these arrays) that get in."""
        beats = (keys < self.worst[features]).nonzero().squeeze(1)
        if beats.numel() == 0:
            return
        order, touched, counts, rank = ranked_within_groups(features[beats], keys[beats])
        order = beats[order]
        keep = rank < self.size
        candidates, rank = order[keep], rank[keep]
        device = self.keys.device
        row = torch.repeat_interleave(
            torch.arange(touched.numel(), device=device), counts.clamp(max=self.size)
        )

        merged = torch.full((touched.numel(), 2 * self.size), float("inf"), device=device)
        merged[:, : self.size] = self.keys[touched]
        merged[row, self.size + rank] = keys[candidates].float()
        picked = torch.zeros_like(merged, dtype=torch.bool)
        picked.scatter_(1, merged.topk(self.size, dim=1, largest=False).indices, True)
        index = torch.full((touched.numel(), self.size), -1, dtype=torch.long, device=device)
        index[row, rank] = candidates
        entering = (picked[:, self.size :] & (index >= 0)).nonzero()  # row by row
        # Slots to write, per row: first those whose entry lost, then empty ones; as many as enter.
        held = torch.isfinite(merged[:, : self.size])
        priority = torch.where(picked[:, : self.size] & held, 2, torch.where(held, 0, 1))
        slot_order = torch.argsort(priority, dim=1, stable=True)
        n_enter = torch.bincount(entering[:, 0], minlength=touched.numel())
        rows, columns = (torch.arange(self.size, device=device)[None, :] < n_enter[:, None]).nonzero(
            as_tuple=True
        )
        winners = index[entering[:, 0], entering[:, 1]]
        features_hit, slots = touched[rows], slot_order[rows, columns]
        self.keys[features_hit, slots] = keys[winners].float()
        for name, value in make_payload(winners).items():
            self.data[name][features_hit, slots] = value.to(self.data[name].dtype)
        self.worst[touched] = self.keys[touched].max(dim=1).values
