"""Codebook features on cached activations: k-means start, dead-code replacement, and codes
that find planted clusters."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae import io
from sae.base import StepContext, create
from sae.config import DictionaryConfig
from sae.dictionaries.codebook import DEAD_CODE_STEPS
from sae.train_config import TrainConfig
from sae.training import train


class Clusters:
    """A BatchSource: points near one of `n` unit centres (a VQ bottleneck's ground truth)."""

    def __init__(self, n=16, d_in=24, samples=60_000, seed=0):
        generator = torch.Generator().manual_seed(seed + 555)
        self.centres = F.normalize(torch.randn(n, d_in, generator=generator), dim=1) * 3
        self.d_in, self.rows_per_epoch, self.seed = d_in, samples, seed

    def _draw(self, n, generator):
        which = torch.randint(0, len(self.centres), (n,), generator=generator)
        return self.centres[which] + 0.05 * torch.randn(n, self.d_in, generator=generator)

    def epoch(self, epoch, batch_size):
        generator = torch.Generator().manual_seed(self.seed * 31 + epoch)
        for _ in range(self.rows_per_epoch // batch_size):
            yield self._draw(batch_size, generator)

    def sample(self, n):
        return self._draw(n, torch.Generator().manual_seed(self.seed + 1))

    def describe(self):
        return {"hook": "clusters"}


def test_codes_find_planted_clusters(tmp_path):
    data = Clusters(samples=120_000)
    config = TrainConfig(
        architectures=("codebook",), k=(1,), codes=16, batch_size=512, out=str(tmp_path), log_every=20
    )
    folder = train(config, source=data, progress=False)[0]
    codebook = io.load(folder)
    cos = F.normalize(data.centres, dim=1) @ F.normalize(codebook.W_dec, dim=1).t()
    assert float(cos.max(dim=1).values.min().detach()) > 0.99  # every centre has a code (k-means alone: 0.80)
    x = data.sample(256)
    assert float((codebook(x) - x).pow(2).sum().detach() / (x - x.mean(0)).pow(2).sum()) < 0.01
    assert folder.name == "codebook-k1-c16"


def test_dead_codes_are_replaced_by_inputs():
    d = create(DictionaryConfig(architecture="codebook", d_in=8, n_latents=12, k=2), seed=0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) + 5
    d.initialize_from(x[:32])
    with torch.no_grad():
        d.W_dec[:4] = -100.0  # pointing away from every input: never chosen
    for _ in range(DEAD_CODE_STEPS):
        d.training_step(x, StepContext(None, 0.5))
        d.after_optimizer_step()
    assert int(d.replacements) >= 4
    assert float(d.W_dec[:4].abs().max()) < 50  # now inputs / k, not the unreachable codes


def test_kmeans_start_reconstructs_better_than_random_codes():
    data = Clusters(n=8, d_in=16)
    x = data.sample(2048)
    config = DictionaryConfig(architecture="codebook", d_in=16, n_latents=8, k=1)
    fresh, seeded = create(config, seed=0), create(config, seed=0)
    seeded.initialize_from(x)
    error = lambda d: float((d(x) - x).pow(2).mean())
    assert error(seeded) < 0.15 * error(fresh)  # 0.101x with this seed's streams (k-means: ~0.1x)
