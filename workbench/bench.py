"""The benchmarks' timing harness: interleaved repetitions in one process, medians, ratios.

Interleaving (A B C, A B C, ...) rather than blocking (A A A, B B B) spreads slow drifts of the
machine (thermal, page cache, other load) over every case, so ratios between cases stay honest.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

from workbench.devices import synchronize


def interleaved(
    cases: dict[str, Callable[[], object]],
    reps: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each case, `reps` rounds after `warmup` untimed rounds. The cases'
    work on `device` is waited for before the clock starts and before it stops (CUDA launches
    return before the work is done; on the CPU nothing waits)."""
    torch.set_num_threads(torch.get_num_threads())  # fixed for the whole run
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(warmup + reps):
        for name, fn in cases.items():
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def format_table(rows: list[dict]) -> str:
    """Rows of dicts with the same keys, as an aligned text table."""
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for row in rows for k in row))  # every row's keys, first-seen order
    cells = [[_cell(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)
