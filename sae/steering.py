"""Steer a running model with dictionary features: `with steer(model, [add(d, 12, 8.0)]): ...`.

    add(d, f, s)       x + s·d_f                       (d_f: the feature's decoder row)
    clamp(d, f, v)     x + (v − a_f(x))·d_f            (a_f: the feature's activation on x)
    ablate(d, f)       clamp(d, f, 0)
    add_direction(hook, u, s)   x + s·u
Clamping moves only the feature's own contribution; the dictionary's error term x − x̂ and
every other latent stay as they were, so an ablated feature that was silent changes nothing.

Edits are applied by a hook at the dictionary's hook point on every forward pass while the
context is open, at every position, so KV-cached generation is steered on the prompt and on
every generated token (each decode step is a forward pass over the new position; tested
against full recomputation).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from sae.base import Dictionary, DictionaryError
from sae.splicing import hook_of


@dataclass(frozen=True)
class Edit:
    hook: str
    direction: Tensor
    """Added to the activation, times `strength` (clamps: times value − activation)."""
    strength: float
    label: str = ""
    dictionary: Dictionary | None = None
    """Set for clamps: the dictionary whose feature `feature` is held at `strength`."""
    feature: int = -1

    def delta(self, x: Tensor) -> Tensor:
        """What this edit adds to activations x [..., d]."""
        direction = self.direction.to(x.dtype)
        if self.dictionary is None:
            return self.strength * direction.expand_as(x)
        flat = x.reshape(-1, x.shape[-1])
        codes = self.dictionary.encode(flat)
        chosen = (codes.flat_indices() == self.feature).to(codes.flat_values().dtype) * codes.flat_values()
        current = chosen.new_zeros(len(flat)).index_add_(0, codes.row_ids(), chosen)
        return ((self.strength - current).unsqueeze(1) * direction).view(x.shape)


def add(dictionary: Dictionary, feature: int, strength: float, hook: str | None = None) -> Edit:
    """Add `strength` times the feature's decoder direction (what the feature writes when active)."""
    if not 0 <= int(feature) < dictionary.n_latents:
        raise DictionaryError(f"feature {feature} is outside 0..{dictionary.n_latents - 1}")
    direction = dictionary.W_dec[int(feature)].detach()
    return Edit(hook_of(dictionary, hook), direction, float(strength), f"feature {int(feature)} x {strength:g}")


def clamp(dictionary: Dictionary, feature: int, value: float, hook: str | None = None) -> Edit:
    """Hold the feature's activation at `value` at every position (its error term untouched)."""
    direction = add(dictionary, feature, 0.0, hook).direction
    return Edit(hook_of(dictionary, hook), direction, float(value), f"feature {int(feature)} = {value:g}",
                dictionary, int(feature))


def ablate(dictionary: Dictionary, feature: int, hook: str | None = None) -> Edit:
    """Remove the feature's contribution wherever it fires."""
    return clamp(dictionary, feature, 0.0, hook)


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
        x = activation.flatten(2)  # [batch, pos, d] (attention hooks: heads flattened)
        with torch.no_grad():
            delta = sum(edit.delta(x) for edit in group)  # every edit sees the unedited activation
        return (x + delta).view(activation.shape)

    return hook_fn


def generate_pair(model, edits: Sequence[Edit], prompt: str, max_new_tokens: int = 30, seed: int = 0,
                  do_sample: bool = True, temperature: float = 1.0) -> tuple[str, str]:
    """(baseline, steered) continuations of `prompt` with the same seed."""
    baseline = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed)
    with steer(model, edits):
        steered = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed)
    return baseline, steered
