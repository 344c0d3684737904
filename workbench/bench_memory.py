"""How the benchmarks measure a call's peak memory: on the CPU from the process RSS, on a GPU
from the CUDA allocator (`workbench.devices`)."""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from typing import Callable

import torch

from workbench.devices import allocated_memory, peak_memory, reset_peak_memory, synchronize


def peak_device_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Growth of the CUDA allocator's peak over one call (the memory allocated before it excluded)."""
    gc.collect()
    synchronize(device)
    base = allocated_memory(device) or 0
    reset_peak_memory(device)
    fn()
    synchronize(device)
    return max(0, (peak_memory(device) or 0) - base)


def peak_host_bytes(fn: Callable[[], None]) -> int:
    """Peak RSS growth over one call (sampled every 0.5 ms), with big allocations mmap'd."""
    with _mmap_allocations():
        gc.collect()
        base = _rss()
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            fn()
        finally:
            done.set()
            sampler.join()
        return max(0, max(peak[0], _rss()) - base)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


_PAGE = 4096
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


class _mmap_allocations:
    """glibc: serve allocations >= 1 MB by mmap while measuring, so frees shrink the RSS."""

    def __enter__(self):
        self.libc = _libc()
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
            self.libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20)
        return self

    def __exit__(self, *exc):
        # glibc cannot report the previous settings: restore its defaults as fixed values (the
        # dynamic mmap threshold stays off for the rest of this process).
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            self.libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
