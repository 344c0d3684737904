"""One shard of an activation cache, computed on the CPU or on a GPU, and the thread that writes
shards while the next is computed (used by `workbench.activations`).

On a GPU, each batch's activations are cast to the storage dtype on the device and copied into
pinned host memory with non_blocking=True; nothing waits for the device until `Shard.finish`,
which the writer loop calls only after the next shard's forward passes are queued.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from workbench.devices import pin, pinned_empty, record_event, wait_event
from workbench.errors import CacheError
from workbench.files import first_non_finite_row


class Shard:
    """One shard's activations {hook: [rows, d]} on the host: computed (CPU), or still being copied
    out of the GPU until `event` (then `finite` holds, per batch and hook, whether all were finite)."""

    def __init__(self, acts: dict[str, torch.Tensor], context: int, finite=None, event=None):
        self.acts, self.context, self.finite, self.event = acts, context, finite, event
        self.n_tokens = next(iter(acts.values())).shape[0]

    def finish(self, first_window: int) -> dict[str, torch.Tensor]:
        """The activations once copied; CacheError at the first row holding a NaN/Inf."""
        wait_event(self.event)
        if self.finite is not None and bool(self.finite.all()):
            return self.acts
        for hook, x in self.acts.items():
            bad = first_non_finite_row(x)
            if bad is not None:
                row = bad + first_window * self.context
                raise CacheError(
                    f"non-finite activation (NaN/Inf) at hook {hook}, window {row // self.context}, "
                    f"position {row % self.context}; try --dtype float32"
                )
        return self.acts


def forward_shard(model, hooks, windows, batch_size, dtype) -> Shard:
    """The CPU path: the shard's batches in turn, concatenated per hook."""
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for start in range(0, len(windows), batch_size):
        captured = model.run_with_cache(windows[start : start + batch_size], hooks)
        for hook in hooks:
            parts[hook].append(captured[hook].reshape(-1, captured[hook].shape[-1]).to(dtype))
    return Shard({hook: torch.cat(chunks) for hook, chunks in parts.items()}, windows.shape[1])


def forward_shard_on_device(model, hooks, windows, batch_size, dtype) -> Shard:
    """The GPU path: queue the shard's forward passes, each batch's activations cast on the device
    and copied into one pinned host tensor per hook with non_blocking=True; returns at once (nothing
    here waits for the device), with an event after the last copy."""
    device = model.device
    tokens = pin(windows).to(device, non_blocking=True)  # one upload, not a blocking one per batch
    host: dict[str, torch.Tensor] = {}
    finite: list[torch.Tensor] = []
    row = 0
    for start in range(0, len(windows), batch_size):
        captured = model.run_with_cache(tokens[start : start + batch_size], hooks)
        for hook in hooks:
            x = captured[hook].reshape(-1, captured[hook].shape[-1]).to(dtype)
            if hook not in host:
                host[hook] = pinned_empty((windows.numel(), x.shape[1]), dtype)
            host[hook][row : row + len(x)].copy_(x, non_blocking=True)
            finite.append(torch.isfinite(x).all())
        row += len(x)
    flags = pinned_empty((len(finite),), torch.bool)
    flags.copy_(torch.stack(finite), non_blocking=True)
    return Shard({hook: host[hook] for hook in hooks}, windows.shape[1], flags, record_event(device))


class BackgroundWriter:
    """Runs write jobs on `threads` threads so the next forward pass overlaps the previous shards'
    I/O (one on the CPU; several behind a GPU, whose forward can outrun one thread's hashing and
    fsync: jobs may then finish out of order, and what they share is updated under `lock`).

    At most one job waits in the queue (bounded memory); the first error is re-raised on exit.
    """

    def __init__(self, threads: int = 1):
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.lock = threading.Lock()

    def __enter__(self) -> "BackgroundWriter":
        for thread in self._threads:
            thread.start()
        return self

    def submit(self, job: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # surfaced in the main thread
                    self._error = exc

    def __exit__(self, *exc) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error
