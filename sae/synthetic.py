"""Planted-feature data: does a dictionary recover features we know are there?

K ground-truth unit directions in d dims (random, so they overlap: superposition when K > d,
4x with the defaults). Feature i fires with probability p_i, Zipf-distributed: 1 / (i + 1)^a
rescaled linearly onto [min_probability, max_probability] (SAELens's parameterisation; 1024
features with the defaults give L0 = sum p_i = 12.1). An active feature's coefficient is
|N(1, magnitude_std)|; x = sum_i c_i f_i + bias + Gaussian noise. Options that make it harder:
- `bias_norm`: a fixed offset vector every sample carries (SAELens's default is 1);
- `hierarchy`: the first `hierarchy` features are parents, each with `children` children drawn
  from the rarer features; a child fires only while its parent fires (with probability
  p_child / p_parent then, so its marginal stays p_child). An SAE may then let the child's latent
  absorb the parent's direction, so the parent's latent goes silent exactly when a child fires
  (feature absorption, Chanin et al. 2024): `absorption` measures that;
- `correlation`: features fire in groups of 8 that share a Gaussian factor with this weight (a
  Gaussian copula: z_i = sqrt(rho) g_group + sqrt(1 - rho) e_i, fires iff z_i > Phi^-1(1 - p_i),
  so each marginal p_i is kept while group members fire together).
Data is generated on the fly from (seed, epoch), so it is a `BatchSource` like a cache; every
draw takes its own generator (`workbench.seeding`), never the global RNG.

Scores, from the decoder rows D (each latent's direction) against the features F:
- MMCS: mean over features of the best cosine similarity with any latent;
- MCC: the mean cosine of a one-to-one (Hungarian) matching of features to latents, which
  duplicated latents cannot inflate; recovered@0.9: features whose matched latent has cos >= 0.9.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench import seeding
from workbench.errors import ConfigError
from workbench.seeding import generator as stream

GROUP_SIZE = 8


@dataclass(frozen=True)
class PlantedConfig:
    d_in: int = 256
    """Activation width (the dictionaries' d_in)."""
    n_planted: int = 1024
    """Number of planted features K (K / d_in is the superposition: 4x by default)."""
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
    bias_norm: float = 0.0
    """Norm of a fixed offset added to every sample (SAELens's synthetic model uses 1)."""
    hierarchy: int = 0
    """Parent features (the most frequent ones), each with `children` children among the rarer features."""
    children: int = 2
    """Children per parent (with hierarchy > 0); a child fires only while its parent fires."""
    correlation: float = 0.0
    """Weight of a shared Gaussian factor within groups of 8 features (0: independent firing)."""
    samples: int = 2_000_000
    """Samples per epoch."""
    seed: int = 0

    def __post_init__(self):
        if min(self.d_in, self.n_planted, self.samples) <= 0:
            raise ConfigError("d_in, n_planted and samples must be positive")
        if not 0 < self.min_probability <= self.max_probability <= 1:
            raise ConfigError("need 0 < min_probability <= max_probability <= 1")
        if self.hierarchy < 0 or self.children < 1 or self.hierarchy * (1 + self.children) > self.n_planted:
            raise ConfigError(
                f"hierarchy {self.hierarchy} x (1 + {self.children} children) "
                f"needs that many of the {self.n_planted} features"
            )
        if (
            not 0 <= self.correlation < 1
            or self.bias_norm < 0
            or self.magnitude_std < 0
            or self.noise_std < 0
        ):
            raise ConfigError(
                "need 0 <= correlation < 1 and non-negative bias_norm, magnitude_std, noise_std"
            )

    @property
    def expected_l0(self) -> float:
        return float(
            zipf_probabilities(
                self.n_planted, self.zipf_exponent, self.min_probability, self.max_probability
            ).sum()
        )


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
        g = stream(config.seed, "planted features")
        self.features = F.normalize(torch.randn(config.n_planted, config.d_in, generator=g), dim=1)
        self.bias = F.normalize(torch.randn(config.d_in, generator=g), dim=0) * config.bias_norm
        self.probabilities = zipf_probabilities(
            config.n_planted, config.zipf_exponent, config.min_probability, config.max_probability
        )
        self.parent = _hierarchy(config, stream(config.seed, "planted hierarchy"))
        self.group = (
            torch.randperm(config.n_planted, generator=stream(config.seed, "planted groups")) // GROUP_SIZE
        )
        self.d_in = config.d_in
        self.rows_per_epoch = config.samples

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(parent, child) feature pairs of the hierarchy."""
        return [(int(p), c) for c, p in enumerate(self.parent.tolist()) if p >= 0]

    def generate(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x [n, d], coefficients [n, K])."""
        c = self.config
        active = self._fires(n, generator)
        magnitude = (1 + c.magnitude_std * torch.randn(n, c.n_planted, generator=generator)).abs()
        coefficients = active * magnitude
        x = (
            coefficients @ self.features
            + self.bias
            + c.noise_std * torch.randn(n, c.d_in, generator=generator)
        )
        return x, coefficients

    def _fires(self, n: int, generator: torch.Generator) -> Tensor:
        c = self.config
        p = self.probabilities.clone()
        children = self.parent >= 0
        p[children] = (p[children] / p[self.parent[children]]).clamp(max=1)  # conditional on the parent
        if c.correlation > 0:
            shared = torch.randn(n, int(self.group.max()) + 1, generator=generator)[:, self.group]
            z = math.sqrt(c.correlation) * shared + math.sqrt(1 - c.correlation) * torch.randn(
                n, c.n_planted, generator=generator
            )
            active = z > torch.special.ndtri(1 - p)
        else:
            active = torch.rand(n, c.n_planted, generator=generator) < p
        if bool(children.any()):
            active[:, children] &= active[:, self.parent[children]]
        return active

    def epoch(self, epoch: int, batch_size: int) -> Iterator[Tensor]:
        generator = stream(self.config.seed, "planted epoch", epoch)
        for _ in range(self.rows_per_epoch // batch_size):
            yield self.generate(batch_size, generator)[0]

    def sample(self, n: int, stream: str = "init") -> Tensor:
        salt = ("planted sample",) if stream == "init" else ("planted sample", stream)
        return self.generate(n, seeding.generator(self.config.seed, *salt))[0]

    def describe(self) -> dict:
        return {"hook": "synthetic", "synthetic": asdict(self.config)}


def _hierarchy(config: PlantedConfig, generator: torch.Generator) -> Tensor:
    """parent[i]: feature i's parent, or -1. Parents are features 0..H-1 (the most frequent);
    their children are drawn from the features after them."""
    parent = torch.full((config.n_planted,), -1, dtype=torch.long)
    if config.hierarchy == 0:
        return parent
    pool = config.hierarchy + torch.randperm(config.n_planted - config.hierarchy, generator=generator)
    for p in range(config.hierarchy):
        parent[pool[p * config.children : (p + 1) * config.children]] = p
    return parent


def matching(decoder: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """(cos [K, m], latent matched to each feature [K]) by Hungarian matching on cosine."""
    from scipy.optimize import linear_sum_assignment

    cos = F.normalize(features.float(), dim=1) @ F.normalize(decoder.detach().float().cpu(), dim=1).t()
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    matched = torch.full((features.shape[0],), -1, dtype=torch.long)
    matched[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return cos, matched


def feature_recovery(decoder: Tensor, features: Tensor) -> dict[str, float]:
    """MMCS, Hungarian-matched MCC and recovered@0.9 of decoder rows [m, d] against features [K, d]."""
    cos, matched = matching(decoder, features)
    found = matched >= 0
    best = torch.zeros(features.shape[0])
    best[found] = cos[found.nonzero().squeeze(1), matched[found]]
    return {
        "mmcs": float(cos.max(dim=1).values.mean()),
        "mcc": float(best.mean()),
        "recovered_0.9": float((best >= 0.9).float().mean()),
    }


@torch.no_grad()
def absorption(
    dictionary, data: PlantedFeatures, n: int = 65_536, matched: Optional[Tensor] = None
) -> Optional[float]:
    """Mean over (parent, child) pairs of P(parent's matched latent is silent | child fires), on
    n fresh samples; None without a hierarchy. 0 = the parent's latent always fires with its
    children; 1 = the child's latent has absorbed the parent's direction."""
    pairs = data.pairs
    if not pairs:
        return None
    if matched is None:
        matched = matching(dictionary.W_dec, data.features)[1]
    x, coefficients = data.generate(n, stream(data.config.seed, "absorption sample"))
    fires = dictionary.encode(x).to_dense() > 0
    rates = []
    for parent, child in pairs:
        with_child = coefficients[:, child] > 0
        if matched[parent] < 0 or not bool(with_child.any()):
            continue
        rates.append(float((~fires[with_child, matched[parent]]).float().mean()))
    return sum(rates) / len(rates) if rates else None
