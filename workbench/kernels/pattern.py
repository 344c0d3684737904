"""The index structure of a `SparseCodes` (its pattern), with the orderings the kernels need.

A pattern is the (row, latent) position of each flat entry. Forward passes walk it by row (CSR
offsets); weight gradients walk it by latent (the entries sorted by latent once, stably, so
rows stay ascending inside each latent). Both orderings are computed lazily and cached.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from workbench.kernels.codes import SparseCodes, csr_offsets, row_ids_of


class Pattern:
    def __init__(self, indices: Tensor, offsets: Tensor, n_latents: int, fixed_k: Optional[int] = None):
        self.indices = indices  # flat [nnz], int64
        self.offsets = offsets  # [N + 1], int64
        self.n_latents = n_latents
        self.fixed_k = fixed_k  # k when every row holds exactly k entries
        self._row_ids: Optional[Tensor] = None
        self._by_latent: Optional[tuple[Tensor, Tensor]] = None

    @property
    def n_rows(self) -> int:
        return self.offsets.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def row_ids(self) -> Tensor:
        if self._row_ids is None:
            self._row_ids = row_ids_of(self.offsets, self.nnz)
        return self._row_ids

    def by_latent(self) -> tuple[Tensor, Tensor]:
        """(order, latent_offsets): entries sorted by latent; latent l owns order[lo[l]:lo[l+1]]."""
        if self._by_latent is None:
            order = torch.sort(self.indices, stable=True).indices
            self._by_latent = (order, csr_offsets(self.indices, self.n_latents))
        return self._by_latent

    def regrouped(self, group_of_entry: Tensor, n_groups: int) -> tuple["Pattern", Tensor]:
        """A pattern over n_groups * N rows (row g * N + n), and the entry order that builds it."""
        new_rows = group_of_entry * self.n_rows + self.row_ids()
        order = torch.sort(new_rows, stable=True).indices
        return Pattern(
            self.indices[order], csr_offsets(new_rows, n_groups * self.n_rows), self.n_latents
        ), order


def pattern_of(codes: SparseCodes) -> Pattern:
    """The pattern of `codes`, cached on them (and on every copy made by `with_values`)."""
    pattern = codes.cache.get("pattern")
    if pattern is None:
        fixed_k = codes.indices.shape[1] if codes.is_fixed_k else None
        pattern = Pattern(codes.flat_indices(), codes.row_offsets(), codes.n_latents, fixed_k)
        codes.cache["pattern"] = pattern
    return pattern
