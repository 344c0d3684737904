"""ReLU SAE with an L1 penalty (the baseline; Anthropic's April 2024 update).

f = ReLU(z); loss = |x - x_hat|^2 + lambda * sum_i f_i |d_i|, with lambda ramped up linearly
over the first `l1_warmup_fraction` of training. The decoder is left free: the penalty carries
the row norms, so shrinking f by growing |d_i| does not pay.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae.base import Dictionary, StepContext, StepOutput, gather_per_latent, reconstruction_loss, register
from workbench.kernels import decode, encode_threshold


def warmed_up(coefficient: float, warmup_fraction: float, progress: float) -> float:
    return coefficient if warmup_fraction <= 0 else coefficient * min(1.0, progress / warmup_fraction)


@register("relu")
class ReLU(Dictionary):
    unit_norm_decoder = False

    def __init__(self, config):
        super().__init__(config)
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents))

    def _encode(self, x):
        zero = torch.zeros(self.n_latents, dtype=self.W_enc.dtype, device=self.W_enc.device)
        return encode_threshold(x, self.W_enc, self.b_enc, zero, shift=self.b_dec)

    def training_step(self, x: Tensor, context: StepContext) -> StepOutput:
        f = self._encode(x)
        x_hat = decode(f, self.W_dec, self.b_dec)
        mse = reconstruction_loss(x, x_hat)
        norms = gather_per_latent(self.W_dec.norm(dim=1), f)
        sparsity = (f.values * norms).sum() / x.shape[0]
        lam = warmed_up(self.config.l1_coef, self.config.l1_warmup_fraction, context.progress)
        return StepOutput(mse + lam * sparsity, x_hat, f, {"mse": mse.detach(), "l1": sparsity.detach()})
