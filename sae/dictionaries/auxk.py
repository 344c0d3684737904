"""The base of the SAEs that select their latents (TopK, BatchTopK and those built on it, Feature
Choice): an encoder bias, and loss = |x - x_hat|^2 + alpha * AuxK, where AuxK (Gao et al.
2024, "Scaling and evaluating sparse autoencoders") lets the top-aux_k pre-activations of dead
latents reconstruct the residual (`sae.base.aux_k_loss`). Subclasses choose the selection
(`_select`) and may change the reconstruction (`_reconstruct`) and running state (`_observe`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from sae.base import (
    Dictionary,
    StepContext,
    StepOutput,
    aux_k_loss,
    aux_row_stride,
    reconstruction_loss,
    relu_values,
)
from workbench.kernels import SparseCodes, decode
from workbench.kernels.encode import ROWS_PER_PASS


class AuxKDictionary(Dictionary):
    """A dictionary with an encoder bias whose loss is reconstruction + AuxK on a selection."""

    def __init__(self, config, generator=None):
        super().__init__(config, generator)
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents))

    def _select(self, x: Tensor, aux_mask: Optional[Tensor]) -> SparseCodes:
        raise NotImplementedError

    def _reconstruct(self, x: Tensor, f: SparseCodes) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(x_hat, reconstruction loss, terms) for the target x (`reconstruction_target`);
        Matryoshka overrides it with its prefixes."""
        x_hat = decode(f, self.W_dec, self.b_dec)
        mse = reconstruction_loss(x, x_hat)
        return x_hat, mse, {"mse": mse.detach()}

    def aux_mask(self, context: StepContext) -> Optional[Tensor]:
        """bool [n_latents]: the latents AuxK trains this step (the dead ones), or None."""
        return context.dead_mask

    def training_step(self, x: Tensor, context: StepContext) -> StepOutput:
        dead = self.aux_mask(context)
        aux_mask = dead if dead is not None and bool(dead.any()) and self.config.aux_coef > 0 else None
        target, skip = self.reconstruction_target(x, context)  # x itself for an SAE
        codes = self._select(x, aux_mask)
        f = relu_values(codes)
        x_hat, loss, terms = self._reconstruct(target, f)
        if codes.extra is not None:
            aux = aux_k_loss(target, x_hat, codes.extra, self.W_dec, self.aux_stride(x.shape[0]))
            loss = loss + self.config.aux_coef * aux
            terms["auxk"] = aux.detach()
        self._observe(f)
        return StepOutput(loss, self.with_skip(x_hat, skip), f, terms)

    def _observe(self, f: SparseCodes) -> None:
        """Update running state from the batch's activations (BatchTopK's threshold)."""

    def aux_stride(self, n_rows: int) -> int:
        """AuxK runs on every s-th row of the (shuffled) batch (`sae.base.aux_row_stride`)."""
        return aux_row_stride(n_rows, self.config.k, self.config.effective_aux_k, ROWS_PER_PASS)
