"""Training rows for a cross-layer transcoder: every layer's (MLP input, MLP output) pair of the
same token, read together from one activation cache that holds all those hooks.

The hooks of one cache are written in one pass, shard by shard, so shard i of every hook holds
the same tokens; `LayerPairs` checks that (equal shard row counts) and reads shard i of every
hook together. Kept rows are the trainer's (`workbench.cache_reader`): BOS positions skipped;
for a --from cache, its held-out rows left out. Order: shards shuffled per epoch and rows shuffled
within a pool of shards, from `workbench.seeding` streams of the run's seed.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from workbench import seeding
from workbench.cache_reader import ActivationCache, held_out_rows
from workbench.errors import CacheError

POOL_ROWS = 1 << 16


class LayerPairs:
    """xs [L x [N, d_in]] and ys [L x [N, d_out]] batches of the cache's kept rows."""

    def __init__(self, cache: ActivationCache, in_hooks: list, out_hooks: list, seed: int = 0):
        if len(in_hooks) != len(out_hooks) or not in_hooks:
            raise CacheError("a cross-layer transcoder needs one (in, out) hook pair per layer")
        hooks = [*in_hooks, *out_hooks]
        for hook in hooks:
            cache.expect(hook=hook)
        spans = cache.shard_rows(hooks[0])
        for hook in hooks[1:]:
            if cache.shard_rows(hook) != spans:
                raise CacheError(f"{cache.path}: hook {hook} is sharded unlike {hooks[0]}; rebuild the cache")
        widths_in = {cache.width(h) for h in in_hooks}
        widths_out = {cache.width(h) for h in out_hooks}
        if len(widths_in) != 1 or len(widths_out) != 1:
            raise CacheError(
                f"{cache.path}: the layers' input hooks (widths {sorted(widths_in)}) and output hooks "
                f"(widths {sorted(widths_out)}) must each have one width"
            )
        self.cache, self.in_hooks, self.out_hooks, self.seed = cache, list(in_hooks), list(out_hooks), seed
        self.spans, self.path, self.model = spans, cache.path, cache.model
        self.d_in, self.d_out = widths_in.pop(), widths_out.pop()
        self.n_layers = len(in_hooks)
        self.rows_per_epoch = cache.training_rows

    def _shard(self, index: int) -> Tensor:
        """[rows, L, d_in + d_out]: shard `index` of every hook, kept rows only."""
        start, n = self.spans[index]
        parts = [self.cache.shard(h, index).float() for h in (*self.in_hooks, *self.out_hooks)]
        rows = torch.arange(start, start + n)
        if self.cache.has_tokens:
            keep = rows % self.cache.context_length != 0
        else:
            keep = ~held_out_rows(rows, *self.cache.manifest.held_out)
        L = self.n_layers
        both = torch.stack([torch.cat([parts[l], parts[L + l]], dim=1) for l in range(L)], dim=1)
        return both[keep]

    def split(self, rows: Tensor) -> tuple[list, list]:
        """([x_l], [y_l]) of rows [N, L, d_in + d_out]."""
        d = self.d_in
        return [rows[:, l, :d] for l in range(self.n_layers)], [rows[:, l, d:] for l in range(self.n_layers)]

    def epoch(self, epoch: int, batch_size: int) -> Iterator[tuple[list, list]]:
        generator = seeding.generator(self.seed, "cross-layer order", epoch)
        order = torch.randperm(len(self.spans), generator=generator).tolist()
        pool = []
        for position, index in enumerate(order):
            pool.append(self._shard(index))
            if sum(len(p) for p in pool) < POOL_ROWS and position + 1 < len(order):
                continue
            rows = torch.cat(pool)
            rows = rows[torch.randperm(len(rows), generator=generator)]
            whole = len(rows) // batch_size * batch_size
            for start in range(0, whole, batch_size):
                yield self.split(rows[start : start + batch_size])
            pool = [rows[whole:]]

    def sample(self, n: int, stream: str) -> tuple[list, list]:
        """n kept rows (fewer if the cache is smaller) from shards in a seeded order of their own."""
        generator = seeding.generator(self.seed, "cross-layer sample", stream)
        got, total = [], 0
        for index in torch.randperm(len(self.spans), generator=generator).tolist():
            got.append(self._shard(index))
            total += len(got[-1])
            if total >= 4 * n:
                break
        rows = torch.cat(got)
        return self.split(rows[torch.randperm(len(rows), generator=generator)[:n]])
