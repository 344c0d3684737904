"""Selections on a dense pre-activation tensor [N, m] (no autograd): which (row, latent) entries
a dictionary keeps. Each returns SparseCodes holding the selected pre-activation values."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from workbench.distributed import all_reduce_sum, world_size
from workbench.kernels.codes import KernelInputError, SparseCodes, csr_offsets


def top_k(pre: Tensor, k: int) -> SparseCodes:
    if not 0 < k <= pre.shape[1]:
        raise KernelInputError(f"top-k: k must be in [1, {pre.shape[1]}], got {k}")
    values, indices = pre.topk(k, dim=1, sorted=False)
    return SparseCodes(indices, values, pre.shape[1])


def _global_kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest of all ranks' `values` (every rank passes equally many)."""
    import torch.distributed as dist

    local = values.topk(min(k, values.numel())).values
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).topk(k).values[-1]


def masked_top_k(pre: Tensor, k: int, mask: Tensor) -> SparseCodes:
    """Per-row top-k among the latents where `mask` [m] is true (AuxK's dead latents), as CSR:
    k is capped at the number of such latents, and rows with none are empty."""
    if mask.shape != (pre.shape[1],) or mask.dtype != torch.bool:
        raise KernelInputError(f"masked top-k: mask must be bool [{pre.shape[1]}], got {mask.dtype} {tuple(mask.shape)}")
    allowed = mask.nonzero().squeeze(1)
    k = min(k, allowed.numel())
    n = pre.shape[0]
    if k == 0:
        return SparseCodes(allowed.new_zeros(0), pre.new_zeros(0), pre.shape[1], allowed.new_zeros(n + 1))
    values, where = pre.index_select(1, allowed).topk(k, dim=1, sorted=False)
    offsets = torch.arange(n + 1, device=pre.device) * k
    return SparseCodes(allowed[where].reshape(-1), values.reshape(-1), pre.shape[1], offsets)


def batch_top_k(pre: Tensor, k: int) -> SparseCodes:
    """The N * k largest entries of the whole batch (BatchTopK), as CSR.

    Exact, without sorting all N * m entries: each row's top c*k entries are candidates; the
    global top N*k of the candidates is the answer unless some row had every candidate chosen
    (then it may own more), in which case c doubles until no row is saturated.

    Under torchrun the batch is every rank's rows together: each rank's candidates are cut at
    the global (N_all * k)-th largest value (all ranks hold equally many rows).
    """
    n, m = pre.shape
    world = world_size()
    total = n * k * world
    if not 0 < k <= m:
        raise KernelInputError(f"batch top-k: k must be in [1, {m}], got {k}")
    per_row = min(m, 4 * k)
    while True:
        cand_values, cand_indices = pre.topk(per_row, dim=1, sorted=False)
        flat = cand_values.reshape(-1)
        if world == 1:
            chosen = flat.topk(total, sorted=False).indices
        else:
            chosen = (flat >= _global_kth_largest(flat, total)).nonzero().squeeze(1)
        saturated = bool((torch.bincount(chosen // per_row, minlength=n) >= per_row).any())
        if world > 1:  # every rank widens its candidates together
            saturated = bool(all_reduce_sum(torch.tensor([int(saturated)])).item())
        if per_row == m or not saturated:
            break
        per_row = min(m, 2 * per_row)
    chosen = chosen.sort().values  # row-major: rows ascending
    offsets = csr_offsets(chosen // per_row, n)
    return SparseCodes(cand_indices.reshape(-1)[chosen], cand_values.reshape(-1)[chosen], m, offsets)


def column_top_k(pre: Tensor, per_column: int) -> SparseCodes:
    """Each latent's `per_column` largest entries over the rows (Feature Choice), as CSR."""
    n, m = pre.shape
    if not 0 < per_column <= n:
        raise KernelInputError(f"column top-k: per-latent count must be in [1, {n}], got {per_column}")
    values, rows = pre.topk(per_column, dim=0, sorted=False)  # [per_column, m]
    cols = torch.arange(m, device=pre.device).expand_as(rows)
    order = (rows * m + cols).reshape(-1).argsort()
    rows = rows.reshape(-1)[order]
    return _csr(rows, cols.reshape(-1)[order], values.reshape(-1)[order], pre.shape)


def above_threshold(pre: Tensor, threshold: Tensor, *, window: float = 0.0) -> SparseCodes:
    """Entries with pre > threshold[latent] (JumpReLU, Gated), as CSR. With window > 0 the codes'
    `extra` holds the entries with |pre - threshold| < window / 2 (the JumpReLU threshold's
    straight-through window), whatever side of the threshold they fall on.

    One compare over the dense tensor (against threshold - window / 2) finds every candidate;
    the split into active and window entries happens on the few candidates."""
    if threshold.shape != (pre.shape[1],):
        raise KernelInputError(f"threshold must be [{pre.shape[1]}], got {tuple(threshold.shape)}")
    lower = threshold - window / 2 if window > 0 else threshold
    rows, cols = (pre > lower).nonzero(as_tuple=True)  # row-major order
    values = pre[rows, cols]
    gap = values - threshold[cols]
    active = gap > 0
    codes = _csr(rows[active], cols[active], values[active], pre.shape)
    if window > 0:
        near = gap.abs() < window / 2
        codes = replace(codes, extra=_csr(rows[near], cols[near], values[near], pre.shape))
    return codes


def _csr(rows: Tensor, cols: Tensor, values: Tensor, shape: torch.Size) -> SparseCodes:
    return SparseCodes(cols, values, shape[1], csr_offsets(rows, shape[0]))
