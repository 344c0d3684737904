"""Small inputs shared by the kernel tests: random encoders, codes with every edge case."""

from __future__ import annotations

import torch

from workbench.kernels import SparseCodes


def encoder(n: int, d: int, m: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w_enc = (torch.randn(m, d, generator=g, dtype=dtype) / d**0.5).requires_grad_()
    b_enc = (0.1 * torch.randn(m, generator=g, dtype=dtype)).requires_grad_()
    w_dec = torch.randn(m, d, generator=g, dtype=dtype).requires_grad_()
    b_dec = (0.1 * torch.randn(d, generator=g, dtype=dtype)).requires_grad_()
    return x.requires_grad_(), w_enc, b_enc, w_dec, b_dec


def fixed_codes(n: int, m: int, k: int, dtype=torch.float64, seed: int = 0) -> SparseCodes:
    g = torch.Generator().manual_seed(seed)
    indices = (
        torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
        if n
        else torch.zeros(0, k, dtype=torch.long)
    )
    return SparseCodes(indices, torch.randn(n, k, generator=g, dtype=dtype), m)


def csr_codes(counts: list[int], m: int, dtype=torch.float64, seed: int = 0) -> SparseCodes:
    """CSR codes with the given entries per row (0 = empty row); latents may repeat, in a row too."""
    g = torch.Generator().manual_seed(seed)
    nnz = sum(counts)
    offsets = torch.tensor([0] + counts).cumsum(0)
    return SparseCodes(
        torch.randint(0, m, (nnz,), generator=g), torch.randn(nnz, generator=g, dtype=dtype), m, offsets
    )
