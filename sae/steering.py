"""Steer a running model with dictionary features: `with steer(model, [add(d, 12, 8.0)]): ...`.

    add(d, f, s)       x + s·d_f                       (d_f: the feature's decoder row)
    clamp(d, f, v)     x + (v − a_f(x))·d_f            (a_f: the feature's activation on x)
    ablate(d, f)       clamp(d, f, 0)
    code_on(cb, c)     clamp(cb, c, w)   code_off(cb, c)   clamp(cb, c, 0)
                       (a codebook's code c; w its weight when chosen: 1, or 1/k for mean codebooks)
    add_direction(hook, u, s)   x + s·u
Clamping moves only the feature's own contribution; the dictionary's error term x − x̂ and
every other latent stay as they were, so an ablated feature that was silent changes nothing.

Edits are applied by a hook at the dictionary's hook point on every forward pass while the
context is open, so KV-cached generation is steered on the prompt and on every generated token
(each decode step is a forward pass over the new position; tested against full recomputation).
`positions` chooses where: "all", "prompt", "generated", or a bool mask over absolute positions
([P] or [batch, P]). A pass over more than one token starts a sequence (the prompt); a one-token
pass inside the block continues it (a decode step). The object the block yields reports what
was edited (`str(report)`, `report.positions_edited`), so a steer that silently did nothing
shows as 0 positions.

`steer` (and `sweep`) check every edit before any pass (`check_edits`): the hook fires and holds
per-token activations, the direction's width is the hook's, the feature is one of the
dictionary's, strength and direction are finite, and the dictionary was trained at that hook of
that model; a failed check is a one-line error and leaves nothing attached.

Edits run where the model is: `steer` places each edit's direction on `model.device` and runs a
clamp's dictionary there (a copy when it is elsewhere, made once per block; the caller's edits
and dictionaries are untouched, `sae.splicing.on_device`). A bfloat16/float16 model's
activations are encoded in the dictionary's dtype and the edit is added in the activation's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from sae.base import Dictionary, DictionaryError
from sae.splicing import check_trained_at, hook_of, on_device


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
    source: Dictionary | None = None
    """The dictionary whose feature `feature` the direction is (checked against the model by `steer`)."""

    def delta(self, x: Tensor) -> Tensor:
        """What this edit adds to activations x [..., d], in x's dtype (direction and dictionary
        on x's device: `steer` puts them there)."""
        if self.dictionary is None:
            return self.strength * self.direction.to(x.dtype).expand_as(x)
        flat = x.reshape(-1, x.shape[-1])
        codes = self.dictionary.encode(flat)  # in the dictionary's dtype
        chosen = (codes.flat_indices() == self.feature).to(codes.flat_values().dtype) * codes.flat_values()
        current = chosen.new_zeros(len(flat)).index_add_(0, codes.row_ids(), chosen)
        direction = self.direction.to(current.dtype)
        return ((self.strength - current).unsqueeze(1) * direction).view(x.shape).to(x.dtype)


def add(dictionary: Dictionary, feature: int, strength: float, hook: str | None = None) -> Edit:
    """Add `strength` times the feature's decoder direction W_dec[feature] [d_in] (what the feature
    writes when active) at `hook` (default: the dictionary's). Raises DictionaryError for a feature
    outside 0..n_latents-1 or a dictionary that records no hook; `steer` checks the rest."""
    if not 0 <= int(feature) < dictionary.n_latents:
        raise DictionaryError(f"feature {feature} is outside 0..{dictionary.n_latents - 1}")
    direction = dictionary.W_dec[int(feature)].detach()
    return Edit(
        hook_of(dictionary, hook),
        direction,
        float(strength),
        f"feature {int(feature)} x {strength:g}",
        feature=int(feature),
        source=dictionary,
    )


def clamp(dictionary: Dictionary, feature: int, value: float, hook: str | None = None) -> Edit:
    """Hold the feature's activation at `value` at every position (its error term untouched)."""
    return dataclasses.replace(
        add(dictionary, feature, 0.0, hook),
        strength=float(value),
        label=f"feature {int(feature)} = {value:g}",
        dictionary=dictionary,
    )


def ablate(dictionary: Dictionary, feature: int, hook: str | None = None) -> Edit:
    """Remove the feature's contribution wherever it fires."""
    return clamp(dictionary, feature, 0.0, hook)


def add_direction(hook: str, direction: Tensor, strength: float = 1.0) -> Edit:
    """Add `strength` times `direction` [d] at `hook` (d: the hook's width, heads flattened);
    `steer` refuses, in one line, a direction of another shape or with NaN/inf entries."""
    return Edit(hook, direction.detach(), float(strength), "direction")


def code_on(codebook: Dictionary, code: int, hook: str | None = None) -> Edit:
    """Make codebook code `code` active (weight 1, or 1/k for a mean codebook) at every position."""
    _need_codebook(codebook)
    weight = 1.0 / codebook.config.k if codebook.config.aggregate == "mean" else 1.0
    return dataclasses.replace(clamp(codebook, code, weight, hook), label=f"code {int(code)} on")


def code_off(codebook: Dictionary, code: int, hook: str | None = None) -> Edit:
    """Remove codebook code `code` wherever it is chosen."""
    _need_codebook(codebook)
    return dataclasses.replace(clamp(codebook, code, 0.0, hook), label=f"code {int(code)} off")


def _need_codebook(dictionary: Dictionary) -> None:
    if dictionary.architecture != "codebook":
        raise DictionaryError(
            f"code_on/code_off take a codebook, not a {dictionary.architecture!r} dictionary; use clamp"
        )


POSITIONS = ("all", "prompt", "generated")


class SteeringReport:
    """What a `steer` block did: forward passes seen and positions edited, per hook."""

    def __init__(self, edits: Sequence[Edit], positions):
        self.edits, self.positions = list(edits), positions
        self.passes: dict[str, int] = {}
        self.positions_edited: dict[str, int] = {}

    def __str__(self) -> str:
        where = self.positions if isinstance(self.positions, str) else "masked"
        parts = [
            f"{self.positions_edited.get(h, 0)} positions in {self.passes.get(h, 0)} passes at {h}"
            for h in dict.fromkeys(e.hook for e in self.edits)
        ]
        return f"steered ({', '.join(e.label for e in self.edits)}; positions={where}): " + "; ".join(parts)


def check_edits(model, edits: Sequence[Edit], positions: str | Tensor = "all") -> None:
    """Refuse, in one line, edits `model` cannot apply: UnknownHookError for a hook that does not
    fire or holds no per-token activations; DictionaryError for a direction that is not [d] (d
    the hook's width) or not finite, a non-finite strength, a feature outside its dictionary, a
    dictionary of another width or trained at another hook or on another model, bad positions."""
    if isinstance(positions, str) and positions not in POSITIONS:
        raise DictionaryError(
            f"positions must be one of {', '.join(POSITIONS)} or a bool mask, not {positions!r}"
        )
    if isinstance(positions, Tensor) and (positions.dtype != torch.bool or positions.dim() not in (1, 2)):
        raise DictionaryError(
            f"a positions mask must be bool [P] or [batch, P], got {positions.dtype} {tuple(positions.shape)}"
        )
    for edit in edits:
        width = model.width(edit.hook)
        name = f"{edit.label}: " if edit.source is not None else ""
        for dictionary in {id(d): d for d in (edit.source, edit.dictionary) if d is not None}.values():
            check_trained_at(model, dictionary, edit.hook, edit.label or "edit")
            if not 0 <= edit.feature < dictionary.n_latents:
                raise DictionaryError(
                    f"{edit.label}: feature {edit.feature} is outside 0..{dictionary.n_latents - 1}"
                )
        if edit.direction.dim() != 1:
            raise DictionaryError(
                f"{name}direction has shape {tuple(edit.direction.shape)}, hook {edit.hook} needs [{width}]"
            )
        if edit.direction.numel() != width:
            raise DictionaryError(
                f"{name}direction has {edit.direction.numel()} dims, hook {edit.hook} has d={width}"
            )
        if not math.isfinite(edit.strength):
            raise DictionaryError(f"{edit.label}: strength {edit.strength} is not finite")
        if not bool(torch.isfinite(edit.direction).all()):
            raise DictionaryError(f"{name}direction at hook {edit.hook} has NaN or infinite entries")


@contextlib.contextmanager
def steer(model, edits: Sequence[Edit], positions: str | Tensor = "all") -> Iterator[SteeringReport]:
    """Apply `edits` on every forward pass of `model` inside the block, at `positions`, on the
    model's device (edits made from a dictionary elsewhere are moved, not refused; see the module
    docstring). Raises what `check_edits` raises, before any pass and with nothing attached."""
    check_edits(model, edits, positions)
    groups: dict[str, list[Edit]] = {}
    for edit in placed(edits, model.device):
        groups.setdefault(edit.hook, []).append(edit)
    report = SteeringReport(edits, positions)
    with model.hooks(
        [(hook, _adder(hook, group, _Positions(positions), report)) for hook, group in groups.items()]
    ):
        yield report


def placed(edits: Sequence[Edit], device: torch.device) -> list[Edit]:
    """The edits with their directions on `device` and each clamp's dictionary there (one copy
    per dictionary that is elsewhere); edits already there are returned as they are."""
    copies: dict[int, Dictionary] = {}

    def place(dictionary: Dictionary | None) -> Dictionary | None:
        if dictionary is None:
            return None
        if id(dictionary) not in copies:
            copies[id(dictionary)] = on_device(dictionary, device)
        return copies[id(dictionary)]

    out = []
    for edit in edits:
        direction, dictionary = edit.direction.to(device), place(edit.dictionary)
        same = direction is edit.direction and dictionary is edit.dictionary
        out.append(edit if same else dataclasses.replace(edit, direction=direction, dictionary=dictionary))
    return out


class _Positions:
    """Absolute positions of each pass at one hook: a multi-token pass starts a sequence, a
    one-token pass continues it (KV-cached decoding)."""

    def __init__(self, spec):
        self.spec, self.prompt_length, self.next = spec, 0, 0

    def mask(self, batch: int, length: int, device: torch.device) -> Tensor | None:
        """[batch, length] bool of the positions to edit (on `device`), or None for all of them."""
        if length > 1 or self.next == 0:
            self.prompt_length, start = length, 0
        else:
            start = self.next
        self.next = start + length
        if isinstance(self.spec, str) and self.spec == "all":
            return None
        absolute = torch.arange(start, start + length)
        if isinstance(self.spec, str):
            keep = absolute < self.prompt_length if self.spec == "prompt" else absolute >= self.prompt_length
            return keep.expand(batch, length).to(device)
        if self.spec.dim() == 2 and self.spec.shape[0] not in (1, batch):
            raise DictionaryError(
                f"a positions mask of {self.spec.shape[0]} rows cannot steer a batch of {batch}"
            )
        spec = self.spec.cpu()  # built on the host (a few bools), then moved
        mask = spec if spec.dim() == 2 else spec.expand(batch, -1)
        inside = absolute < mask.shape[1]
        out = torch.zeros(mask.shape[0], length, dtype=torch.bool)
        out[:, inside] = mask[:, absolute[inside]]
        return out.expand(batch, length).to(device)


def _adder(name: str, group: list[Edit], where: _Positions, report: SteeringReport):
    def hook_fn(activation: Tensor, hook=None) -> Tensor:
        x = activation.flatten(2)  # [batch, pos, d] (attention hooks: heads flattened)
        mask = where.mask(x.shape[0], x.shape[1], x.device)
        with torch.no_grad():
            delta = sum(edit.delta(x) for edit in group)  # every edit sees the unedited activation
            if mask is not None:
                delta = delta * mask.unsqueeze(-1).to(delta.dtype)
        report.passes[name] = report.passes.get(name, 0) + 1
        edited = x.shape[0] * x.shape[1] if mask is None else int(mask.sum())
        report.positions_edited[name] = report.positions_edited.get(name, 0) + edited
        return (x + delta).view(activation.shape)

    return hook_fn


def generate_pair(
    model,
    edits: Sequence[Edit],
    prompt: str,
    max_new_tokens: int = 30,
    seed: int = 0,
    do_sample: bool = True,
    temperature: float = 1.0,
    positions: str | Tensor = "all",
) -> tuple[str, str]:
    """(baseline, steered) continuations of `prompt` with the same seed."""
    baseline, steered, _ = generate_pair_report(
        model, edits, prompt, max_new_tokens, seed, do_sample, temperature, positions
    )
    return baseline, steered


class SteeredPair(NamedTuple):
    baseline: str
    """The unsteered continuation (prompt included)."""
    steered: str
    """The continuation with the edits applied, same seed."""
    report: SteeringReport
    """What the steered run edited, per hook."""


def generate_pair_report(
    model,
    edits: Sequence[Edit],
    prompt: str,
    max_new_tokens: int = 30,
    seed: int = 0,
    do_sample: bool = True,
    temperature: float = 1.0,
    positions: str | Tensor = "all",
) -> SteeredPair:
    """`generate_pair`, and the steered run's SteeringReport (what was edited, per hook). Raises
    what `check_edits` raises, before either generation."""
    check_edits(model, edits, positions)
    baseline = model.generate(
        prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed
    )
    with steer(model, edits, positions) as report:
        steered = model.generate(
            prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed
        )
    return SteeredPair(baseline, steered, report)
