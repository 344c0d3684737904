"""Approximate top-k candidates from an int8 encoder matmul (opt-in: `--approx-topk`).

At 65,536 latents the fp32 encoder matmul is the whole cost of a TopK step. Here each row of x
(per-row scale) and each encoder row (per-latent scale) are rounded to int8, `torch._int_mm`
gives int32 dot products (3-5x faster than fp32 on this 2-core AVX2 CPU), and the scaled
scores + bias rank each row's CANDIDATES_PER_K * k candidates. The candidates' pre-activations
are then recomputed exactly in fp32 (a sampled matmul) and the top k of them kept, so every
kept value, and every gradient, is exact; only a latent the int8 ranking missed can be lost.
`workbench bench kernels --approx-topk` reports the recall against the exact top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

CANDIDATES_PER_K = 4
_ROWS_PER_CHUNK = 4096  # encoder rows quantized at a time (small temporaries)


def supported(x: Tensor, weight: Tensor) -> bool:
    """`torch._int_mm` runs here: any shape on the CPU; CUDA wants > 16 rows and widths in 8s."""
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and x.shape[0] > 16 and x.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0


@dataclass(frozen=True)
class Int8Encoder:
    weight_t: Tensor  # int8 [d, m]: the encoder's rows rounded, transposed (a view)
    scale: Tensor  # [m]: weight ≈ weight_t.T * scale[:, None]

    @staticmethod
    @torch.no_grad()
    def of(weight: Tensor) -> "Int8Encoder":
        scale = torch.linalg.vector_norm(weight, float("inf"), dim=1).clamp_min(1e-12) / 127
        rounded = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
            rows = slice(start, start + _ROWS_PER_CHUNK)
            rounded[rows] = (weight[rows] / scale[rows, None]).round_()
        return Int8Encoder(rounded.t(), scale)

    @torch.no_grad()
    def scores(self, x: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
        """Approximate x @ W.T + b into `out` [n, m] (fp32): int32 products, converted in place."""
        x_scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_min(1e-12) / 127
        same_bytes = out.dtype == torch.float32  # fp32: the int32 products share `out`'s memory
        products = (
            out.view(torch.int32)
            if same_bytes
            else torch.empty(out.shape, dtype=torch.int32, device=out.device)
        )
        x_int8 = (x / x_scale).round_().to(torch.int8)
        # torch's int8 x int8 -> int32 matmul has no public name.
        torch._int_mm(x_int8, self.weight_t, out=products)  # pyright: ignore[reportPrivateImportUsage]
        out.copy_(products).mul_(self.scale)
        return torch.addcmul(bias, out, x_scale, out=out) if bias is not None else out.mul_(x_scale)
