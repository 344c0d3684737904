"""Steer a running model with dictionary features: `with steer(model, [add(d, 12, 8.0)]): ...`.

Edits are applied by a hook at the dictionary's hook point on every forward pass while the
context is open, at every position, so KV-cached generation is steered on the prompt and on
every generated token (each decode step is a forward pass over the new position; tested
against full recomputation).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from torch import Tensor

from sae.base import Dictionary, DictionaryError
from sae.splice import hook_of


@dataclass(frozen=True)
class Edit:
    hook: str
    direction: Tensor
    """Added to the activation, times `strength`."""
    strength: float
    label: str = ""


def add(dictionary: Dictionary, feature: int, strength: float, hook: str | None = None) -> Edit:
    """Add `strength` times the feature's decoder direction (what the feature writes when active)."""
    if not 0 <= int(feature) < dictionary.n_latents:
        raise DictionaryError(f"feature {feature} is outside 0..{dictionary.n_latents - 1}")
    direction = dictionary.W_dec[int(feature)].detach()
    return Edit(hook_of(dictionary, hook), direction, float(strength), f"feature {int(feature)} x {strength:g}")


def add_direction(hook: str, direction: Tensor, strength: float = 1.0) -> Edit:
    """Add a raw direction at a hook."""
    return Edit(hook, direction.detach(), float(strength), "direction")


@contextlib.contextmanager
def steer(model, edits: Sequence[Edit]) -> Iterator:
    """Apply `edits` on every forward pass of `model` inside the block, at every position."""
    model.check_hooks([e.hook for e in edits])
    groups: dict[str, list[Edit]] = {}
    for edit in edits:
        groups.setdefault(edit.hook, []).append(edit)
    with model.hooks([(hook, _adder(group)) for hook, group in groups.items()]):
        yield model


def _adder(group: list[Edit]):
    def hook_fn(activation: Tensor, hook=None) -> Tensor:
        delta = sum(e.strength * e.direction.to(activation.dtype) for e in group)
        return activation + delta.view(activation.shape[2:])  # [batch, pos, ...] + the same delta everywhere

    return hook_fn


def generate_pair(model, edits: Sequence[Edit], prompt: str, max_new_tokens: int = 30, seed: int = 0,
                  do_sample: bool = True, temperature: float = 1.0) -> tuple[str, str]:
    """(baseline, steered) continuations of `prompt` with the same seed."""
    baseline = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed)
    with steer(model, edits):
        steered = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed)
    return baseline, steered
