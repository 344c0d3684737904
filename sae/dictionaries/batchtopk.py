"""BatchTopK SAE (Bussmann et al. 2024): the k * N largest pre-activations of the whole batch.

Training keeps the batch's top k * N entries (k per token on average, more for tokens that need
them), f = ReLU of them, loss = |x - x_hat|^2 + alpha * AuxK. A running threshold
theta <- (1 - eta) theta + eta * min(f > 0) is tracked; inference is a JumpReLU with that theta,
so a token's code no longer depends on its batch. At the end of training theta is
recalibrated on held-apart rows to the cut that gives mean L0 k (`sae.calibrate`).
"""

from __future__ import annotations

import torch

from sae.base import register, relu_values
from sae.calibrate import batch_cut
from sae.dictionaries.auxk import AuxKDictionary
from workbench.distributed import min_over_ranks
from workbench.kernels import encode_batch_topk, encode_threshold


@register("batchtopk")
class BatchTopK(AuxKDictionary):
    def __init__(self, config, generator=None):
        super().__init__(config, generator)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def _select(self, x, aux_mask):
        k_aux = self.config.effective_aux_k
        return encode_batch_topk(
            x,
            self.W_enc,
            self.b_enc,
            self.config.k,
            aux_k=k_aux,
            aux_mask=aux_mask,
            shift=self.encoder_shift,
            aux_stride=self.aux_stride(x.shape[0]),
        )

    @torch.no_grad()
    def _observe(self, f):
        positive = f.flat_values()[f.flat_values() > 0]
        smallest = positive.min() if positive.numel() else positive.new_tensor(float("inf"))
        smallest = min_over_ranks(smallest)  # under torchrun: the whole batch's smallest
        if not torch.isfinite(smallest):
            return
        eta = self.config.threshold_momentum if int(self.threshold_updates) else 1.0
        self.threshold.mul_(1 - eta).add_(eta * smallest)
        self.threshold_updates += 1

    @torch.no_grad()
    def calibrate(self, x):
        """theta <- the batch cut of x's rows: mean L0 k on rows like them (the running EMA lags)."""
        self.threshold.copy_(batch_cut(self, x, self.config.k))
        self.threshold_updates.clamp_(min=1)

    def _encode(self, x):
        if int(self.threshold_updates) == 0:  # never trained: no threshold yet, use the batch
            return relu_values(
                encode_batch_topk(x, self.W_enc, self.b_enc, self.config.k, shift=self.encoder_shift)
            )
        theta = self.threshold.expand(self.n_latents)
        return encode_threshold(x, self.W_enc, self.b_enc, theta, shift=self.encoder_shift)
