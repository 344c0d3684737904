"""`workbench bench cache`: what storing activations costs, and how fast the cache reads back.

Cases, interleaved in one process over the same windows: the model's full forward pass (the
reference), the forward pass up to the hook (what caching must compute), and the whole cache
writer (forward + shard serialization + sha256 + fsync + rename, I/O overlapped on a thread).
`vs_forward` = forward-only time / case time: the caching throughput as a fraction of the
model's forward-only throughput (goal >= 0.9). Reader rows stream one epoch of 4096-row batches,
sequential and shuffled, from a fresh `ActivationCache` (sha256 verification included; the
files are in the page cache, so this is the reader's CPU cost, not the disk's).

With `--device cuda` the model runs on the GPU: the forward-only and forward-to-hook cases read
windows already on the device (the model's best case), the cache writer uploads each shard's
windows itself and copies the activations out while the next shard runs (`workbench.activations`),
and every timed call ends when the device's queued work does.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.activations import CacheConfig, select_windows, write_cache
from workbench.bench import interleaved, median
from workbench.cache_reader import ActivationCache
from workbench.devices import MODEL_DTYPES, check_device_spec, check_dtype_name
from workbench.errors import ConfigError


@dataclass(frozen=True)
class CacheBenchConfig:
    """What `workbench bench cache` times (its flags derive from it)."""

    model: str = "demo"
    """The model whose default hook is cached."""
    tokens: int = 262_144
    """Tokens per timed pass (4 shards)."""
    reps: int = 5
    """Interleaved repetitions (medians reported)."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N."""
    model_dtype: str = "float32"
    """The model's forward dtype: float32, bfloat16 (the usual choice on GPUs) or float16."""

    def __post_init__(self):
        if self.tokens < 1 or self.reps < 1:
            raise ConfigError("tokens and reps must be positive")
        check_device_spec(self.device)
        check_dtype_name(self.model_dtype, MODEL_DTYPES, "model_dtype")


def run_cache_benchmark(
    model_spec: str = "demo",
    tokens: int = 262_144,
    reps: int = 5,
    device: torch.device | str = "cpu",
    model_dtype: str = "float32",
) -> list[dict]:
    """Rows: forward_only, forward_to_hook, cache_write (ms, tokens/s, vs_forward), then the
    reader's read_sequential and read_shuffled (GB/s). The model runs on `device` in `model_dtype`;
    raises DeviceError for a device this machine lacks."""
    from workbench.models import load_model

    model = load_model(model_spec, device=device, dtype=model_dtype)
    hooks = [model.default_hook]
    config = CacheConfig(model=model_spec, tokens=tokens, model_dtype=model_dtype)
    windows = select_windows(config, model)
    n_tokens = windows.numel()
    batches = windows.to(model.device).split(config.batch_size)  # the forward's best case: on the device
    root = Path(tempfile.mkdtemp(prefix="workbench-bench-cache-"))
    try:
        counter = iter(range(10**6))

        def forward_only():
            with torch.no_grad():
                for batch in batches:
                    model(batch)

        def forward_to_hook():
            for batch in batches:
                model.run_with_cache(batch, hooks)

        def write():
            write_cache(root / f"cache-{next(counter)}", config, model, hooks, windows, progress=False)

        times = interleaved(
            {"forward_only": forward_only, "forward_to_hook": forward_to_hook, "cache_write": write},
            reps,
            device=model.device,
        )
        rows = [_row(name, median(t), n_tokens, median(times["forward_only"])) for name, t in times.items()]
        rows += _reader_rows(root / "cache-0", hooks[0], reps)
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _reader_rows(folder: Path, hook: str, reps: int) -> list[dict]:
    def read(shuffle: bool):
        def run():
            for _ in ActivationCache(folder).batches(hook, 4096, shuffle=shuffle):
                pass

        return run

    times = interleaved({"read_sequential": read(False), "read_shuffled": read(True)}, reps)
    cache = ActivationCache(folder)
    n_rows = cache.n_rows - cache.manifest.n_windows  # BOS rows are skipped
    n_bytes = n_rows * cache.width(hook) * cache.dtype.itemsize
    rows = []
    for name, t in times.items():
        row = _row(name, median(t), n_rows, None)
        row["gb_per_s"] = round(n_bytes / median(t) / 1e9, 2)
        rows.append(row)
    return rows


def _row(name: str, seconds: float, n_tokens: int, reference: float | None) -> dict:
    return {
        "name": name,
        "ms": round(seconds * 1000, 1),
        "tokens_per_s": round(n_tokens / seconds),
        "vs_forward": None if reference is None else round(reference / seconds, 3),
        "gb_per_s": None,
    }
