"""The one module that asks the hardware what it has; everything else reads devices off tensors.

    device = resolve_device(config.device)     # "auto" | "cpu" | "cuda" | "cuda:N" -> torch.device
    dtype = model_dtype(config.model_dtype)    # "float32" | "bfloat16" | "float16" -> torch.dtype

`auto` is the first usable CUDA device (this rank's, `cuda:LOCAL_RANK`, under torchrun), else the
CPU. A config records the string the user gave (so `--config` reruns with the same choice); the
code below a command takes its device from its inputs (`x.device`, `dictionary.W_dec.device`,
`model.device`). A test fails if any other module of the project reads `torch.cuda`.
"""

from __future__ import annotations

import os
import re

import torch

from workbench.errors import ConfigError

DEVICE_HELP = "auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MATMUL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class DeviceError(ConfigError):
    """A device the user asked for that this machine does not have."""


def check_device_spec(spec: str, what: str = "device") -> None:
    """Refuse a spelling that can never name a device (before anything probes the hardware)."""
    if not isinstance(spec, str) or not _SPEC.match(spec.strip().lower()):
        raise ConfigError(f"{what} {spec!r} is not one of {DEVICE_HELP}")


def check_dtype_name(name: str, allowed: dict, what: str) -> None:
    if name not in allowed:
        raise ConfigError(f"{what} {name!r} is not one of {', '.join(allowed)}")


def model_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--model-dtype` name."""
    check_dtype_name(name, MODEL_DTYPES, "model dtype")
    return MODEL_DTYPES[name]


def matmul_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `--matmul-dtype` name."""
    check_dtype_name(name, MATMUL_DTYPES, "matmul dtype")
    return MATMUL_DTYPES[name]


def cuda_count() -> int:
    """How many CUDA devices this process can use (0 on a CPU build, without a driver, or when
    CUDA_VISIBLE_DEVICES hides them all)."""
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except (RuntimeError, AssertionError):  # a broken driver reads as no GPU, not a traceback
        return 0


def local_rank() -> int:
    """This process's index on its machine under torchrun (LOCAL_RANK), else 0."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch.device a `--device` value names on this machine.

    `auto`: `cuda:LOCAL_RANK` when a CUDA device is usable, else `cpu`. `cuda` is this rank's
    GPU (cuda:0 without torchrun). Raises DeviceError (one line) for a CUDA device this machine
    cannot use, ConfigError for a spelling that names no device."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    check_device_spec(spec)
    spec = spec.strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    count = cuda_count()
    if spec == "auto":
        return torch.device("cuda", local_rank() % count) if count else torch.device("cpu")
    index = int(spec.partition(":")[2] or local_rank())
    if count == 0:
        raise DeviceError(f"--device {spec}: no usable CUDA device here ({_why_no_cuda()}); use --device cpu")
    if index >= count:
        raise DeviceError(
            f"--device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "CUDA_VISIBLE_DEVICES is empty"
    return "no GPU or driver found"


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def activate(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (NCCL and Triton launch on it); no-op on CPU."""
    if is_cuda(device):
        torch.cuda.set_device(device)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on `device` (timings of CUDA work need it); no-op on CPU."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device | str) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> int | None:
    """Bytes of device memory allocated at the peak since the last reset; None on the CPU."""
    return int(torch.cuda.max_memory_allocated(device)) if is_cuda(device) else None


def allocated_memory(device: torch.device | str) -> int | None:
    """Bytes of device memory allocated now (the base of a peak's growth); None on the CPU."""
    return int(torch.cuda.memory_allocated(device)) if is_cuda(device) else None


def record_event(device: torch.device | str):
    """A marker after the work queued so far on `device`'s current stream, for `wait_event`
    (None on the CPU, whose work is done when queued): a copy to pinned host memory started with
    non_blocking=True may be read once its event is waited for, while later work keeps running."""
    if not is_cuda(device):
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def wait_event(event) -> None:
    """Block until the work queued before `event` (from `record_event`) is done; no-op for None."""
    if event is not None:
        event.synchronize()


def pin(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in page-locked host memory, so a non-blocking copy to a GPU overlaps compute
    (the tensor itself when no CUDA device is usable: pinning needs the driver)."""
    return tensor.pin_memory() if cuda_count() and not tensor.is_pinned() else tensor


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor in page-locked memory (plain memory when no CUDA device is
    usable), the destination of non-blocking copies out of a GPU."""
    return torch.empty(shape, dtype=dtype, pin_memory=bool(cuda_count()))


def describe(device: torch.device) -> str:
    """The device in words for benchmark headers: 'cpu' or 'cuda:0 (NVIDIA H200)'."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if is_cuda(device) else str(device)


def distributed_backend(device: torch.device) -> str:
    """torch.distributed's backend for ranks computing on `device`: NCCL on CUDA, gloo on CPU."""
    return "nccl" if is_cuda(device) else "gloo"
