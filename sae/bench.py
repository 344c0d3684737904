"""`workbench bench sae`: planted-feature recovery per architecture (see `sae.synthetic`).

Every architecture is trained, in one pass over the same generated data, with one recipe:
width = number of planted features, k = the data's expected L0 (rounded), batch 1024, the
default learning rate, and resampling of latents firing below 0.2x the mean rate (or
duplicating a busier latent at cosine > 0.7) every 50 steps for the first 85% of training.
Scores: Hungarian-matched MCC and MMCS of decoder rows against the planted features, dead
latents on 16,384 fresh samples, and FVU on them.
"""

from __future__ import annotations

import tempfile
import time

import torch

from sae import io
from sae.synthetic import PlantedConfig, PlantedFeatures, feature_recovery
from sae.train import train
from sae.train_config import TrainConfig

RECIPE = {"batch_size": 1024, "resample_every": 50, "resample_until": 0.85, "resample_below": 0.2,
          "resample_duplicate_cosine": 0.7, "log_every": 50}


def run_sae_benchmark(archs: list[str], *, samples: int = 2_000_000, n_features: int = 1024, d: int = 256,
                      seed: int = 0, threads: int = 2, progress: bool = True) -> list[dict]:
    torch.set_num_threads(threads)
    data = PlantedFeatures(PlantedConfig(d=d, n_features=n_features, samples=samples, seed=seed))
    k = max(1, round(data.config.expected_l0))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(arch=tuple(archs), k=(k,), latents=n_features, seed=seed, out=out, **RECIPE)
        folders = train(config, source=data, progress=progress)
        seconds = (time.perf_counter() - started) / len(archs)
        return [_score(io.load(folder), data, seconds) for folder in folders]


@torch.no_grad()
def _score(dictionary, data: PlantedFeatures, seconds: float) -> dict:
    x, _ = data.generate(16_384, torch.Generator().manual_seed(data.config.seed + 99))
    codes = dictionary.encode(x)
    fired = torch.zeros(dictionary.n_latents, dtype=torch.bool)
    fired[codes.flat_indices()[codes.flat_values() > 0]] = True
    x_hat = dictionary.decode(codes)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    recovery = feature_recovery(dictionary.W_dec, data.features)
    return {"arch": dictionary.architecture, "latents": dictionary.n_latents, "k": dictionary.config.k,
            "mcc": round(recovery["mcc"], 4), "mmcs": round(recovery["mmcs"], 4),
            "dead": int((~fired).sum()), "fvu": round(fvu, 4), "l0": round(codes.nnz / x.shape[0], 2),
            "train_s": round(seconds, 1)}
