"""Where training batches come from: an activation cache (or, for benchmarks, a generator).

A source yields epochs of [batch, d_in] float tensors whose order depends only on (seed, epoch),
so a resumed run can replay an epoch up to where it stopped.
"""

from __future__ import annotations

import inspect
from typing import Iterator, Protocol

from torch import Tensor

from workbench import seeding
from workbench.cache_reader import ActivationCache


class BatchSource(Protocol):
    d_in: int
    """Width of a row (the d_in of the dictionaries trained on it)."""
    rows_per_epoch: int

    def epoch(self, epoch: int, batch_size: int) -> Iterator[Tensor]: ...

    def sample(self, n: int, stream: str = "init") -> Tensor: ...

    """n rows drawn apart from the training order; each `stream` ("init", "calibrate", ...) its own draw."""

    def describe(self) -> dict: ...


class CacheSource:
    """Shuffled minibatches of one hook of a cache; BOS rows are skipped (they are outliers
    a dictionary should not spend latents on, and the evals splice only non-BOS positions), and
    in caches made with --from the rows held out for evaluation."""

    def __init__(self, cache: ActivationCache, hook: str, seed: int = 0):
        cache.expect(hook=hook)
        self.cache, self.hook, self.seed = cache, hook, seed
        self.d_in = cache.width(hook)
        self.rows_per_epoch = cache.training_rows

    def epoch(self, epoch: int, batch_size: int) -> Iterator[Tensor]:
        for batch in self.cache.batches(self.hook, batch_size, seed=self.seed, epoch=epoch, drop_last=True):
            yield batch.activations.float()

    def sample(self, n: int, stream: str = "init") -> Tensor:
        """n rows (fewer if the cache is smaller) drawn independently of the training order;
        each `stream` is its own draw."""
        n = min(n, self.rows_per_epoch)
        seed = (
            self.seed + 7919
            if stream == "init"
            else seeding.stream_seed(self.seed, "sample", stream) % (1 << 40)
        )
        return next(iter(self.cache.batches(self.hook, n, seed=seed, buffer_rows=n))).activations.float()

    def describe(self) -> dict:
        config = self.cache.manifest.config
        return {
            "cache": str(self.cache.path),
            "hook": self.hook,
            "model": self.cache.model,
            "corpus": config.get("corpus", ""),
            "context_length": self.cache.context_length,
        }


def draw(source: BatchSource, n: int, stream: str) -> Tensor:
    """source.sample(n, stream), or source.sample(n) for a source that has one stream only."""
    if "stream" in inspect.signature(source.sample).parameters:
        return source.sample(n, stream=stream)
    return source.sample(n)


def mean_norm(sample: Tensor) -> float:
    return float(sample.norm(dim=1).mean())


def input_scale(sample: Tensor) -> float:
    """The factor that makes E|x| = sqrt(d) (so one set of hyper-parameters fits every hook)."""
    norm = mean_norm(sample)
    return sample.shape[1] ** 0.5 / norm if norm > 0 else 1.0


def open_cache_source(cache: str = "", hook: str = "", seed: int = 0) -> CacheSource:
    """The cache folder (default: the default cache, built first if absent) as a source."""
    from pathlib import Path

    from workbench.activations import CacheConfig, build_cache

    folder = Path(cache) if cache else CacheConfig().output_dir()
    if not cache and not (folder / "manifest.json").exists():
        build_cache(CacheConfig())
    opened = ActivationCache(folder)
    return CacheSource(opened, hook or opened.hooks[0], seed=seed)
