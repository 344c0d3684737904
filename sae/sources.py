"""Where training batches come from: an activation cache (or, for benchmarks, a generator).

A source yields epochs of [batch, d_in] float tensors whose order depends only on (seed, epoch),
so a resumed run can replay an epoch up to where it stopped. `Prefetcher` carries the batches to
the training device: on CUDA a thread reads the next batches (shards, shuffles) and pins them
while the GPU steps, and the copies are non-blocking; `FeedClock` measures how long the loop
still waits for them.
"""

from __future__ import annotations

import inspect
import itertools
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import torch
from torch import Tensor

from workbench import devices, seeding
from workbench.cache_reader import ActivationCache
from workbench.errors import CacheError


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

    def epoch(self, epoch: int, batch_size: int, stored: bool = False) -> Iterator[Tensor]:
        """Shuffled [batch_size, d_in] float32 batches; `stored`: in the cache's own dtype (half
        the bytes to pin and copy for a 16-bit cache; the trainer converts them on its device)."""
        batches = self.cache.batches(
            self.hook, batch_size, seed=self.seed, epoch=epoch, drop_last=True, read_ahead=True
        )
        for batch in batches:
            yield batch.activations if stored else batch.activations.float()

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


class PairedCacheSource(CacheSource):
    """A transcoder's training rows: each row is [x, y], the in-hook's activation (d_in) and the
    out-hook's (d_out) at the same token, concatenated to [batch, d_in + d_out] so the trainer's
    order, checkpoints, prefetching and data-parallel shares work on them as on an SAE's rows
    (`split` separates them). Both hooks come from one cache written in one pass; their shards
    hold the same rows, and both are read in the same seeded order (`cache.batches` with the
    same seed and epoch), so BOS rows are skipped alike and the global row indices of every
    batch are checked to agree."""

    def __init__(self, cache: ActivationCache, hook: str, out_hook: str, seed: int = 0):
        super().__init__(cache, hook, seed)
        cache.expect(hook=out_hook)
        if out_hook == hook:
            raise CacheError(f"a transcoder's --out-hook must differ from its --hook ({hook})")
        if cache.shard_rows(hook) != cache.shard_rows(out_hook):
            raise CacheError(
                f"{cache.path}: hooks {hook} and {out_hook} are sharded differently; "
                "cache both in one `workbench cache --hook A --hook B` run"
            )
        self.out_hook = out_hook
        self.d_out = cache.width(out_hook)

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(x [N, d_in], y [N, d_out]) of concatenated rows."""
        return rows[:, : self.d_in], rows[:, self.d_in :]

    def _paired(self, hook_batches: Iterator, out_batches: Iterator, stored: bool) -> Iterator[Tensor]:
        for a, b in zip(hook_batches, out_batches, strict=True):
            if not torch.equal(a.rows, b.rows):
                raise CacheError(f"{self.cache.path}: rows of {self.hook} and {self.out_hook} disagree")
            x, y = a.activations, b.activations
            yield torch.cat([x, y], dim=1) if stored else torch.cat([x.float(), y.float()], dim=1)

    def epoch(self, epoch: int, batch_size: int, stored: bool = False) -> Iterator[Tensor]:
        """Shuffled [batch_size, d_in + d_out] batches (see the class docstring)."""
        read = lambda hook: self.cache.batches(  # noqa: E731
            hook, batch_size, seed=self.seed, epoch=epoch, drop_last=True, read_ahead=True
        )
        return self._paired(read(self.hook), read(self.out_hook), stored)

    def sample(self, n: int, stream: str = "init") -> Tensor:
        """n [x, y] rows drawn independently of the training order (each `stream` its own draw)."""
        n = min(n, self.rows_per_epoch)
        seed = (
            self.seed + 7919
            if stream == "init"
            else seeding.stream_seed(self.seed, "sample", stream) % (1 << 40)
        )
        read = lambda hook: self.cache.batches(hook, n, seed=seed, buffer_rows=n)  # noqa: E731
        return next(self._paired(read(self.hook), read(self.out_hook), stored=False))

    def describe(self) -> dict:
        return {**super().describe(), "out_hook": self.out_hook}


def training_order(
    source: BatchSource, batch_size: int, epoch: int = 0, skip: int = 0
) -> Iterator[tuple[int, int, Tensor]]:
    """(epoch, index in its epoch, batch [batch_size, d_in]) from batch `skip` of `epoch` on,
    epoch after epoch: the order a run never interrupted reads. Batches come in the source's
    stored dtype where it has one (`CacheSource.epoch(stored=True)`): callers convert with `.float()`."""
    reader: Any = source  # BatchSource.epoch need not take `stored`
    stored = "stored" in inspect.signature(source.epoch).parameters
    while True:
        count = skip
        batches = reader.epoch(epoch, batch_size, stored=True) if stored else source.epoch(epoch, batch_size)
        for index, batch in enumerate(itertools.islice(batches, skip, None), skip):
            count = index + 1
            yield epoch, index, batch
        if count == 0:
            raise CacheError(f"epoch {epoch} of the training data holds no batch of {batch_size} rows")
        epoch, skip = epoch + 1, 0


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


def open_cache_source(cache: str = "", hook: str = "", seed: int = 0, out_hook: str = "") -> CacheSource:
    """The cache folder (default: the default cache, built first if absent) as a source; with
    `out_hook`, a transcoder's paired source (`PairedCacheSource`)."""
    from pathlib import Path

    from workbench.activations import CacheConfig, build_cache

    folder = Path(cache) if cache else CacheConfig().output_dir()
    if not cache and not (folder / "manifest.json").exists():
        build_cache(CacheConfig())
    opened = ActivationCache(folder)
    if out_hook:
        return PairedCacheSource(opened, hook or opened.hooks[0], out_hook, seed=seed)
    return CacheSource(opened, hook or opened.hooks[0], seed=seed)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def _each_tensor(item: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`item` (a tensor, or a tuple of tensors and other values) with fn applied to its tensors."""
    if isinstance(item, Tensor):
        return fn(item)
    if isinstance(item, tuple):
        return tuple(_each_tensor(part, fn) for part in item)
    return item


class Prefetcher:
    """The items of `items` (tensors, or tuples holding tensors), in their order, with their
    tensors on `device`. With `depth` > 0 a thread runs `items` (and `transform`) up to `depth`
    items ahead and pins their tensors (CUDA), and the copies to the device are non-blocking;
    `depth` 0 is the plain loop in the calling thread.

    An exception raised by `items` is raised by `next()` here, after the tensors before it.
    `close()` (or leaving the `with` block, or the loop's end) stops the thread and closes
    `items`; nothing is left running."""

    def __init__(
        self,
        items: Iterable[Any],
        device: torch.device | str,
        depth: int = 0,
        transform: Optional[Callable[[Any], Any]] = None,
    ):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.device, self.depth = torch.device(device), depth
        self._items, self._transform = iter(items), transform or (lambda t: t)
        self._pin = depth > 0 and devices.is_cuda(self.device)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._done = False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if self.depth == 0:
            try:
                item = self._transform(next(self._items))
            except StopIteration:
                self._done = True
                raise
            return _each_tensor(item, lambda t: t.to(self.device))
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if item is _END or isinstance(item, _Failed):
            self.close()
            if isinstance(item, _Failed):
                raise item.error
            raise StopIteration
        return _each_tensor(item, lambda t: t.to(self.device, non_blocking=True))

    def _produce(self) -> None:
        try:
            for item in self._items:
                item = self._transform(item)
                if not self._put(_each_tensor(item, devices.pin) if self._pin else item):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failed(error))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def _put(self, item: Any) -> bool:
        """Queue `item` unless the consumer stopped; False once it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        """Stop the thread (waiting for the item it is reading) and close the items."""
        self._done = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # it closes the items
        else:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()  # an abandoned prefetcher's thread ends at its next put


class FeedClock:
    """Seconds the training loop spent blocked waiting for batches (`waiting` around `next()`)
    against its wall time, and tokens per second: over the whole run (`totals`) and since the
    previous `lap`. Host time: on CUDA the steps' own waits for the GPU count as step time."""

    def __init__(self):
        self.start = self.lap_start = time.perf_counter()
        self.wait = self.lap_wait = 0.0
        self.tokens = self.lap_tokens = 0

    def waiting(self, feed: Iterator[Any]) -> Any:
        """next(feed), timed as waiting for data."""
        began = time.perf_counter()
        try:
            return next(feed)
        finally:
            spent = time.perf_counter() - began
            self.wait += spent
            self.lap_wait += spent

    def count(self, tokens: int) -> None:
        self.tokens += tokens
        self.lap_tokens += tokens

    def lap(self) -> dict[str, float]:
        """tokens_per_s and data_wait_fraction since the previous lap (or the start)."""
        now = time.perf_counter()
        out = _rates(self.lap_tokens, self.lap_wait, now - self.lap_start)
        self.lap_start, self.lap_wait, self.lap_tokens = now, 0.0, 0
        return out

    def totals(self) -> dict[str, float]:
        """tokens_per_s and data_wait_fraction over every step this clock timed ({} for none)."""
        if not self.tokens:
            return {}
        return _rates(self.tokens, self.wait, time.perf_counter() - self.start)


TIMING = ("tokens_per_s", "data_wait_fraction")
"""The keys `FeedClock` adds to log records and final metrics (they vary from run to run)."""


def _rates(tokens: int, wait: float, seconds: float) -> dict[str, float]:
    seconds = max(seconds, 1e-9)
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "data_wait_fraction": round(min(1.0, wait / seconds), 4),
    }
