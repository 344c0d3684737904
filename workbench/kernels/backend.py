"""Which implementation runs: `WORKBENCH_KERNELS` = auto (default) | eager | torch | triton.

- auto: Triton kernels for CUDA tensors when triton imports, stock torch sparse ops otherwise;
- eager: the dense twins everywhere (dense pre-activations, dense decode, dense backward), the
  reference every fused path is tested against and the "dense" row of `workbench bench kernels`;
- torch / triton: force one sparse backend (triton on CPU tensors needs TRITON_INTERPRET=1).

`use_matmul_dtype(torch.bfloat16)` runs the encoders' dense pre-activation matmul, the one that
only chooses entries, in bf16 (`workbench train --matmul-dtype bfloat16`); the chosen entries'
values and every gradient stay exact fp32 (`workbench.kernels.encode`).
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


_selection_dtype: Optional[torch.dtype] = None


@contextlib.contextmanager
def use_matmul_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Run a block with the encoders' selection matmul in `dtype` (float32: as outside the block;
    bfloat16: bf16 inputs, fp32 accumulation, bf16 scores). Only which entries are selected can
    change: their values and gradients are recomputed in the inputs' own dtype. Raises ConfigError
    for another dtype."""
    global _selection_dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"matmul dtype {dtype} is not one of float32, bfloat16")
    previous, _selection_dtype = _selection_dtype, None if dtype == torch.float32 else dtype
    try:
        yield
    finally:
        _selection_dtype = previous


def selection_dtype() -> Optional[torch.dtype]:
    """The dtype `use_matmul_dtype` asked the selection matmul to run in; None for the inputs' own."""
    return _selection_dtype


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
