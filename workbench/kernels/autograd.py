"""The autograd functions every dictionary is built from.

`SparseDecode`: out[n] = sum_j v_j * W[i_j]. Backward: grad_v = <grad_out[n], W[i_j]> and a
weight gradient that only touches the latents in the pattern (scatter by latent).

`PreactsAt`: the encoder pre-activations x @ W.T + b at a pattern, for x already centred
(x = input - shift). The forward may be handed the values already selected from a dense
pre-activation pass (top-k, threshold), so the dense buffer never enters the autograd graph;
the backward is the transposed decode: grad_x by an embedding bag over W (only when the input
itself needs it), grad_W scattered into the selected latents' rows, grad_b by latent, and
grad_shift = -(grad_b @ W), the row-sum of -grad_x without computing grad_x.
Several PreactsAt calls on one encoder (main and AuxK selections) add their gradients.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

from torch import Tensor
from torch.autograd import Function

from workbench.kernels.pattern import Pattern


class SparseDecode(Function):
    @staticmethod
    def forward(ctx, values: Tensor, weight: Tensor, pattern: Pattern, ops: ModuleType) -> Tensor:
        ctx.save_for_backward(values, weight)
        ctx.pattern, ctx.ops = pattern, ops
        return ops.decode(pattern, values.reshape(-1), weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _decode_backward(ctx, grad_out.contiguous()) + (None, None)


class PreactsAt(Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        shift: Optional[Tensor],
        known: Optional[Tensor],
        pattern: Pattern,
        ops: ModuleType,
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.pattern, ctx.ops, ctx.has_bias, ctx.has_shift = pattern, ops, bias is not None, shift is not None
        if known is not None:
            return known.detach().reshape(-1).clone()
        values = ops.gather_dot(pattern, x, weight)
        return values + bias[pattern.indices] if bias is not None else values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, weight = ctx.saved_tensors
        pattern, ops, needs = ctx.pattern, ctx.ops, ctx.needs_input_grad
        grad_values = grad_values.reshape(-1).contiguous()
        grad_x = ops.decode(pattern, grad_values, weight) if needs[0] else None
        grad_weight = ops.scatter_rows(pattern, grad_values, x) if needs[1] else None
        wants_bias, wants_shift = ctx.has_bias and needs[2], ctx.has_shift and needs[3]
        per_latent = (
            grad_values.new_zeros(pattern.n_latents).index_add_(0, pattern.indices, grad_values)
            if wants_bias or wants_shift
            else None
        )
        grad_shift = None
        if wants_shift and per_latent is not None:
            grad_shift = -(per_latent.to(weight.dtype) @ weight)  # = -sum over rows of grad_x
        return grad_x, grad_weight, per_latent if wants_bias else None, grad_shift, None, None, None


class PrefixDecode(Function):
    """Matryoshka: [P, N, d] nested reconstructions from a pattern over P * N rows, where row
    g * N + n holds the entries of row n whose latents first appear in prefix g. Forward: one
    sparse decode into the P buckets, then a running sum over buckets in place; backward: the
    reverse running sum over the output gradient, in place, then the bucketed sparse backward."""

    @staticmethod
    def forward(
        ctx, values: Tensor, weight: Tensor, pattern: Pattern, n_prefixes: int, ops: ModuleType
    ) -> Tensor:
        ctx.save_for_backward(values, weight)
        ctx.pattern, ctx.ops = pattern, ops
        out = ops.decode(pattern, values.reshape(-1), weight).view(n_prefixes, -1, weight.shape[1])
        for p in range(1, n_prefixes):
            out[p] += out[p - 1]
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad = grad_out.clone()
        for p in range(grad.shape[0] - 2, -1, -1):
            grad[p] += grad[p + 1]
        return _decode_backward(ctx, grad.view(-1, grad.shape[-1])) + (None, None, None)


def _decode_backward(ctx, grad_out: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of a sparse decode for its values and weight, given the output gradient."""
    values, weight = ctx.saved_tensors
    pattern, ops = ctx.pattern, ctx.ops
    grad_values = (
        ops.gather_dot(pattern, grad_out, weight).to(values.dtype).view_as(values)
        if ctx.needs_input_grad[0]
        else None
    )
    grad_weight = ops.scatter_rows(pattern, values.reshape(-1), grad_out) if ctx.needs_input_grad[1] else None
    return grad_values, grad_weight
