"""Selections on a dense pre-activation tensor [N, m] (no autograd): which (row, latent) entries
a dictionary keeps. Each returns SparseCodes holding the selected pre-activation values."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from workbench.distributed import all_reduce_sum, gather_rows, rank_index, world_size
from workbench.kernels.codes import KernelInputError, SparseCodes, csr_offsets, row_ids_of


def check_k(k: int, m: int, what: str = "top-k") -> None:
    if not 0 < k <= m:
        raise KernelInputError(f"{what}: k must be in [1, {m}], got {k}")


def top_k(pre: Tensor, k: int) -> SparseCodes:
    check_k(k, pre.shape[1])
    values, indices = pre.topk(k, dim=1, sorted=False)
    return SparseCodes(indices, values, pre.shape[1])


def _ties_to_take(greater: Tensor, ties: Tensor, wanted: int) -> Tensor:
    """Per group (e.g. per latent): how many of this rank's entries equal to the cut it keeps, so
    that all ranks together keep `wanted` entries. Ties go to lower ranks first and, within a
    rank, to earlier entries: the order one process sees, so identical rows (a cache's BOS
    positions) are chosen the same way with any number of ranks and on every run."""
    counts = gather_rows(torch.stack([greater, ties])[None])  # [ranks, 2, groups]
    need = wanted - counts[:, 0].sum(dim=0)
    before = counts[: rank_index(), 1].sum(dim=0)
    return (need - before).clamp_min(0).minimum(ties)


def _first_true(mask: Tensor, count: Tensor) -> Tensor:
    """`mask` with only its first `count` true entries (along dim 0) kept."""
    return mask & (mask.cumsum(dim=0) <= count)


def masked_top_k(pre: Tensor, k: int, mask: Tensor) -> SparseCodes:
    """Per-row top-k among the latents where `mask` [m] is true (AuxK's dead latents), as CSR:
    k is capped at the number of such latents, and rows with none are empty."""
    if mask.shape != (pre.shape[1],) or mask.dtype != torch.bool:
        raise KernelInputError(
            f"masked top-k: mask must be bool [{pre.shape[1]}], got {mask.dtype} {tuple(mask.shape)}"
        )
    allowed = mask.nonzero().squeeze(1)
    k = min(k, allowed.numel())
    n = pre.shape[0]
    if k == 0:
        return SparseCodes(allowed.new_zeros(0), pre.new_zeros(0), pre.shape[1], allowed.new_zeros(n + 1))
    values, where = pre.index_select(1, allowed).topk(k, dim=1, sorted=False)
    offsets = torch.arange(n + 1, device=pre.device) * k
    return SparseCodes(allowed[where].reshape(-1), values.reshape(-1), pre.shape[1], offsets)


def strided_rows(codes: SparseCodes, stride: int, n_rows: int) -> SparseCodes:
    """Codes of rows 0, s, 2s, ... of an n_rows block as CSR over all n_rows (the others empty)."""
    if stride == 1:
        return codes
    codes = codes.to_csr()
    offsets = codes.row_offsets()
    owner = (torch.arange(n_rows + 1, device=offsets.device) + stride - 1) // stride
    return SparseCodes(codes.indices, codes.values, codes.n_latents, offsets[owner.clamp(max=codes.n_rows)])


def batch_top_k(pre: Tensor, k: int) -> SparseCodes:
    """The N * k largest entries of the whole batch (BatchTopK), as CSR (see `batch_top_k_of`)."""
    values, indices = batch_candidates(pre, k)
    return batch_top_k_of(values, indices, k, pre.shape[1], lambda rows: pre[rows])


def batch_candidates(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """BatchTopK's candidates, row by row: each row's min(m, 2k) largest (values, latents). (4k
    candidates cost 80% more than the row's top-k; a row owning more than 2k of the batch's
    entries is rare and recomputed in full.)"""
    m = pre.shape[1]
    check_k(k, m, "batch top-k")
    return pre.topk(min(m, 2 * k), dim=1, sorted=False)


def batch_top_k_of(
    values: Tensor, indices: Tensor, k: int, m: int, full_rows: Callable[[Tensor], Tensor]
) -> SparseCodes:
    """The N * k largest entries of the batch from each row's candidates [N, c], as CSR.

    Exact without sorting all N * m entries: the answer is the candidates' top N*k unless a row
    had every candidate reach the cut (it may own more); such rows get all m entries as
    candidates (`full_rows(rows)` recomputes their pre-activations, [r, m]) and the cut is taken
    again. One round suffices: the other rows' last candidate is below the old cut, which can
    only rise. Entries tied at the cut go to the earliest rows (see `_ties_to_take`).

    Under torchrun the batch is every rank's rows together: the cut is the global (N_all * k)-th
    largest of all ranks' candidates (all ranks hold equally many rows)."""
    n, c = values.shape
    total = n * k * world_size()
    flat_values, flat_indices, offsets = (
        values.reshape(-1),
        indices.reshape(-1),
        torch.arange(n + 1, device=values.device) * c,
    )
    cut = _kth_largest(flat_values, total)
    saturated = (
        (values >= cut).all(dim=1) if c < m else torch.zeros(n, dtype=torch.bool, device=values.device)
    )
    if bool(all_reduce_sum(saturated.any().reshape(1).long()).item()):  # every rank takes the second round
        flat_values, flat_indices, offsets = _with_full_rows(
            values, indices, saturated, full_rows(saturated.nonzero().squeeze(1))
        )
        cut = _kth_largest(flat_values, total)
    above, tied = flat_values > cut, flat_values == cut
    take = _ties_to_take(above.sum().reshape(1), tied.sum().reshape(1), total)
    chosen = (above | _first_true(tied, take)).nonzero().squeeze(1)  # row-major: rows ascending
    rows = row_ids_of(offsets, flat_values.numel())[chosen]
    return SparseCodes(flat_indices[chosen], flat_values[chosen], m, csr_offsets(rows, n))


def _kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest of `values` over every rank (each rank's list padded to k with -inf)."""
    if world_size() == 1:
        return values.kthvalue(values.numel() - k + 1).values  # a selection, not a sort
    local = values.topk(min(k, values.numel()), sorted=False).values
    everyone = gather_rows(torch.cat([local, local.new_full((k - local.numel(),), float("-inf"))]))
    return everyone.kthvalue(everyone.numel() - k + 1).values


def _with_full_rows(
    values: Tensor, indices: Tensor, saturated: Tensor, full: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates as CSR (flat values, latents, offsets): the saturated rows' lists replaced by
    all m entries of their rows (`full`, [r, m]), rows kept in order."""
    n, c = values.shape
    m = full.shape[1]
    counts = torch.where(saturated, m, c)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    flat_values = values.new_empty(int(offsets[-1]))
    flat_indices = indices.new_empty(int(offsets[-1]))
    kept = (~saturated).nonzero().squeeze(1)
    at = offsets[kept][:, None] + torch.arange(c, device=values.device)
    flat_values[at], flat_indices[at] = values[kept], indices[kept]
    at = offsets[saturated.nonzero().squeeze(1)][:, None] + torch.arange(m, device=values.device)
    flat_values[at], flat_indices[at] = (
        full.to(values.dtype),
        torch.arange(m, device=values.device).expand_as(at),
    )
    return flat_values, flat_indices, offsets


def column_top_k(pre: Tensor, per_column: int) -> SparseCodes:
    """Each latent's `per_column` largest entries over the rows (Feature Choice), as CSR; entries
    tied at a latent's cut go to the earliest rows.

    Under torchrun the rows are every rank's together: each latent's cut is its global
    `per_column`-th largest (from the ranks' local top lists, all-gathered), and its ties go to
    lower ranks first, so the selection is the one process's."""
    n, m = pre.shape
    world = world_size()
    if not 0 < per_column <= n * world:
        raise KernelInputError(
            f"column top-k: per-latent count must be in [1, {n * world}], got {per_column}"
        )
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
