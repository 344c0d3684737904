"""Planted-feature data: does a dictionary recover features we know are there?

K ground-truth unit directions in d dims (random, so they overlap: superposition when K > d).
Feature i fires independently with probability p_i, Zipf-distributed: 1 / (i + 1)^a rescaled
linearly onto [min_probability, max_probability] (the parameterisation of SAELens's synthetic
data; 1024 features with the defaults give L0 = sum p_i = 12.1); an active feature's coefficient is |N(1, magnitude_std)|; Gaussian noise is added. The data
is generated on the fly from (seed, epoch), so it is a `BatchSource` like a cache.

Scores, from the decoder rows D (each latent's direction) against the features F:
- MMCS: mean over features of the best cosine similarity with any latent;
- MCC: the mean cosine of a one-to-one (Hungarian) matching of features to latents, which
  duplicated latents cannot inflate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from workbench.errors import ConfigError


@dataclass(frozen=True)
class PlantedConfig:
    d: int = 256
    """Activation width."""
    n_features: int = 1024
    """Number of planted features K."""
    zipf_exponent: float = 1.0
    """Firing probabilities follow 1 / (i + 1)^exponent, rescaled onto [min_probability, max_probability]."""
    max_probability: float = 0.3
    """Firing probability of the most frequent feature."""
    min_probability: float = 0.01
    """Firing probability of the rarest feature."""
    magnitude_std: float = 0.25
    """Std of the active coefficients around 1 (folded to be positive)."""
    noise_std: float = 0.01
    """Std of the isotropic Gaussian noise per dimension."""
    samples: int = 2_000_000
    """Samples per epoch."""
    seed: int = 0

    def __post_init__(self):
        if min(self.d, self.n_features, self.samples) <= 0:
            raise ConfigError("d, n_features and samples must be positive")
        if not 0 < self.min_probability <= self.max_probability <= 1:
            raise ConfigError("need 0 < min_probability <= max_probability <= 1")

    @property
    def expected_l0(self) -> float:
        return float(zipf_probabilities(self.n_features, self.zipf_exponent, self.min_probability, self.max_probability).sum())


def zipf_probabilities(n: int, exponent: float, low: float, high: float) -> Tensor:
    """(i + 1)^-exponent for i < n, rescaled linearly onto [low, high] (descending)."""
    p = (torch.arange(n, dtype=torch.float64) + 1).pow(-exponent)
    if n == 1:
        return torch.tensor([high])
    return (low + (high - low) * (p - p.min()) / (p.max() - p.min())).float()


class PlantedFeatures:
    """A BatchSource of planted-feature samples, plus the ground truth to score against."""

    def __init__(self, config: PlantedConfig):
        self.config = config
        # A seed stream of its own: a dictionary initialised with torch.manual_seed(seed) draws
        # the same randn(K, d) and would start on the answer.
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 0xFEA7)
        self.features = F.normalize(torch.randn(config.n_features, config.d, generator=generator), dim=1)
        self.probabilities = zipf_probabilities(config.n_features, config.zipf_exponent, config.min_probability, config.max_probability)
        self.d = config.d
        self.rows_per_epoch = config.samples

    def generate(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x [n, d], coefficients [n, K])."""
        c = self.config
        active = torch.rand(n, c.n_features, generator=generator) < self.probabilities
        magnitude = (1 + c.magnitude_std * torch.randn(n, c.n_features, generator=generator)).abs()
        coefficients = active * magnitude
        x = coefficients @ self.features + c.noise_std * torch.randn(n, c.d, generator=generator)
        return x, coefficients

    def epoch(self, epoch: int, batch_size: int) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7 * epoch + 1)
        for _ in range(self.rows_per_epoch // batch_size):
            yield self.generate(batch_size, generator)[0]

    def sample(self, n: int) -> Tensor:
        return self.generate(n, torch.Generator().manual_seed(self.config.seed + 7919))[0]

    def describe(self) -> dict:
        return {"hook": "synthetic", "synthetic": asdict(self.config)}


def feature_recovery(decoder: Tensor, features: Tensor) -> dict[str, float]:
    """MMCS and Hungarian-matched MCC of decoder rows [m, d] against features [K, d]."""
    cos = F.normalize(features.float(), dim=1) @ F.normalize(decoder.detach().float().cpu(), dim=1).t()
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    matched = cos[torch.as_tensor(rows), torch.as_tensor(cols)]
    return {"mmcs": float(cos.max(dim=1).values.mean()), "mcc": float(matched.sum() / features.shape[0])}
