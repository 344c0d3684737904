"""Where steering edits apply: the `positions` choices of `sae.steer` and of each edit.

"all", "prompt", "generated", or a bool mask over absolute positions ([P] or [batch, P]); a
list of absolute positions is the mask that holds them. A pass over more than one token starts a
sequence (the prompt), a one-token pass continues it (a KV-cached decode step), so the absolute
position of every row is known at each hook.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from sae.base import DictionaryError

POSITIONS = ("all", "prompt", "generated")


def as_positions(positions: str | Tensor | Sequence[int] | None) -> str | Tensor | None:
    """`positions` as steer reads them: None, a name, or a bool mask; a list of absolute positions
    becomes the bool mask that holds them. Raises DictionaryError for anything else."""
    if positions is None or isinstance(positions, (str, Tensor)):
        check_positions(positions)
        return positions
    try:
        where = [int(p) for p in positions]
    except (TypeError, ValueError):
        raise DictionaryError(
            f"positions must be a name, a bool mask or a list of positions, not {positions!r}"
        ) from None
    if not where or min(where) < 0 or any(float(p) != int(p) for p in positions):
        raise DictionaryError(f"positions must be non-negative token positions, not {list(positions)!r}")
    mask = torch.zeros(max(where) + 1, dtype=torch.bool)
    mask[where] = True
    return mask


def check_positions(positions) -> None:
    """Raise DictionaryError for a name other than POSITIONS or a mask that is not bool [P] or
    [batch, P] (None, the block's choice, passes)."""
    if isinstance(positions, str) and positions not in POSITIONS:
        raise DictionaryError(
            f"positions must be one of {', '.join(POSITIONS)} or a bool mask, not {positions!r}"
        )
    if isinstance(positions, Tensor) and (positions.dtype != torch.bool or positions.dim() not in (1, 2)):
        raise DictionaryError(
            f"a positions mask must be bool [P] or [batch, P], got {positions.dtype} {tuple(positions.shape)}"
        )


def position_label(positions) -> str:
    """ " at [7]", " at prompt", " at 12 positions" for an edit's label ("" for None)."""
    if positions is None:
        return ""
    if isinstance(positions, str):
        return f" at {positions}"
    where = positions.nonzero()[:, -1].unique().tolist()
    return f" at {where}" if len(where) <= 6 else f" at {len(where)} positions"


class Positions:
    """Absolute positions of each pass at one hook: a multi-token pass starts a sequence, a
    one-token pass continues it (KV-cached decoding)."""

    def __init__(self):
        self.prompt_length, self.start, self.next = 0, 0, 0

    def step(self, length: int) -> None:
        """A pass of `length` positions arrived at the hook."""
        if length > 1 or self.next == 0:
            self.prompt_length, self.start = length, 0
        else:
            self.start = self.next
        self.next = self.start + length

    def mask(self, spec, batch: int, length: int, device: torch.device) -> Tensor | None:
        """[batch, length] bool of the positions of this pass that `spec` edits (on `device`), or
        None for all of them."""
        if isinstance(spec, str) and spec == "all":
            return None
        absolute = torch.arange(self.start, self.start + length)
        if isinstance(spec, str):
            keep = absolute < self.prompt_length if spec == "prompt" else absolute >= self.prompt_length
            return keep.expand(batch, length).to(device)
        if spec.dim() == 2 and spec.shape[0] not in (1, batch):
            raise DictionaryError(f"a positions mask of {spec.shape[0]} rows cannot steer a batch of {batch}")
        spec = spec.cpu()  # built on the host (a few bools), then moved
        mask = spec if spec.dim() == 2 else spec.expand(batch, -1)
        inside = absolute < mask.shape[1]
        out = torch.zeros(mask.shape[0], length, dtype=torch.bool)
        out[:, inside] = mask[:, absolute[inside]]
        return out.expand(batch, length).to(device)
