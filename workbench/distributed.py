"""torchrun support: which rank this process is, and barriers that cost nothing in one process.

Under `torchrun --nproc_per_node N` (or `--nnodes`), torchrun sets RANK and WORLD_SIZE; the
first call to `ranks(device)` joins the process group with the backend of the device the ranks
compute on (NCCL on CUDA, each process on its own `cuda:LOCAL_RANK`; gloo on the CPU).
Without torchrun everything here is a no-op, so single-process code paths are unchanged.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from workbench import devices
from workbench.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Work item `index` belongs to this rank (round robin)."""
        return index % self.world == self.rank


def ranks(device: Optional[torch.device | str] = None) -> Ranks:
    """This process's rank and the world size, joining the process group on the first call under
    torchrun. `device`: where this rank computes (a resolved device, e.g. `cuda:LOCAL_RANK`):
    it becomes the current CUDA device and picks the backend (`devices.distributed_backend`);
    None means the CPU (gloo). Later calls return the joined group's ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        where = torch.device(device if device is not None else "cpu")
        devices.activate(where)
        dist.init_process_group(devices.distributed_backend(where))
    return Ranks(dist.get_rank(), dist.get_world_size())


def check_rank_devices(spec: str, nproc: int) -> torch.device:
    """The device `spec` names here, refusing in one line (ConfigError) `nproc` > 1 ranks that
    could not each compute on a GPU of their own (one named GPU, or fewer GPUs than ranks)."""
    device = devices.resolve_device(spec)
    if nproc <= 1 or not devices.is_cuda(device):
        return device
    if ":" in spec:
        raise ConfigError(f"--device {spec} names one GPU and {nproc} ranks need one each; use --device cuda")
    if nproc > devices.cuda_count():
        raise ConfigError(
            f"--nproc {nproc} needs {nproc} CUDA devices and this machine has {devices.cuda_count()}; "
            "lower --nproc or use --device cpu"
        )
    return device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish() -> None:
    """Leave the process group (every rank, at the end), so no rank hangs at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


_ALONE = [0]  # depth of `alone()` blocks


@contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process acts as if it ran by itself (world_size() 1, rank 0): for
    work one rank does alone, such as calibrating a dictionary before rank 0 saves it (a global
    selection there would wait forever for the other ranks)."""
    _ALONE[0] += 1
    try:
        yield
    finally:
        _ALONE[0] -= 1


def world_size() -> int:
    if _ALONE[0]:
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_index() -> int:
    """This process's rank (0 without torchrun, and inside `alone()`)."""
    if _ALONE[0]:
        return 0
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(tensor):
    """The sum of `tensor` over the ranks (a new tensor; `tensor` itself is left alone)."""
    out = tensor.clone()
    if world_size() > 1:
        dist.all_reduce(out)
    return out


def mean_over_ranks(tensor):
    """The mean of `tensor` over the ranks; `tensor` itself in one process."""
    world = world_size()
    return tensor if world == 1 else all_reduce_sum(tensor) / world


def min_over_ranks(tensor):
    """The minimum of `tensor` over the ranks; `tensor` itself in one process."""
    if world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


def gather_rows(tensor):
    """Every rank's `tensor` stacked along dim 0 in rank order (the whole batch, when each rank
    holds its contiguous share); `tensor` itself in one process. Ranks pass equal shapes."""
    world = world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
