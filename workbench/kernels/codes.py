"""`SparseCodes`: the one sparse representation every dictionary speaks.

Fixed-k (TopK, codebooks): `indices` and `values` are [N, k]. Variable-k (BatchTopK, JumpReLU,
Gated, threshold selections): CSR, with `indices`/`values` flat [nnz] and `offsets` [N + 1]
(row n owns entries offsets[n]:offsets[n+1]). Entries of a row may come in any order; a latent
may appear in several rows. `values` may carry autograd history; `indices` never do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.errors import WorkbenchError


class KernelInputError(WorkbenchError, ValueError):
    """Inputs to a sparse kernel have the wrong shape, dtype or range."""


def csr_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """Offsets [n_rows + 1] of entries whose (ascending) row ids are `rows`."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def row_ids_of(offsets: Tensor, nnz: int) -> Tensor:
    """The row of each entry, [nnz], from CSR offsets."""
    rows = torch.arange(offsets.numel() - 1, device=offsets.device)
    return rows.repeat_interleave(offsets.diff(), output_size=nnz)


@dataclass(frozen=True)
class SparseCodes:
    indices: Tensor
    values: Tensor
    n_latents: int
    offsets: Optional[Tensor] = None
    # A second selection from the same encoder pass: AuxK's dead-latent top-k, JumpReLU's
    # near-threshold window. Its values are differentiable like the main ones.
    extra: Optional["SparseCodes"] = None
    # Index structures derived from the pattern (not the values), shared by every copy made with
    # `with_values`, so the encoder and decoder backward sort the pattern once.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.indices.shape != self.values.shape:
            raise KernelInputError(
                f"SparseCodes: indices {tuple(self.indices.shape)} and values {tuple(self.values.shape)} "
                "differ in shape"
            )
        if self.indices.dtype != torch.long:
            raise KernelInputError(f"SparseCodes: indices must be int64, got {self.indices.dtype}")
        if self.offsets is None and self.indices.dim() != 2:
            raise KernelInputError(
                f"SparseCodes: fixed-k indices must be [N, k], got {tuple(self.indices.shape)}"
            )
        if self.offsets is not None and (self.indices.dim() != 1 or self.offsets.dim() != 1):
            raise KernelInputError("SparseCodes: CSR codes need flat indices/values and 1-D offsets")

    @property
    def is_fixed_k(self) -> bool:
        return self.offsets is None

    @property
    def n_rows(self) -> int:
        return self.indices.shape[0] if self.offsets is None else self.offsets.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def flat_indices(self) -> Tensor:
        return self.indices.reshape(-1)

    def flat_values(self) -> Tensor:
        return self.values.reshape(-1)

    def row_offsets(self) -> Int[Tensor, " batch+1"]:
        """CSR offsets [N + 1], computed for fixed-k codes."""
        if self.offsets is not None:
            return self.offsets
        n, k = self.indices.shape
        return torch.arange(n + 1, device=self.indices.device) * k

    def row_ids(self) -> Int[Tensor, " nnz"]:
        """The row of each flat entry, [nnz]."""
        return row_ids_of(self.row_offsets(), self.nnz)

    def l0(self) -> Int[Tensor, " batch"]:
        """Active entries per row (nonzero values), [N]."""
        nonzero = (self.flat_values() != 0).to(torch.long)
        return torch.zeros(self.n_rows, dtype=torch.long, device=nonzero.device).index_add_(
            0, self.row_ids(), nonzero
        )

    def with_values(self, values: Tensor) -> "SparseCodes":
        return replace(self, values=values)

    def to_dense(self) -> Float[Tensor, "batch n_latents"]:
        """[N, n_latents]; repeated (row, latent) entries add up. Differentiable in `values`."""
        dense = self.values.new_zeros(self.n_rows, self.n_latents)
        flat = self.row_ids() * self.n_latents + self.flat_indices()
        return dense.view(-1).index_add(0, flat, self.flat_values()).view(self.n_rows, self.n_latents)

    def to_csr(self) -> "SparseCodes":
        if self.offsets is not None:
            return self
        return SparseCodes(
            self.flat_indices(),
            self.flat_values(),
            self.n_latents,
            self.row_offsets(),
            self.extra,
            self.cache,
        )

    @staticmethod
    def from_dense(dense: Float[Tensor, "batch n_latents"]) -> "SparseCodes":
        """CSR codes of the nonzero entries of a dense [N, m] tensor (differentiable in it)."""
        rows, cols = dense.nonzero(as_tuple=True)
        return SparseCodes(cols, dense[rows, cols], dense.shape[1], csr_offsets(rows, dense.shape[0]))

    def check(self) -> "SparseCodes":
        """Validate ranges (costs a pass over the indices; the kernels call it once per input)."""
        if self.nnz and (int(self.indices.min()) < 0 or int(self.indices.max()) >= self.n_latents):
            raise KernelInputError(f"SparseCodes: latent indices outside [0, {self.n_latents})")
        if self.offsets is not None:
            off = self.offsets
            if (
                off.dtype != torch.long
                or off.numel() < 1
                or int(off[0]) != 0
                or int(off[-1]) != self.nnz
                or bool((off.diff() < 0).any())
            ):
                raise KernelInputError(
                    "SparseCodes: offsets must be int64, start at 0, never decrease, and end at nnz"
                )
        return self


def stack_rows(parts: list[SparseCodes]) -> SparseCodes:
    """Codes of consecutive row blocks (same latents) as one: fixed-k when every block is
    fixed-k with the same k, else CSR; `extra` selections are stacked alike."""
    if len(parts) == 1:
        return parts[0]
    extras = [p.extra for p in parts if p.extra is not None]
    if extras and len(extras) != len(parts):
        raise KernelInputError("stack_rows: either every block has an `extra` selection or none has")
    extra = stack_rows(extras) if extras else None
    n_latents = parts[0].n_latents
    if all(p.is_fixed_k for p in parts) and len({p.indices.shape[1] for p in parts}) == 1:
        return SparseCodes(
            torch.cat([p.indices for p in parts]),
            torch.cat([p.values for p in parts]),
            n_latents,
            extra=extra,
        )
    blocks = [p.to_csr() for p in parts]
    starts = torch.tensor([0] + [b.nnz for b in blocks], device=blocks[0].indices.device).cumsum(0)
    block_offsets = [b.row_offsets() for b in blocks]
    offsets = torch.cat([block_offsets[0][:1]] + [o[1:] + starts[i] for i, o in enumerate(block_offsets)])
    return SparseCodes(
        torch.cat([b.indices for b in blocks]),
        torch.cat([b.values for b in blocks]),
        n_latents,
        offsets,
        extra,
    )
