"""Run under torchrun by tests/test_kernels.py: each rank selects on its contiguous share of a
tie-heavy batch and writes what it kept (global row ids, latents, values) to OUT/rank{r}.safetensors."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def tie_heavy_batch(n: int = 24, m: int = 10) -> torch.Tensor:
    """Rows drawn from four distinct rows with small-integer entries: many ties across rows."""
    base = torch.randint(-3, 4, (4, m), generator=torch.Generator().manual_seed(0)).double()
    return base[torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(1))]


def selections(pre: torch.Tensor, row_offset: int) -> dict[str, torch.Tensor]:
    from workbench.kernels import select

    out = {}
    for name, codes in (("batch", select.batch_top_k(pre, 3)), ("column", select.column_top_k(pre, 5))):
        out[f"{name}.rows"] = codes.row_ids() + row_offset
        out[f"{name}.latents"] = codes.flat_indices()
        out[f"{name}.values"] = codes.flat_values()
    return out


def main(out: Path) -> None:
    from workbench.distributed import finish, ranks

    where = ranks()
    pre = tie_heavy_batch().chunk(where.world)[where.rank]
    save_file(selections(pre, where.rank * pre.shape[0]), str(out / f"rank{where.rank}.safetensors"))
    finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
