"""ReLU SAE with an L1 penalty (the baseline; Anthropic's April 2024 update).

f = ReLU(z); loss = |x - x_hat|^2 + lambda * sum_i f_i |d_i|, with lambda ramped up linearly
over the first `l1_warmup_fraction` of training. The decoder is left free: the penalty carries
the row norms, so shrinking f by growing |d_i| does not pay.

lambda is found automatically for an L0 target (`target_l0`, default k), as JumpReLU's is:
lambda = l1_coef * s, where the scale s (a buffer, saved and resumed) is multiplied after the
warm-up by exp(rate * clip(L0 / target - 1, -1, 1)) each step, rate = `controller_rate` / 10
(0 keeps lambda = l1_coef fixed). Ten times slower than JumpReLU's because L0 here answers
lambda only through Adam's updates, and resampled latents raise L0 for a few steps every 50:
at the full rate lambda chased those spikes and crushed every latent (planted features: MCC
0.19, FVU 1.0), at a tenth it lands where the best fixed lambda does (MCC 0.90, L0 12.1 for
a target of 12). Gated SAEs share the controller (`L0Steered`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from sae.base import Dictionary, StepContext, StepOutput, gather_per_latent, reconstruction_loss, register
from workbench.distributed import mean_over_ranks
from workbench.kernels import decode, encode_threshold


def warmed_up(coefficient: float, warmup_fraction: float, progress: float) -> float:
    return coefficient if warmup_fraction <= 0 else coefficient * min(1.0, progress / warmup_fraction)


class L0Steered(Dictionary):
    """A dictionary whose sparsity coefficient lambda is steered to an L0 target (see above)."""

    rate_scale: ClassVar[float] = 0.1

    defaulted_buffers = ("l1_scale",)  # folders written before the controller lack it: scale 1

    def __init__(self, config, generator=None):
        super().__init__(config, generator)
        self.register_buffer("l1_scale", torch.ones(()))

    def sparsity_coefficient(self, progress: float) -> float:
        """lambda for this step: l1_coef * the controller's scale, warmed up."""
        return warmed_up(self.config.l1_coef * float(self.l1_scale), self.config.l1_warmup_fraction, progress)

    @torch.no_grad()
    def steer(self, l0: Tensor, progress: float) -> None:
        """After the warm-up, move lambda's scale towards the L0 target (l0: this batch's mean L0)."""
        if self.config.controller_rate <= 0 or progress < self.config.l1_warmup_fraction:
            return
        error = (mean_over_ranks(l0.detach().float()) / self.config.effective_target_l0 - 1).clamp(-1, 1)
        self.l1_scale.mul_(torch.exp(self.rate_scale * self.config.controller_rate * error))


@register("relu")
class ReLU(L0Steered):
    unit_norm_decoder = False

    def __init__(self, config, generator=None):
        super().__init__(config, generator)
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents))

    def _encode(self, x):
        zero = torch.zeros(self.n_latents, dtype=self.W_enc.dtype, device=self.W_enc.device)
        return encode_threshold(x, self.W_enc, self.b_enc, zero, shift=self.encoder_shift)

    def training_step(self, x: Tensor, context: StepContext) -> StepOutput:
        target, skip = self.reconstruction_target(x, context)  # x itself for an SAE
        f = self._encode(x)
        x_hat = decode(f, self.W_dec, self.b_dec)
        mse = reconstruction_loss(target, x_hat)
        norms = gather_per_latent(self.W_dec.norm(dim=1), f)
        sparsity = (f.values * norms).sum() / x.shape[0]
        lam = self.sparsity_coefficient(context.progress)
        self.steer((f.values > 0).sum() / x.shape[0], context.progress)
        return StepOutput(
            mse + lam * sparsity,
            self.with_skip(x_hat, skip),
            f,
            {"mse": mse.detach(), "l1": sparsity.detach(), "lambda": self.l1_scale.new_tensor(lam)},
        )
