"""Feature Choice and Mutual Choice SAEs (Ayonrinde 2024, "Adaptive Sparse Allocation with
Mutual Choice & Feature Choice Sparse Autoencoders").

Both treat encoding as an allocation of a budget of k * N (token, latent) entries per batch:
- feature_choice: every latent picks its top m = k * N / n_latents tokens of the batch, so no
  latent can die and tokens get as many latents as chose them. A running per-latent threshold
  (EMA of the smallest value each latent kept) makes inference a per-token JumpReLU.
- mutual_choice: the k * N largest pre-activations over tokens x latents, with no constraint on
  either side. This is BatchTopK's selection; unlike BatchTopK it keeps allocating over the
  batch at inference (the paper's definition), so a code depends on its batch.
f = ReLU of the chosen pre-activations; loss = |x - x_hat|^2 (+ alpha * AuxK for mutual choice).
"""

from __future__ import annotations

import torch

from sae.base import register, relu_values
from sae.batchtopk import BatchTopK
from sae.topk import _AuxKDictionary
from workbench.distributed import min_over_ranks, world_size
from workbench.kernels import encode_batch_topk, encode_feature_choice, encode_threshold


@register("feature_choice")
class FeatureChoice(_AuxKDictionary):
    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("threshold", torch.zeros(config.n_latents))
        self.register_buffer("threshold_seen", torch.zeros(config.n_latents, dtype=torch.bool))

    def per_latent(self, n_tokens: int) -> int:
        return min(n_tokens, max(1, round(self.config.k * n_tokens / self.n_latents)))

    def _select(self, x, aux_mask):
        n_tokens = x.shape[0] * world_size()  # under torchrun each latent picks from every rank's rows
        return encode_feature_choice(x, self.W_enc, self.b_enc, self.per_latent(n_tokens), shift=self.b_dec)

    @torch.no_grad()
    def _observe(self, f):
        values, latents = f.flat_values(), f.flat_indices()
        positive = values > 0
        smallest = torch.full_like(self.threshold, float("inf")).scatter_reduce(
            0, latents[positive], values[positive], reduce="amin")
        smallest = min_over_ranks(smallest)
        seen = torch.isfinite(smallest)
        eta = self.config.threshold_momentum
        blended = torch.where(self.threshold_seen, (1 - eta) * self.threshold + eta * smallest, smallest)
        self.threshold.copy_(torch.where(seen, blended, self.threshold))
        self.threshold_seen |= seen

    def _encode(self, x):
        if not bool(self.threshold_seen.any()):
            return relu_values(self._select(x, None))
        theta = torch.where(self.threshold_seen, self.threshold, torch.full_like(self.threshold, float("inf")))
        return encode_threshold(x, self.W_enc, self.b_enc, theta, shift=self.b_dec)


@register("mutual_choice")
class MutualChoice(BatchTopK):
    def _encode(self, x):
        return relu_values(encode_batch_topk(x, self.W_enc, self.b_enc, self.config.k, shift=self.b_dec))
