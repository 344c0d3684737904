"""Inference thresholds calibrated at the end of training (issue 17.4).

BatchTopK, Matryoshka and Feature Choice select over the whole batch while training and run as
a JumpReLU at inference. Their running thresholds (an EMA of the smallest value kept) lag the
final weights: a 256-step BatchTopK at k 16 ran at L0 13.9 with its running threshold. At the
end of training the trainer recomputes them on a sample of rows drawn apart from the training
order, so that the saved dictionary's mean L0 equals k on fresh rows:

- one threshold (BatchTopK, Matryoshka): the cut between the (N k)-th and (N k + 1)-th largest
  pre-activation of the N rows, i.e. the batch cut of a batch of N;
- one threshold per latent (Feature Choice): the cut between each latent's m-th and (m + 1)-th
  largest pre-activation, m = k N / n_latents, the quota each latent keeps while training.

A cut lies midway between the two values (inference keeps pre > threshold). Only positive
pre-activations are ever kept: a latent with fewer than m positive values gets threshold 0.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

ROWS_PER_PASS = 2048


def preactivations(
    dictionary, x: Tensor, rows: int = ROWS_PER_PASS, latents: Optional[Tensor] = None
) -> Iterator[Tensor]:
    """[rows, n_latents] (or [rows, len(latents)]) ReLU'd encoder pre-activations of x - shift
    (b_dec for an SAE, nothing for a transcoder: `Dictionary.encoder_shift`), a pass of `rows` at a time."""
    weight, bias, shift = dictionary.W_enc, dictionary.b_enc, dictionary.encoder_shift
    if latents is not None:
        weight, bias = weight[latents], bias[latents]
    for start in range(0, x.shape[0], rows):
        chunk = x[start : start + rows].to(weight.dtype)
        chunk = chunk if shift is None else chunk - shift
        yield torch.addmm(bias, chunk, weight.t()).clamp_min_(0)


def _midway(above: Tensor, below: Tensor) -> Tensor:
    return torch.where(above > 0, (above + below.clamp_min(0)) / 2, torch.zeros_like(above))


@torch.no_grad()
def batch_cut(dictionary, x: Tensor, k: int) -> Tensor:
    """Scalar threshold under which exactly N k of x's N rows' entries lie above (ties aside)."""
    keep = k * x.shape[0] + 1
    best = x.new_empty(0)
    for pre in preactivations(dictionary, x):
        flat = pre.flatten()
        best = torch.cat([best, flat.topk(min(keep, flat.numel())).values])
        best = best.topk(min(keep, best.numel())).values
    if best.numel() < keep:  # fewer entries than N k + 1: keep every positive one
        return x.new_zeros(())
    return _midway(best[-2], best[-1])


@torch.no_grad()
def latent_cuts(dictionary, x: Tensor, per_latent: int) -> Tensor:
    """[n_latents] thresholds under which each latent keeps `per_latent` of x's rows (ties aside)."""
    keep = min(per_latent + 1, x.shape[0])
    best = None
    for pre in preactivations(dictionary, x):
        best = pre if best is None else torch.cat([best, pre])
        best = best.topk(min(keep, best.shape[0]), dim=0).values
    return quota_cuts(best, per_latent)


def quota_cuts(pre: Tensor, per_latent: int) -> Tensor:
    """[n] thresholds under which each column of pre [N, n] (ReLU'd) keeps `per_latent` rows;
    0 where a column has no more than `per_latent` rows."""
    if pre.shape[0] <= per_latent:
        return pre.new_zeros(pre.shape[1])
    top = pre.topk(per_latent + 1, dim=0).values
    return _midway(top[per_latent - 1], top[per_latent])


@torch.no_grad()
def inference_l0(dictionary, x: Tensor, rows: int = 4096) -> float:
    """Mean number of nonzero latents per row of x as the dictionary encodes at inference (rows
    encoded `rows` at a time: a batch-allocating code such as Mutual Choice depends on it)."""
    nonzero = sum(
        int((codes.flat_values() != 0).sum())
        for codes in (dictionary.encode(x[start : start + rows]) for start in range(0, x.shape[0], rows))
    )
    return nonzero / max(1, x.shape[0])
