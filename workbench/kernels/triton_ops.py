"""The sparse primitives as Triton kernels (CUDA; on the CPU only under TRITON_INTERPRET=1).

Same contracts as `torch_ops`. Two kernels serve all three primitives: `decode` and
`scatter_rows` are both a weighted row-sum over CSR segments (decode: one segment per row over
the weight table; scatter_rows: one segment per latent over the dense rows, in the pattern's
by-latent order), so neither needs atomics and both are deterministic. `gather_dot` computes
one dot product per entry. Accumulation is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from workbench.kernels.pattern import Pattern

BLOCK_D = 128
BLOCK_E = 32


@triton.jit
def _segment_rowsum(
    index_ptr,
    weight_ptr,
    offsets_ptr,
    table_ptr,
    out_ptr,
    d,
    table_stride,
    out_stride,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    segment = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_range = cols < d
    start = tl.load(offsets_ptr + segment)
    end = tl.load(offsets_ptr + segment + 1)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for entry in range(start, end):
        row = tl.load(index_ptr + entry)
        w = tl.load(weight_ptr + entry).to(ACC)
        acc += w * tl.load(table_ptr + row * table_stride + cols, mask=in_range, other=0.0).to(ACC)
    tl.store(out_ptr + segment * out_stride + cols, acc, mask=in_range)


@triton.jit
def _gather_dot(
    rows_ptr,
    index_ptr,
    dense_ptr,
    table_ptr,
    out_ptr,
    nnz,
    d,
    dense_stride,
    table_stride,
    ACC: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    entries = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    live = entries < nnz
    rows = tl.load(rows_ptr + entries, mask=live, other=0)
    latents = tl.load(index_ptr + entries, mask=live, other=0)
    acc = tl.zeros([BLOCK_E], dtype=ACC)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols < d)[None, :]
        a = tl.load(dense_ptr + rows[:, None] * dense_stride + cols[None, :], mask=mask, other=0.0).to(ACC)
        b = tl.load(table_ptr + latents[:, None] * table_stride + cols[None, :], mask=mask, other=0.0).to(ACC)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + entries, acc, mask=live)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rowsum(index: Tensor, weights: Tensor, offsets: Tensor, table: Tensor) -> Tensor:
    table = table.contiguous()
    segments, d = offsets.numel() - 1, table.shape[1]
    out = torch.empty(segments, d, dtype=table.dtype, device=table.device)
    if segments == 0 or d == 0:
        return out
    grid = (segments, triton.cdiv(d, BLOCK_D))
    # Triton's JIT takes plain values for tl.constexpr parameters; pyright reads the annotation.
    _segment_rowsum[grid](
        index.contiguous(),
        weights.contiguous(),
        offsets.contiguous(),
        table,
        out,
        d,
        table.stride(0),
        out.stride(0),
        ACC=_acc(table.dtype),  # pyright: ignore[reportArgumentType]
        BLOCK=BLOCK_D,  # pyright: ignore[reportArgumentType]
    )
    return out


def decode(pattern: Pattern, values: Tensor, weight: Tensor) -> Tensor:
    return _rowsum(pattern.indices, values.to(weight.dtype), pattern.offsets, weight)


def scatter_rows(pattern: Pattern, weights: Tensor, dense: Tensor) -> Tensor:
    order, latent_offsets = pattern.by_latent()
    return _rowsum(pattern.row_ids()[order], weights[order].to(dense.dtype), latent_offsets, dense)


def gather_dot(pattern: Pattern, dense: Tensor, weight: Tensor) -> Tensor:
    dense, weight = dense.contiguous(), weight.contiguous()
    out = torch.empty(pattern.nnz, dtype=dense.dtype, device=dense.device)
    if pattern.nnz == 0:
        return out
    grid = (triton.cdiv(pattern.nnz, BLOCK_E),)
    acc = _acc(dense.dtype)
    # Triton's JIT takes plain values for tl.constexpr parameters; pyright reads the annotation.
    _gather_dot[grid](
        pattern.row_ids(),
        pattern.indices,
        dense,
        weight,
        out,
        pattern.nnz,
        dense.shape[1],
        dense.stride(0),
        weight.stride(0),
        ACC=acc,  # pyright: ignore[reportArgumentType]
        BLOCK_E=BLOCK_E,  # pyright: ignore[reportArgumentType]
        BLOCK_D=BLOCK_D,  # pyright: ignore[reportArgumentType]
    )
    return out
