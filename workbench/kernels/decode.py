"""Decoders: sum_j v_j * W[i_j] + b (embedding-bag style), and Matryoshka's nested prefixes."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.kernels.autograd import PrefixDecode, SparseDecode
from workbench.kernels.backend import is_eager, sparse_ops
from workbench.kernels.codes import KernelInputError, SparseCodes
from workbench.kernels.pattern import pattern_of


def decode(
    codes: SparseCodes,
    weight: Float[Tensor, "n_latents d_out"],
    bias: Optional[Float[Tensor, " d_out"]] = None,
) -> Float[Tensor, "batch d_out"]:
    """[N, d] reconstruction from codes over the rows of `weight` [m, d]."""
    _check(codes, weight, bias)
    if is_eager():
        out = codes.to_dense().to(weight.dtype) @ weight
    else:
        out = SparseDecode.apply(codes.flat_values(), weight, pattern_of(codes), sparse_ops(weight.device))
    return out + bias if bias is not None else out


def decode_prefixes(
    codes: SparseCodes,
    weight: Float[Tensor, "n_latents d_out"],
    bias: Optional[Float[Tensor, " d_out"]],
    prefix_ends: Sequence[int],
) -> Float[Tensor, "n_prefixes batch d_out"]:
    """[P, N, d]: the reconstruction from latents [0, e) for each e in prefix_ends (ascending,
    last = m), all from one sparse decode: each entry is decoded into the bucket of the first
    prefix that holds it, and a cumulative sum over buckets gives the nested reconstructions."""
    _check(codes, weight, bias)
    ends = _prefix_ends(prefix_ends, weight.shape[0])
    if is_eager():
        dense = codes.to_dense().to(weight.dtype)
        outs = [dense[:, :e] @ weight[:e] for e in ends]
        out = torch.stack(outs)
    else:
        pattern = pattern_of(codes)
        boundaries = torch.tensor(ends, device=pattern.indices.device)
        group = torch.searchsorted(boundaries, pattern.indices, right=True)
        grouped, order = pattern.regrouped(group, len(ends))
        out = PrefixDecode.apply(
            codes.flat_values()[order], weight, grouped, len(ends), sparse_ops(weight.device)
        )
    return out + bias if bias is not None else out


def _prefix_ends(prefix_ends: Sequence[int], m: int) -> list[int]:
    ends = [int(e) for e in prefix_ends]
    if not ends or ends[-1] != m or any(b <= a for a, b in zip(ends, ends[1:])) or ends[0] <= 0:
        raise KernelInputError(f"prefix_ends must ascend strictly from > 0 to {m}, got {ends}")
    return ends


def _check(codes: SparseCodes, weight: Tensor, bias: Optional[Tensor]) -> None:
    if weight.dim() != 2 or codes.n_latents != weight.shape[0]:
        raise KernelInputError(
            f"decode: codes over {codes.n_latents} latents need weight [{codes.n_latents}, d], "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[1],):
        raise KernelInputError(f"decode: bias must be [{weight.shape[1]}], got {tuple(bias.shape)}")
    if codes.indices.device != weight.device:
        raise KernelInputError(f"decode: codes are on {codes.indices.device} but weight on {weight.device}")
    codes.check()
