"""Selections on a dense pre-activation tensor [N, m] (no autograd): which (row, latent) entries
a dictionary keeps. Each returns SparseCodes holding the selected pre-activation values."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from workbench.distributed import all_reduce_sum, gather_rows, rank_index, world_size
from workbench.kernels.codes import KernelInputError, SparseCodes, csr_offsets


def top_k(pre: Tensor, k: int) -> SparseCodes:
    if not 0 < k <= pre.shape[1]:
        raise KernelInputError(f"top-k: k must be in [1, {pre.shape[1]}], got {k}")
    values, indices = pre.topk(k, dim=1, sorted=False)
    return SparseCodes(indices, values, pre.shape[1])


def _global_kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest of all ranks' `values` (every rank passes equally many)."""
    return gather_rows(values.topk(min(k, values.numel())).values).topk(k).values[-1]


def _ties_to_take(greater: Tensor, ties: Tensor, wanted: int) -> Tensor:
    """Per group (e.g. per latent): how many of this rank's entries equal to the cut it keeps, so
    that all ranks together keep `wanted` entries. Ties go to lower ranks first and, within a
    rank, to earlier entries: the order one process sees, so identical rows (a cache's BOS
    positions) are chosen the same way with any number of ranks and on every run."""
    counts = gather_rows(torch.stack([greater, ties])[None])  # [ranks, 2, groups]
    need = wanted - counts[:, 0].sum(dim=0)
    before = counts[:rank_index(), 1].sum(dim=0)
    return (need - before).clamp_min(0).minimum(ties)


def _first_true(mask: Tensor, count: Tensor) -> Tensor:
    """`mask` with only its first `count` true entries (along dim 0) kept."""
    return mask & (mask.cumsum(dim=0) <= count)


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
        cut = flat.topk(total).values[-1] if world == 1 else _global_kth_largest(flat, total)
        reaching = flat >= cut
        saturated = bool((torch.bincount(reaching.nonzero().squeeze(1) // per_row, minlength=n) >= per_row).any())
        if world > 1:  # every rank widens its candidates together
            saturated = bool(all_reduce_sum(torch.tensor([int(saturated)])).item())
        if per_row == m or not saturated:
            break
        per_row = min(m, 2 * per_row)
    # no row is saturated, so every entry tied at the cut is a candidate: keep the first ones needed
    tied = flat == cut
    take = _ties_to_take((flat > cut).sum().reshape(1), tied.sum().reshape(1), total)
    chosen = ((flat > cut) | _first_true(tied, take)).nonzero().squeeze(1)  # row-major: rows ascending
    offsets = csr_offsets(chosen // per_row, n)
    return SparseCodes(cand_indices.reshape(-1)[chosen], cand_values.reshape(-1)[chosen], m, offsets)


def column_top_k(pre: Tensor, per_column: int) -> SparseCodes:
    """Each latent's `per_column` largest entries over the rows (Feature Choice), as CSR; entries
    tied at a latent's cut go to the earliest rows.

    Under torchrun the rows are every rank's together: each latent's cut is its global
    `per_column`-th largest (from the ranks' local top lists, all-gathered), and its ties go to
    lower ranks first, so the selection is the one process's."""
    n, m = pre.shape
    world = world_size()
    if not 0 < per_column <= n * world:
        raise KernelInputError(f"column top-k: per-latent count must be in [1, {n * world}], got {per_column}")
    values, rows = pre.topk(min(per_column, n), dim=0, sorted=False)  # [per_column, m]
    cut = gather_rows(values).topk(per_column, dim=0).values[-1]  # [m]
    ties = (pre == cut).sum(dim=0)  # every tie, listed or not (topk picks among ties arbitrarily)
    take = _ties_to_take((values > cut).sum(dim=0), ties, per_column)
    listed = values == cut
    whole = (take == ties) & (listed.sum(dim=0) == ties)  # latents whose ties are all listed and all kept
    keep = (values > cut) | (listed & whole)
    rows, cols, values = rows[keep], keep.nonzero()[:, 1], values[keep]
    partly = (~whole & (take > 0)).nonzero().squeeze(1)
    if partly.numel():  # the first `take` tied rows of these latents, from the dense column
        tied_rows, which = _first_true(pre[:, partly] == cut[partly], take[partly]).nonzero(as_tuple=True)
        rows, cols = torch.cat([rows, tied_rows]), torch.cat([cols, partly[which]])
        values = torch.cat([values, cut[partly[which]]])
    order = (rows * m + cols).argsort()
    return _csr(rows[order], cols[order], values[order], pre.shape)


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
