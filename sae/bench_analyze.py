"""`workbench bench analyze`: feature-store build throughput and feature-page read latency.

The analysis pass (encode + every per-feature accumulator of `sae.analyze`) runs on generated
activations of the requested width, so the bench does not depend on a cache of that width;
each block's encode is timed inside the same loop, giving the pass's cost as a multiple of the
encode alone (its floor). The tables are then built and written to a temporary store, and
random feature pages are read back from it, as the explorer does. With `--device cuda` the pass
(encode and accumulators) runs on the GPU, timed with a synchronize after each part; the
generated activations are drawn on the host (the same on any device) outside the timings.
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae.analyze import AnalyzeConfig, StreamStats, weight_tables
from sae.base import create
from sae.config import DictionaryConfig
from workbench.bench import median
from workbench.devices import check_device_spec, peak_memory, reset_peak_memory, resolve_device, synchronize
from workbench.errors import ConfigError
from workbench.store import FeatureStore, write_store


@dataclass(frozen=True)
class AnalyzeBenchConfig:
    """What `workbench bench analyze` times (its flags derive from it; each field is an argument of
    `run_analyze_benchmark`)."""

    n_latents: int = 16_384
    """Dictionary width."""
    d_in: int = 768
    """Activation width."""
    k: int = 32
    """Active latents per token (TopK)."""
    tokens: int = 131_072
    """Tokens in the timed pass."""
    reads: int = 50
    """Random feature pages read back."""
    threads: int = 2
    """torch threads."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N."""

    def __post_init__(self):
        check_device_spec(self.device)
        if (
            min(self.n_latents, self.d_in, self.k, self.tokens, self.reads, self.threads) < 1
            or self.k > self.n_latents
        ):
            raise ConfigError(
                "n_latents, d_in, k, tokens, reads and threads must be positive, and k at most n_latents"
            )

    @classmethod
    def upgrade_json(cls, obj: dict) -> dict:
        """A config saved before the fields were renamed (issue 18: latents, d), in today's names."""
        return {RENAMED.get(k, k): v for k, v in obj.items()}


RENAMED = {"latents": "n_latents", "d": "d_in"}
"""Old AnalyzeBenchConfig field name -> new, for configs saved before the rename. The rows keep
their "latents" and "d" keys (outputs are unchanged)."""


def run_analyze_benchmark(
    *,
    n_latents: int = 16_384,
    d_in: int = 768,
    k: int = 32,
    tokens: int = 131_072,
    context: int = 128,
    reads: int = 50,
    threads: int = 2,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Timing rows (see the module docstring) on `device`. Raises DeviceError for a device this
    machine lacks."""
    where = resolve_device(device)
    torch.set_num_threads(threads)
    reset_peak_memory(where)
    generator = torch.Generator().manual_seed(seed)
    dictionary = create(DictionaryConfig("topk", d_in, n_latents, k=k), seed=seed).to(where)
    config = AnalyzeConfig()
    block = config.block_windows * context
    n_blocks = max(1, tokens // block)
    mixing = torch.randn(d_in, d_in, generator=generator) / d_in**0.5  # correlated dimensions, as in a model
    stats = StreamStats(n_latents, d_in, context, config, where)
    encode_s = total_s = 0.0
    with torch.no_grad():
        for index in range(n_blocks):
            x = (torch.randn(block, d_in, generator=generator) @ mixing + 0.3).to(where)
            synchronize(where)
            started = time.perf_counter()
            codes = dictionary.encode(x)
            synchronize(where)
            encoded = time.perf_counter()
            stats.add(index * config.block_windows, x, codes)
            synchronize(where)
            total_s += time.perf_counter() - started
            encode_s += encoded - started
        token_windows = torch.randint(
            0, 50_000, (n_blocks * config.block_windows, context), generator=generator
        )
        started = time.perf_counter()
        tables = stats.to("cpu").tables(token_windows)
        tables.update(weight_tables(dictionary, None, config))
        finish_s = time.perf_counter() - started
    n = n_blocks * block
    rows = [
        {
            "name": "encode only (floor)",
            "device": str(where),
            "latents": n_latents,
            "d": d_in,
            "tokens": n,
            "seconds": round(encode_s, 2),
            "tokens_per_s": round(n / encode_s),
            "x_encode": 1.0,
            "projected_1M_tokens_s": round(encode_s / n * 1e6, 1),
        },
        {
            "name": "analysis pass",
            "device": str(where),
            "latents": n_latents,
            "d": d_in,
            "tokens": n,
            "seconds": round(total_s, 2),
            "tokens_per_s": round(n / total_s),
            "x_encode": round(total_s / encode_s, 3),
            "projected_1M_tokens_s": round(total_s / n * 1e6 + finish_s, 1),
        },
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "features.duckdb"
        started = time.perf_counter()
        write_store(path, {"n_latents": n_latents, "histogram_edges": stats.edges.tolist()}, tables)
        write_s = time.perf_counter() - started
        rows.append(
            {
                "name": "tables + write store",
                "latents": n_latents,
                "seconds": round(finish_s + write_s, 2),
                "store_mb": round(path.stat().st_size / 2**20, 1),
            }
        )
        rows.append(_page_latency(path, n_latents, reads, generator))
    rows[-1]["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if (peak := peak_memory(where)) is not None:
        rows[-1]["peak_gpu_mb"] = round(peak / 2**20)
    return rows


def _page_latency(path: Path, n_latents: int, reads: int, generator: torch.Generator) -> dict:
    started = time.perf_counter()
    store = FeatureStore(path)
    open_ms = (time.perf_counter() - started) * 1e3
    store.vocab  # noqa: B018 - loaded once per store, like the explorer's cached store
    times = []
    for feature in torch.randint(0, n_latents, (reads,), generator=generator).tolist():
        started = time.perf_counter()
        store.feature(feature)
        times.append((time.perf_counter() - started) * 1e3)
    started = time.perf_counter()
    store.features(limit=5000)
    table_ms = (time.perf_counter() - started) * 1e3
    store.close()
    return {
        "name": "feature page read",
        "latents": n_latents,
        "open_ms": round(open_ms, 1),
        "median_ms": round(median(times), 1),
        "p95_ms": round(float(np.percentile(times, 95)), 1),
        "table_ms": round(table_ms, 1),
    }
