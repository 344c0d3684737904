"""One random stream per purpose: `generator(seed, *salt)`.

Every random draw in the workbench takes an explicit `torch.Generator` seeded from the run's
seed and a salt naming what it is for ("init", an architecture name, "resample", ...). The
global RNG is never read or reset, so two parts of the program, or our code and a peer's, never
draw the same stream by accident: a dictionary initialised with `torch.manual_seed(0);
torch.randn(m, d)` would start on the answer of any benchmark whose features were drawn that way.
"""

from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, *salt: object) -> int:
    """A 63-bit seed mixing `seed` with `salt` (sha256 of their repr: stable across runs and machines)."""
    digest = hashlib.sha256(repr((int(seed), *salt)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *salt: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh `torch.Generator` on `device` for the stream (seed, *salt)."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, *salt))
