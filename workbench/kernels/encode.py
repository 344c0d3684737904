"""Encoders: x @ W.T + b, a selection, and SparseCodes of the selected pre-activations.

The fused path computes the dense pre-activations once without autograd, selects, and hands
the selected values to `PreactsAt`, whose backward touches only the selected latents. The
eager twin (WORKBENCH_KERNELS=eager) keeps the dense pre-activations in the graph and gathers
from them: same selection, dense backward. Values are pre-activations: the caller applies its
activation (ReLU, JumpReLU) to `codes.values`, which autograd differentiates cheaply.

Inside `use_matmul_dtype(torch.bfloat16)` the pre-activations that choose the entries come
from a bf16 matmul; the chosen entries' values are then recomputed exactly (`gather_dot` in
fp32, as `approximate` re-ranks its int8 candidates), so values and gradients are those of the
fp32 encoder at the chosen entries and only the choice itself can differ near its cut.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from workbench.kernels import approx, select
from workbench.kernels.autograd import PreactsAt
from workbench.kernels.backend import is_eager, selection_dtype, sparse_ops
from workbench.kernels.codes import KernelInputError, SparseCodes, stack_rows
from workbench.kernels.pattern import pattern_of


class _Batch:
    """What a selection's `finish` may ask of the batch: exact pre-activations of whole rows or
    at given entries. Fused: recomputed from x; eager: read from the dense pre-activations."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], dense: Optional[Tensor] = None):
        self.x, self.weight, self.bias, self.dense = x, weight, bias, dense

    def full_rows(self, rows: Tensor) -> Tensor:
        return (
            self.dense[rows]
            if self.dense is not None
            else _dense_preacts(self.x[rows], self.weight, self.bias)
        )

    def values_at(self, codes: SparseCodes) -> Tensor:
        if self.dense is not None:
            return _at(self.dense, codes)
        values = sparse_ops(self.x.device).gather_dot(pattern_of(codes), self.x, self.weight)
        values = values + self.bias.index_select(0, codes.flat_indices()) if self.bias is not None else values
        return values.view_as(codes.indices)


@dataclass(frozen=True)
class _Selection:
    """How an encoder chooses entries. `rows` runs on each pass's block of scores [rows, m] (the
    exact pre-activations, or `scores(x_block, out)` when given: a cheaper approximation);
    `finish` turns the blocks' results (in row order) into SparseCodes with exact values,
    asking the `_Batch` for any it needs. `whole_batch` selections see the batch in one block."""

    rows: Callable[[Tensor], Any]
    finish: Callable[[list, _Batch], SparseCodes] = lambda parts, batch: stack_rows(parts)
    whole_batch: bool = False
    scores: Optional[Callable[[Tensor, Tensor], Tensor]] = None


def encode_topk(
    x: Float[Tensor, "batch d_in"],
    weight: Float[Tensor, "n_latents d_in"],
    bias: Optional[Float[Tensor, " n_latents"]],
    k: int,
    *,
    aux_k: int = 0,
    aux_mask: Optional[Bool[Tensor, " n_latents"]] = None,
    shift: Optional[Float[Tensor, " d_in"]] = None,
    approximate: bool = False,
    aux_stride: int = 1,
) -> SparseCodes:
    """Per-row top-k. With aux_k and aux_mask (bool [m], e.g. dead latents), `extra` holds each
    row's top-aux_k among the masked latents, from the same pass, with gradients to the encoder;
    with `aux_stride` s > 1 only rows 0, s, 2s, ... get that selection (the others are empty), so
    AuxK costs 1/s of its decode. `approximate`: candidates from an int8 matmul, re-ranked
    exactly (`workbench.kernels.approx`)."""
    selection = _Selection(lambda pre: select.top_k(pre, k))
    if approximate and approx.supported(x, weight):
        selection = _approximate_top_k(weight, bias, k)
    return _encode(x, weight, bias, _with_aux(selection, aux_k, aux_mask, aux_stride), shift)


def _approximate_top_k(weight: Tensor, bias: Optional[Tensor], k: int) -> _Selection:
    select.check_k(k, weight.shape[0])  # candidates are capped at m: k itself must fit
    int8 = approx.Int8Encoder.of(weight.detach())
    candidates = min(weight.shape[0], approx.CANDIDATES_PER_K * k)
    return _Selection(
        lambda scores: select.top_k(scores, candidates),
        lambda parts, batch: _rerank(stack_rows(parts), batch, k),
        scores=lambda x_block, out: int8.scores(x_block, None if bias is None else bias.detach(), out),
    )


def _rerank(listed: SparseCodes, batch: _Batch, k: int) -> SparseCodes:
    """The k entries of each row's candidate list with the largest exact pre-activations: fixed-k
    when every row lists the same count; CSR when some rows list none (AuxK on every s-th row)."""
    if listed.nnz == 0:
        return listed
    counts = listed.row_offsets().diff()  # entries per row (l0() would skip exact zeros)
    width = int(counts.max())
    listing = counts > 0
    if bool((counts[listing] != width).any()):
        raise KernelInputError("re-ranking needs the same number of candidates in every listed row")
    indices, exact = listed.indices.reshape(-1, width), batch.values_at(listed).reshape(-1, width)
    values, where = exact.topk(min(k, width), dim=1, sorted=False)
    if bool(listing.all()):
        return SparseCodes(indices.gather(1, where), values, listed.n_latents)
    offsets = torch.cat([counts.new_zeros(1), (listing.long() * values.shape[1]).cumsum(0)])
    return SparseCodes(indices.gather(1, where).reshape(-1), values.reshape(-1), listed.n_latents, offsets)


def encode_batch_topk(
    x: Float[Tensor, "batch d_in"],
    weight: Float[Tensor, "n_latents d_in"],
    bias: Optional[Float[Tensor, " n_latents"]],
    k: int,
    *,
    aux_k: int = 0,
    aux_mask: Optional[Bool[Tensor, " n_latents"]] = None,
    shift: Optional[Float[Tensor, " d_in"]] = None,
    aux_stride: int = 1,
) -> SparseCodes:
    """The N * k largest pre-activations of the batch (k per row on average), as CSR; AuxK's
    selection in `extra` as for `encode_topk`. Each pass keeps its rows' candidates; the cut
    over the batch comes after the last pass."""

    def finish(parts, batch):
        values, indices = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return select.batch_top_k_of(values, indices, k, weight.shape[0], batch.full_rows)

    return _encode(
        x,
        weight,
        bias,
        _with_aux(
            _Selection(lambda pre: select.batch_candidates(pre, k), finish), aux_k, aux_mask, aux_stride
        ),
        shift,
    )


def encode_feature_choice(
    x: Float[Tensor, "batch d_in"],
    weight: Float[Tensor, "n_latents d_in"],
    bias: Optional[Float[Tensor, " n_latents"]],
    per_latent: int,
    *,
    shift: Optional[Float[Tensor, " d_in"]] = None,
) -> SparseCodes:
    """Each latent's `per_latent` largest pre-activations over the batch (Feature Choice), as CSR."""
    return _encode(
        x, weight, bias, _Selection(lambda pre: select.column_top_k(pre, per_latent), whole_batch=True), shift
    )


def _with_aux(selection: _Selection, aux_k: int, aux_mask: Optional[Tensor], stride: int = 1) -> _Selection:
    if not aux_k or aux_mask is None:
        return selection
    if stride < 1 or ROWS_PER_PASS % stride:
        raise KernelInputError(f"aux_stride must divide {ROWS_PER_PASS}, got {stride}")
    approximate = selection.scores is not None  # list more candidates, re-rank them exactly
    listed = aux_k * approx.CANDIDATES_PER_K if approximate else aux_k

    def aux_rows(pre: Tensor) -> SparseCodes:
        """Each pass starts at a multiple of ROWS_PER_PASS, so block row i is batch row i + start."""
        return select.strided_rows(select.masked_top_k(pre[::stride], listed, aux_mask), stride, pre.shape[0])

    def finish(parts: list, batch: _Batch) -> SparseCodes:
        extra = stack_rows([p[1] for p in parts])
        return replace(
            selection.finish([p[0] for p in parts], batch),
            extra=_rerank(extra, batch, aux_k) if approximate else extra,
        )

    return _Selection(
        lambda pre: (selection.rows(pre), aux_rows(pre)), finish, selection.whole_batch, selection.scores
    )


def encode_threshold(
    x: Float[Tensor, "batch d_in"],
    weight: Float[Tensor, "n_latents d_in"],
    bias: Optional[Float[Tensor, " n_latents"]],
    threshold: Float[Tensor, " n_latents"],
    *,
    window: float = 0.0,
    shift: Optional[Float[Tensor, " d_in"]] = None,
) -> SparseCodes:
    """Entries above a per-latent threshold (JumpReLU, Gated), as CSR; with window > 0, `extra`
    holds the near-threshold entries the JumpReLU threshold gradient needs."""
    return _encode(
        x,
        weight,
        bias,
        _Selection(lambda pre: select.above_threshold(pre, threshold.detach(), window=window)),
        shift,
    )


def encode_at(
    x: Float[Tensor, "batch d_in"],
    weight: Float[Tensor, "n_latents d_in"],
    bias: Optional[Float[Tensor, " n_latents"]],
    codes: SparseCodes,
) -> SparseCodes:
    """Pre-activations at a given pattern (any index set), without a dense pass."""
    _check(x, weight, bias)
    codes.check()
    if codes.n_rows != x.shape[0] or codes.n_latents != weight.shape[0]:
        raise KernelInputError(
            f"encode_at: codes are {codes.n_rows} x {codes.n_latents}, "
            f"inputs need {x.shape[0]} x {weight.shape[0]}"
        )
    if is_eager():
        return _gathered(codes, _dense_preacts(x, weight, bias))
    pattern = pattern_of(codes)
    values = PreactsAt.apply(x.contiguous(), weight, bias, None, None, pattern, sparse_ops(x.device))
    return codes.with_values(values.view_as(codes.indices))


# Pre-activations are computed ROWS_PER_PASS rows at a time into one reused buffer: at batch
# 4,096 that halves the step's largest buffer. (Measured on the 2-core CPU at d 768, 16,384
# latents: 2,048-row passes as fast as one pass, 1,024-row passes 4% slower.)
ROWS_PER_PASS = 2048


def _encode(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], selection: _Selection, shift: Optional[Tensor] = None
) -> SparseCodes:
    """Encode x - shift (shift: b_dec, or None). The fused path gives `shift` its gradient from
    the per-latent gradient sums (-g @ W, O(m d)) instead of a decode back to every row (O(N k d))."""
    _check(x, weight, bias)
    if shift is not None and shift.shape != (x.shape[1],):
        raise KernelInputError(f"encode: shift must be [{x.shape[1]}], got {tuple(shift.shape)}")
    low = _low_precision(x, selection)
    if is_eager():
        pre = _dense_preacts(x if shift is None else x - shift, weight, bias)
        dense = pre.detach()
        if selection.scores is not None:
            scores = selection.scores(x if shift is None else x - shift.detach(), torch.empty_like(dense))
        elif low is not None:
            scores = _dense_preacts(*_lowered(low, x if shift is None else x - shift.detach(), weight, bias))
        else:
            scores = dense
        return _gathered(selection.finish([selection.rows(scores)], _Batch(x, weight, bias, dense)), pre)
    centred = (x if shift is None else x - shift.detach()).contiguous()
    with torch.no_grad():
        n, step = x.shape[0], x.shape[0] if selection.whole_batch else ROWS_PER_PASS
        score_weight, score_bias = _lowered(low, x, weight, bias)[1:]  # cast once, used by every pass
        buffer = _workspace(min(n, step), weight.shape[0], x, low or x.dtype)
        parts = []
        for start in range(0, n, step):
            block, out = centred[start : start + step], buffer[: min(step, n - start)]
            scores = (
                _dense_preacts(*_lowered(low, block, score_weight, score_bias), out=out)
                if selection.scores is None
                else selection.scores(block, out)
            )
            parts.append(selection.rows(scores))
        chosen = selection.finish(parts, _Batch(centred, weight, bias))
    return _differentiable(chosen, centred, weight, bias, shift, exact=low is not None)


def _dense_preacts(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _low_precision(x: Tensor, selection: _Selection) -> Optional[torch.dtype]:
    """The dtype of the selection matmul when `use_matmul_dtype` lowers it below x's; None for
    x's own (and for selections with scores of their own: the int8 candidates)."""
    low = selection_dtype()
    if low is None or selection.scores is not None or low.itemsize >= x.dtype.itemsize:
        return None
    return low


def _lowered(
    low: Optional[torch.dtype], x: Tensor, weight: Tensor, bias: Optional[Tensor]
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(x, weight, bias) detached and cast to `low` for a selection-only matmul; themselves when
    `low` is None."""
    if low is None:
        return x, weight, bias
    return x.detach().to(low), weight.detach().to(low), None if bias is None else bias.detach().to(low)


_WORKSPACE: dict[torch.dtype, Tensor] = {}


def release_workspace() -> int:
    """Free the encoder's reused pre-activation buffers; returns the bytes they held."""
    held = sum(buf.numel() * buf.element_size() for buf in _WORKSPACE.values())
    _WORKSPACE.clear()
    return held


def _workspace(n: int, m: int, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A reused buffer for [n, m] no-grad pre-activations in `dtype` (default like's) on like's
    device (the first n rows of the largest asked for), one per dtype. A fresh 134 MB tensor per
    pass costs ~12 ms of page faults on the CPU; selections copy what they keep out of it."""
    dtype = dtype or like.dtype
    buf = _WORKSPACE.get(dtype)
    if buf is None or buf.shape[0] < n or buf.shape[1] != m or buf.device != like.device:
        _WORKSPACE.pop(dtype, None)
        buf = _WORKSPACE[dtype] = torch.empty(n, m, dtype=dtype, device=like.device)
    return buf[:n]


def _differentiable(
    codes: SparseCodes,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    shift: Optional[Tensor] = None,
    exact: bool = False,
) -> SparseCodes:
    """The codes' values as a function of the encoder (backward at the entries only); `exact`:
    recompute them (`gather_dot`) instead of taking the selection's, which a low-precision
    matmul chose."""
    ops = sparse_ops(x.device)
    known = None if exact else codes.values
    values = PreactsAt.apply(x, weight, bias, shift, known, pattern_of(codes), ops).view_as(codes.indices)
    extra = _differentiable(codes.extra, x, weight, bias, shift, exact) if codes.extra is not None else None
    return SparseCodes(codes.indices, values, codes.n_latents, codes.offsets, extra, codes.cache)


def _at(pre: Tensor, codes: SparseCodes) -> Tensor:
    """pre[row, latent] at every entry of the codes, shaped like codes.indices. A flat
    index_select: its backward (index_add_) is deterministic on CPU, advanced indexing's
    (index_put_ with accumulate) is not."""
    flat = codes.row_ids() * pre.shape[1] + codes.flat_indices()
    return pre.reshape(-1).index_select(0, flat).view_as(codes.indices)


def _gathered(codes: SparseCodes, pre: Tensor) -> SparseCodes:
    values = _at(pre, codes)
    extra = _gathered(codes.extra, pre) if codes.extra is not None else None
    return SparseCodes(codes.indices, values, codes.n_latents, codes.offsets, extra, codes.cache)


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise KernelInputError(
            f"encode: x must be [N, d] and weight [m, d], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise KernelInputError(f"encode: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not (x.is_floating_point() and x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)):
        raise KernelInputError(
            f"encode: x, weight and bias need one floating dtype, got {x.dtype}, {weight.dtype}"
        )
    if x.device != weight.device:
        raise KernelInputError(f"encode: x is on {x.device} but weight on {weight.device}")
