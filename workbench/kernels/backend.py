"""Which implementation runs: `WORKBENCH_KERNELS` = auto (default) | eager | torch | triton.

- auto: Triton kernels for CUDA tensors when triton imports, stock torch sparse ops otherwise;
- eager: the dense twins everywhere (dense pre-activations, dense decode, dense backward), the
  reference every fused path is tested against and the "dense" row of `workbench bench kernels`;
- torch / triton: force one sparse backend (triton on CPU tensors needs TRITON_INTERPRET=1).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from types import ModuleType
from typing import Iterator, Optional

import torch

from workbench.errors import ConfigError

MODES = ("auto", "eager", "torch", "triton")


_override: Optional[str] = None


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """Run a block with one kernel mode (as WORKBENCH_KERNELS would), e.g. the eager twin."""
    global _override
    if mode not in MODES:
        raise ConfigError(f"kernel mode {mode!r} is not one of {', '.join(MODES)}")
    previous, _override = _override, mode
    try:
        yield
    finally:
        _override = previous


def kernel_mode() -> str:
    if _override is not None:
        return _override
    mode = os.environ.get("WORKBENCH_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"WORKBENCH_KERNELS={mode!r} is not one of {', '.join(MODES)}")
    return mode


def is_eager() -> bool:
    return kernel_mode() == "eager"


def sparse_ops(device: torch.device) -> ModuleType:
    """The module of sparse primitives (decode, gather_dot, scatter_rows) for tensors on `device`."""
    mode = kernel_mode()
    if mode == "triton" or (mode == "auto" and device.type == "cuda" and triton_available()):
        from workbench.kernels import triton_ops

        return triton_ops
    from workbench.kernels import torch_ops

    return torch_ops


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
