"""Codebook features (Tamkin et al., 2023): a vector-quantization bottleneck with k active codes.

Each activation is replaced by the sum of the k codebook rows most similar to it (cosine or
dot product). The search is a dense pass without autograd (the same selection as top-k
encode); the output is a sparse decode with unit values, so the codebook's gradient touches
only the chosen codes. With straight_through, the input receives the output's gradient as if
the bottleneck were the identity.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from workbench.kernels import select
from workbench.kernels.codes import KernelInputError, SparseCodes
from workbench.kernels.decode import decode


def codebook_lookup(
    activations: Float[Tensor, "batch d"],
    codebook: Float[Tensor, "n_codes d"],
    k: int,
    *,
    metric: Literal["cosine", "dot"] = "cosine",
    straight_through: bool = True,
) -> tuple[Float[Tensor, "batch d"], SparseCodes]:
    """(output [N, d], codes [N, k] with the chosen codes' similarities as `extra` values).

    output = sum of the chosen codebook rows (+ the straight-through term, whose value is 0)."""
    if activations.dim() != 2 or codebook.dim() != 2 or activations.shape[1] != codebook.shape[1]:
        raise KernelInputError(
            "codebook: activations must be [N, d] and codebook [C, d], "
            f"got {tuple(activations.shape)} and {tuple(codebook.shape)}"
        )
    if metric not in ("cosine", "dot"):
        raise KernelInputError(f"codebook: metric must be 'cosine' or 'dot', got {metric!r}")
    with torch.no_grad():
        keys = F.normalize(codebook, dim=1) if metric == "cosine" else codebook
        scores = select.top_k(activations.detach() @ keys.t(), k)
    ones = torch.ones_like(scores.values)
    codes = SparseCodes(scores.indices, ones, codebook.shape[0], extra=scores)
    output = decode(codes, codebook)
    if straight_through:
        output = output + (activations - activations.detach())
    return output, codes
