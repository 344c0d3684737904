"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

f = ReLU(TopK_k(z)); loss = |x - x_hat|^2 + alpha * AuxK, where AuxK lets the top-aux_k
pre-activations of dead latents reconstruct the residual (see `sae.base.aux_k_loss`), with its
gradient reaching the encoder through the fused kernels' second selection.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from sae.base import Dictionary, StepContext, StepOutput, aux_k_loss, aux_row_stride, reconstruction_loss, register, relu_values
from workbench.kernels import SparseCodes, decode, encode_topk
from workbench.kernels.encode import ROWS_PER_PASS


class _AuxKDictionary(Dictionary):
    """A dictionary with an encoder bias whose loss is reconstruction + AuxK on a selection."""

    def __init__(self, config, generator=None):
        super().__init__(config, generator)
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents))

    def _select(self, x: Tensor, aux_mask: Optional[Tensor]) -> SparseCodes:
        raise NotImplementedError

    def _reconstruct(self, x: Tensor, f: SparseCodes) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(x_hat, reconstruction loss, terms); Matryoshka overrides it with its prefixes."""
        x_hat = decode(f, self.W_dec, self.b_dec)
        mse = reconstruction_loss(x, x_hat)
        return x_hat, mse, {"mse": mse.detach()}

    def aux_mask(self, context: StepContext) -> Optional[Tensor]:
        """bool [n_latents]: the latents AuxK trains this step (the dead ones), or None."""
        return context.dead_mask

    def training_step(self, x: Tensor, context: StepContext) -> StepOutput:
        dead = self.aux_mask(context)
        aux_mask = dead if dead is not None and bool(dead.any()) and self.config.aux_coef > 0 else None
        codes = self._select(x, aux_mask)
        f = relu_values(codes)
        x_hat, loss, terms = self._reconstruct(x, f)
        if codes.extra is not None:
            aux = aux_k_loss(x, x_hat, codes.extra, self.W_dec, self.aux_stride(x.shape[0]))
            loss = loss + self.config.aux_coef * aux
            terms["auxk"] = aux.detach()
        self._observe(f)
        return StepOutput(loss, x_hat, f, terms)

    def _observe(self, f: SparseCodes) -> None:
        """Update running state from the batch's activations (BatchTopK's threshold)."""

    def aux_stride(self, n_rows: int) -> int:
        """AuxK runs on every s-th row of the (shuffled) batch (`sae.base.aux_row_stride`)."""
        return aux_row_stride(n_rows, self.config.k, self.config.effective_aux_k, ROWS_PER_PASS)


@register("topk")
class TopK(_AuxKDictionary):
    def _select(self, x, aux_mask):
        k_aux = self.config.effective_aux_k
        return encode_topk(x, self.W_enc, self.b_enc, self.config.k, aux_k=k_aux, aux_mask=aux_mask, shift=self.b_dec,
                           approximate=self.config.approx_topk, aux_stride=self.aux_stride(x.shape[0]))

    def _encode(self, x):
        return relu_values(encode_topk(x, self.W_enc, self.b_enc, self.config.k, shift=self.b_dec))
