"""Feature Choice and Mutual Choice SAEs (Ayonrinde 2024, "Adaptive Sparse Allocation with
Mutual Choice & Feature Choice Sparse Autoencoders").

Both treat encoding as an allocation of a budget of k * N (token, latent) entries per batch:
- feature_choice: every latent picks its top m = k * N / n_latents tokens of the batch, so no
  latent can die and tokens get as many latents as chose them. A running per-latent threshold
  (EMA of the smallest value each latent kept) makes inference a per-token JumpReLU.
- mutual_choice: the k * N largest pre-activations over tokens x latents, with no constraint on
  either side. This is BatchTopK's selection; unlike BatchTopK it keeps allocating over the
  batch at inference (the paper's definition), so a code depends on its batch. What the paper
  adds in training is aux_zipf_loss, which generalises AuxK from dead latents to under-used
  ones: feature densities follow a Zipf law except at their lower end, so a latent firing well
  below the Zipf curve fitted to the densities is under-used. Our reading (the paper's formula
  was not available to us): sort the latents' running firing rates r_(1) >= r_(2) >= ..., fit
  log r = log C - a log rank by least squares over the top half of the ranks, and let AuxK train
  every latent with r_(rank) < ZIPF_SHORTFALL * C rank^-a (dead ones included): they reconstruct
  the residual from their top-aux_k pre-activations (`sae.base.aux_k_loss`). `aux_zipf=False`
  falls back to plain AuxK (dead latents only).
f = ReLU of the chosen pre-activations; loss = |x - x_hat|^2 (+ alpha * AuxK / aux_zipf_loss for
mutual choice).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.base import register, relu_values
from sae.calibrate import latent_cuts
from sae.dictionaries.auxk import AuxKDictionary
from sae.dictionaries.batchtopk import BatchTopK
from workbench.distributed import min_over_ranks, world_size
from workbench.kernels import encode_batch_topk, encode_feature_choice, encode_threshold


@register("feature_choice")
class FeatureChoice(AuxKDictionary):
    def __init__(self, config, generator=None):
        super().__init__(config, generator)
        self.register_buffer("threshold", torch.zeros(config.n_latents))
        self.register_buffer("threshold_seen", torch.zeros(config.n_latents, dtype=torch.bool))

    def per_latent(self, n_tokens: int) -> int:
        return min(n_tokens, max(1, round(self.config.k * n_tokens / self.n_latents)))

    def _select(self, x, aux_mask):
        n_tokens = x.shape[0] * world_size()  # under torchrun each latent picks from every rank's rows
        return encode_feature_choice(
            x, self.W_enc, self.b_enc, self.per_latent(n_tokens), shift=self.encoder_shift
        )

    @torch.no_grad()
    def _observe(self, f):
        values, latents = f.flat_values(), f.flat_indices()
        positive = values > 0
        smallest = torch.full_like(self.threshold, float("inf")).scatter_reduce(
            0, latents[positive], values[positive], reduce="amin"
        )
        smallest = min_over_ranks(smallest)
        seen = torch.isfinite(smallest)
        eta = self.config.threshold_momentum
        blended = torch.where(self.threshold_seen, (1 - eta) * self.threshold + eta * smallest, smallest)
        self.threshold.copy_(torch.where(seen, blended, self.threshold))
        self.threshold_seen |= seen

    @torch.no_grad()
    def calibrate(self, x):
        """Each latent's threshold <- the cut that keeps its training quota of x's rows (mean L0 k)."""
        self.threshold.copy_(latent_cuts(self, x, self.per_latent(x.shape[0])))
        self.threshold_seen.fill_(True)

    def _encode(self, x):
        if not bool(self.threshold_seen.any()):
            return relu_values(self._select(x, None))
        theta = torch.where(
            self.threshold_seen, self.threshold, torch.full_like(self.threshold, float("inf"))
        )
        return encode_threshold(x, self.W_enc, self.b_enc, theta, shift=self.encoder_shift)


ZIPF_SHORTFALL = 0.5


def zipf_underused(firing_rate: Tensor, shortfall: float = ZIPF_SHORTFALL) -> Tensor:
    """bool [m]: latents whose firing rate is below `shortfall` times a Zipf law fitted (in
    log-log, least squares) to the top half of the sorted rates at their rank."""
    m = firing_rate.numel()
    rates, order = firing_rate.float().sort(descending=True)
    rank = torch.arange(1, m + 1, dtype=torch.float32, device=rates.device)
    head = slice(0, max(2, m // 2))
    log_rank, log_rate = rank[head].log(), rates[head].clamp_min(1e-12).log()
    slope = ((log_rank - log_rank.mean()) * (log_rate - log_rate.mean())).sum() / (
        log_rank - log_rank.mean()
    ).pow(2).sum()
    intercept = log_rate.mean() - slope * log_rank.mean()
    expected = (intercept + slope * rank.log()).exp()
    under = torch.zeros(m, dtype=torch.bool, device=rates.device)
    under[order] = rates < shortfall * expected
    return under


@register("mutual_choice")
class MutualChoice(BatchTopK):
    def aux_mask(self, context):
        if not self.config.aux_zipf or context.firing_rate is None:
            return context.dead_mask
        under = zipf_underused(context.firing_rate)
        return under if context.dead_mask is None else under | context.dead_mask

    def _encode(self, x):
        return relu_values(
            encode_batch_topk(x, self.W_enc, self.b_enc, self.config.k, shift=self.encoder_shift)
        )
