"""`workbench bench sae`: planted-feature recovery per architecture, scenario and seed.

Every architecture is trained with `workbench train`'s defaults (only the architecture, k,
width, token budget and seed are set: width = the number of planted features, k = the data's
expected L0 rounded, one pass over `samples`), all of one (scenario, seed) in one read of the
generated data (`sae.synthetic`, always on the CPU, so every device sees the same samples; the
dictionaries train on `--device` and are scored on the CPU). Scenarios:
    zipf        1,024 features in 256 dims (4x superposition), Zipf firing 0.3 -> 0.01, magnitudes
                |N(1, 0.25)|, an offset of norm 1 on every sample
    hierarchy   zipf + 64 parents with 2 children each (a child fires only with its parent): absorption
    correlated  zipf + features firing in correlated groups of 8 (shared factor weight 0.5)
    16x         4,096 features in 256 dims (16x superposition), 4,096 latents
Scores per dictionary, on 65,536 fresh samples: Hungarian-matched MCC, recovered@0.9, MMCS, dead
latents (never fire), L0, FVU, absorption (hierarchy). The summary gives, per scenario and
architecture, the mean and worst over seeds. A row names its architecture `arch` and its width
`latents`, the keys of the tables recorded before the fields were renamed (issue 18).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace

import torch

from sae import io
from sae.bench_config import SaeBenchConfig
from sae.synthetic import PlantedConfig, PlantedFeatures, absorption, feature_recovery, matching
from sae.train_config import TrainConfig
from sae.training import train
from workbench.seeding import generator

SCENARIOS = {  # the names are listed in sae.bench_config.SCENARIO_NAMES
    "zipf": PlantedConfig(bias_norm=1.0),
    "hierarchy": PlantedConfig(bias_norm=1.0, hierarchy=64, children=2),
    "correlated": PlantedConfig(bias_norm=1.0, correlation=0.5),
    "16x": PlantedConfig(bias_norm=1.0, n_planted=4096),
}
EVAL_SAMPLES = 65_536


def run_sae_benchmark(config: SaeBenchConfig, architectures: list[str], progress: bool = True) -> list[dict]:
    """One row per (scenario, seed, architecture), then one summary row per (scenario, architecture)."""
    torch.set_num_threads(config.threads)
    rows = []
    for scenario in config.scenario:
        for seed in config.seeds:
            base = SCENARIOS[scenario]
            sizes = (
                {"n_planted": config.n_planted, "hierarchy": min(base.hierarchy, config.n_planted // 16)}
                if config.n_planted
                else {}
            )
            sizes.update({"d_in": config.d_in} if config.d_in else {})
            data = PlantedFeatures(replace(base, samples=config.samples, seed=seed, **sizes))
            rows += [
                {"scenario": scenario, "seed": seed, **row}
                for row in _train_and_score(data, architectures, seed, progress, config.device)
            ]
    return rows + summarize(rows)


def _train_and_score(
    data: PlantedFeatures, architectures: list[str], seed: int, progress: bool, device: str = "auto"
) -> list[dict]:
    k = max(1, round(data.config.expected_l0))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            architectures=tuple(architectures),
            k=(k,),
            n_latents=data.config.n_planted,
            seed=seed,
            device=device,
            out=out,
        )
        folders = train(config, source=data, progress=progress)
        seconds = (time.perf_counter() - started) / len(architectures)
        return [score(io.load(folder), data, seconds) for folder in folders]


@torch.no_grad()
def score(dictionary, data: PlantedFeatures, seconds: float = 0.0) -> dict:
    """Recovery, dead latents, L0, FVU and absorption of one trained dictionary."""
    x, _ = data.generate(EVAL_SAMPLES, generator(data.config.seed, "bench eval"))
    codes = dictionary.encode(x)
    fired = torch.zeros(dictionary.n_latents, dtype=torch.bool)
    fired[codes.flat_indices()[codes.flat_values() > 0]] = True
    fvu = float((x - dictionary.decode(codes)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    recovery = feature_recovery(dictionary.W_dec, data.features)
    absorbed = (
        absorption(dictionary, data, matched=matching(dictionary.W_dec, data.features)[1])
        if data.pairs
        else None
    )
    return {
        "arch": dictionary.architecture,
        "latents": dictionary.n_latents,
        "k": dictionary.config.k,
        "mcc": round(recovery["mcc"], 4),
        "recovered_0.9": round(recovery["recovered_0.9"], 4),
        "mmcs": round(recovery["mmcs"], 4),
        "dead": int((~fired).sum()),
        "l0": round(codes.nnz / x.shape[0], 2),
        "fvu": round(fvu, 4),
        **({"absorption": round(absorbed, 4)} if absorbed is not None else {}),
        "train_s": round(seconds, 1),
        "resampled": int(dictionary.meta.get("metrics", {}).get("resampled_total", 0)),
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Per (scenario, architecture): mean and worst over seeds of MCC, recovered@0.9, dead,
    absorption, seconds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["scenario"], row["arch"]), []).append(row)
    summary = []
    for (scenario, arch), group in groups.items():
        entry = {
            "scenario": scenario,
            "seed": "all",
            "arch": arch,
            "seeds": len(group),
            "mcc": _mean(group, "mcc"),
            "mcc_worst": min(r["mcc"] for r in group),
            "recovered_0.9": _mean(group, "recovered_0.9"),
            "recovered_worst": min(r["recovered_0.9"] for r in group),
            "dead_worst": max(r["dead"] for r in group),
            "train_s": _mean(group, "train_s"),
        }
        if all("absorption" in r for r in group):
            entry["absorption"] = _mean(group, "absorption")
        summary.append(entry)
    return summary


def _mean(group: list[dict], key: str) -> float:
    return round(statistics.fmean(r[key] for r in group), 4)
