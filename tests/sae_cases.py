"""Small dictionaries of every architecture, with weights perturbed away from their init so
that every term of every loss is exercised."""

from __future__ import annotations

import torch

from sae.base import Dictionary, architectures, create
from sae.config import DictionaryConfig

D, M, K, N = 12, 40, 3, 24


def small(arch: str, seed: int = 0, **overrides) -> Dictionary:
    settings = dict(
        architecture=arch, d_in=D, n_latents=M, k=K, aux_k=4, l1_coef=0.7, target_l0=K, bandwidth=0.3
    )
    settings.update(overrides)
    dictionary = create(DictionaryConfig(**settings), seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in dictionary.named_parameters():
            if name == "threshold":
                param.copy_(0.2 + 0.3 * torch.rand(param.shape, generator=generator))
            elif name in ("W_dec",) and dictionary.unit_norm_decoder:
                continue
            else:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return dictionary


def inputs(seed: int = 1, n: int = N) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2


ARCHITECTURES = architectures()
