"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"), with an L0-target controller.

f_i = z_i * H(z_i - theta_i). theta is a parameter in its own units (not log theta, whose
gradient vanishes at small theta: SAELens's threshold barely moves). Straight-through
pseudo-gradients with a rectangle kernel of width eps, applied to the threshold only:
    d f / d theta = -(theta / eps) * 1[|z - theta| < eps / 2],   d f / d z = H(z - theta)
    d H / d theta = -(1 / eps) * 1[|z - theta| < eps / 2],       d H / d z = 0
Loss = |x - x_hat|^2 + lambda * sum_i H(z_i - theta_i). Instead of a fixed lambda, a controller
steers the batch L0 to `target_l0`: lambda = mu * sg(|x - x_hat|^2) / target (so mu is unitless)
and mu += rate * clip(L0 / target - 1, -1, 1) each step. mu is a Lagrange multiplier of the
constraint L0 = target and may turn negative: then the penalty rewards firing, for targets the
reconstruction alone would not reach. Since Adam moves theta by about lr per step however
large the penalty, the controller also multiplies every theta by exp(rate * error) each step,
which reaches the target in a few hundred steps. theta starts at each latent's
(1 - target / n_latents) quantile on the init sample, so training starts near the target L0.

The encoder pass keeps every entry with z > theta - eps / 2: the active ones and the window
below the threshold whose pseudo-gradients theta needs; window entries carry f = 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd import Function

from sae.base import Dictionary, StepContext, StepOutput, gather_per_latent, reconstruction_loss, register
from workbench.distributed import mean_over_ranks
from workbench.kernels import decode, encode_threshold


class JumpReLUFunction(Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        window = ((z - theta).abs() < ctx.bandwidth / 2).to(grad.dtype)
        return grad * (z > theta), -(theta / ctx.bandwidth) * window * grad, None


class StepFunction(Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta = ctx.saved_tensors
        window = ((z - theta).abs() < ctx.bandwidth / 2).to(grad.dtype)
        return None, -window * grad / ctx.bandwidth, None


@register("jumprelu")
class JumpReLU(Dictionary):
    def __init__(self, config, generator=None):
        super().__init__(config, generator)
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents))
        self.threshold = nn.Parameter(torch.full((config.n_latents,), config.bandwidth))
        self.register_buffer("multiplier", torch.full((), 0.5))

    def _encode(self, x):
        return encode_threshold(x, self.W_enc, self.b_enc, self.threshold.detach(), shift=self.encoder_shift)

    def training_step(self, x: Tensor, context: StepContext) -> StepOutput:
        eps = self.config.bandwidth
        target, skip = self.reconstruction_target(x, context)  # x itself for an SAE
        candidates = encode_threshold(
            x, self.W_enc, self.b_enc, self.threshold.detach() - eps / 2, shift=self.encoder_shift
        )
        theta = gather_per_latent(self.threshold, candidates)
        f = candidates.with_values(JumpReLUFunction.apply(candidates.values, theta, eps))
        x_hat = decode(f, self.W_dec, self.b_dec)
        mse = reconstruction_loss(target, x_hat)
        l0 = StepFunction.apply(candidates.values, theta, eps).sum() / x.shape[0]
        # under torchrun the controller sees the whole batch: every rank steers alike
        coefficient = self.multiplier * mean_over_ranks(mse.detach()) / self.config.effective_target_l0
        self._steer(mean_over_ranks(l0.detach()))
        terms = {
            "mse": mse.detach(),
            "l0_penalty": l0.detach(),
            "lambda": coefficient.detach().clone(),
            "threshold_mean": self.threshold.detach().mean(),
        }
        return StepOutput(mse + coefficient * l0, self.with_skip(x_hat, skip), f, terms)

    @torch.no_grad()
    def _steer(self, l0: Tensor) -> None:
        error = (l0 / self.config.effective_target_l0 - 1).clamp(-1, 1)
        self.multiplier += self.config.controller_rate * error
        # Adam moves theta by about lr per step whatever the penalty's size, too slowly for a
        # short run to reach its target; the controller also scales every threshold directly.
        self.threshold.mul_(torch.exp(self.config.controller_rate * error))

    @torch.no_grad()
    def initialize_from(self, sample, target=None):
        super().initialize_from(sample, target)
        sample = sample[:8192].to(self.W_enc.dtype)
        shift = self.encoder_shift
        z = (sample if shift is None else sample - shift) @ self.W_enc.t() + self.b_enc
        quantile = 1 - min(1.0, self.config.effective_target_l0 / self.n_latents)
        rank = min(z.shape[0], max(1, math.ceil(quantile * z.shape[0])))
        self.threshold.copy_(z.kthvalue(rank, dim=0).values.clamp_min(self.config.bandwidth))

    @torch.no_grad()
    def after_optimizer_step(self):
        super().after_optimizer_step()
        self.threshold.clamp_(min=0)
