"""Resampling latents that do not earn their place (Bricken et al. 2023, "Towards
Monosemanticity", neuron resampling), on by default for the first 95% of training.

A latent is resampled when it fired fewer than `min_fires` times since the last resampling
(the trainer sets it to `--resample-below` = 0.02 of the mean firing count, every 50 steps),
or, when asked (`--resample-duplicate-cosine` < 1; it costs an n_latents^2 matrix), when its
decoder row nearly duplicates (cosine > `duplicate_cosine`) that of a latent that fired more.
Why on by default (issue 16): on planted features, TopK-family SAEs are left with ~5-10% of
latents that fire a few times per 65k tokens, aligned with nothing, while as many true features
go missing (MCC 0.88-0.92 however long the run); AuxK does not count them as dead. At 0.02 of
the mean rate they are caught (MCC 0.99), while on the demo's real activations it costs FVU
0.001 (0.102 -> 0.103, ~30 of 2,048 latents moved per resampling; at 0.2 of the mean rate it
cost 0.006 and left 14% of latents silent on held-out text).

A resampled latent's new decoder row is the residual x - x_hat of an input drawn with probability
proportional to |x - x_hat|^2 (the inputs the dictionary explains worst, so directions it is
missing); its encoder row points the same way with the mean norm of the kept rows, its
per-latent biases restart at 0, a per-latent threshold (JumpReLU, Feature Choice) where the
new latent fires on k / n_latents of the batch, and its Adam moments are cleared.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.base import Dictionary
from sae.calibrate import preactivations, quota_cuts

# Per-latent parameters whose entries restart at zero on resampling (W_enc/W_dec are set).
_ZEROED = ("b_enc", "b_gate", "b_mag", "r_mag")


@torch.no_grad()
def latents_to_resample(
    dictionary: Dictionary, fires: Tensor, min_fires: float, duplicate_cosine: float
) -> Tensor:
    """bool [n_latents]: rarely firing latents and the less active member of duplicate pairs."""
    chosen = fires < min_fires
    if duplicate_cosine < 1:
        directions = F.normalize(dictionary.W_dec, dim=1)
        cos = directions @ directions.t()
        cos.fill_diagonal_(0)
        busier = fires[None, :] > fires[:, None]  # [i, j]: j fired more than i
        order = torch.arange(len(fires), device=fires.device)
        tie = (fires[None, :] == fires[:, None]) & (order[None, :] < order[:, None])
        chosen |= ((cos > duplicate_cosine) & (busier | tie)).any(dim=1)
    return chosen


@torch.no_grad()
def resample(
    dictionary: Dictionary,
    optimizer: torch.optim.Optimizer,
    chosen: Tensor,
    x: Tensor,
    x_hat: Tensor,
    generator: torch.Generator,
    target: Optional[Tensor] = None,
) -> int:
    """Re-initialise the `chosen` latents from badly reconstructed inputs; return how many.
    For a transcoder `x_hat` predicts `target` (y); the residual y - x_hat gives the decoder row
    and the input's own direction (centred on the batch mean) the encoder row."""
    latents = chosen.nonzero().squeeze(1)
    n = latents.numel()
    if n == 0 or not hasattr(dictionary, "W_enc"):  # codebooks replace their dead codes themselves
        return 0
    residual = (x if target is None else target) - x_hat
    weights = residual.pow(2).sum(dim=1)
    if float(weights.sum()) <= 0:
        return 0
    rows = torch.multinomial(weights.cpu(), n, replacement=n > len(weights), generator=generator).to(x.device)
    directions = F.normalize(residual[rows], dim=1)
    kept = ~chosen
    enc_norm = dictionary.W_enc[kept].norm(dim=1).mean() if bool(kept.any()) else torch.tensor(1.0)
    dec_norm = dictionary.W_dec[kept].norm(dim=1).mean() if bool(kept.any()) else torch.tensor(1.0)
    dictionary.W_dec[latents] = directions * dec_norm
    if dictionary.is_transcoder:
        inputs = x - x.mean(dim=0)
        dictionary.W_enc[latents] = F.normalize(inputs[rows], dim=1) * enc_norm
    else:
        dictionary.W_enc[latents] = directions * enc_norm
    for name in _ZEROED:
        if hasattr(dictionary, name):
            getattr(dictionary, name)[latents] = 0
    if dictionary.is_transcoder:
        _bias_at_the_mean_rate(dictionary, latents, x)
    threshold = getattr(dictionary, "threshold", None)  # JumpReLU's parameter, Feature Choice's running one
    if isinstance(threshold, Tensor) and threshold.dim() == 1 and threshold.shape[0] == dictionary.n_latents:
        threshold[latents] = _firing_at_the_mean_rate(dictionary, latents, x)
    _clear_moments(dictionary, optimizer, latents)
    return n


def _bias_at_the_mean_rate(dictionary: Dictionary, latents: Tensor, x: Tensor) -> None:
    """A transcoder's new latents: encoder biases (b_enc; gated: b_gate and b_mag) at which each
    fires on k / n_latents of the batch x. Its input is not centred (no b_dec shift), so with
    zero biases a new latent's pre-activations were large on most rows: the demo's layer-0 TopK
    transcoder (4,096 latents, k 32) went from FVU 0.24 to 5.2 at one resampling."""
    pre = x.to(dictionary.W_enc.dtype) @ dictionary.W_enc[latents].t()
    per_latent = min(pre.shape[0] - 1, max(1, round(x.shape[0] * dictionary.config.k / dictionary.n_latents)))
    cut = pre.topk(per_latent + 1, dim=0).values[-1]
    for name in ("b_enc", "b_gate", "b_mag"):
        if isinstance(getattr(dictionary, name, None), Tensor):
            getattr(dictionary, name)[latents] = -cut


def _firing_at_the_mean_rate(dictionary: Dictionary, latents: Tensor, x: Tensor) -> Tensor:
    """Thresholds at which each new latent fires on k / n_latents of the batch x. The kept
    latents' median threshold (used before) sat above most new latents' pre-activations on the
    demo: JumpReLU resampled 18% of its latents every time, 56% of them silent on held-out text."""
    pre = torch.cat(list(preactivations(dictionary, x, latents=latents)))
    per_latent = max(1, round(x.shape[0] * dictionary.config.k / dictionary.n_latents))
    cuts = quota_cuts(pre, per_latent)
    return torch.where(cuts > 0, cuts, torch.full_like(cuts, dictionary.config.bandwidth))


def _clear_moments(dictionary: Dictionary, optimizer: torch.optim.Optimizer, latents: Tensor) -> None:
    for param in dictionary.parameters():
        if param.dim() == 0 or param.shape[0] != dictionary.n_latents:
            continue
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][latents] = 0
