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
shows as 0 positions. An edit may carry its own `positions` (same choices, or a list of
absolute positions: `ablate(d, f, positions=[7])`), which override the block's for that edit.

Transcoders (a dictionary that reads one hook and writes another: `meta["hook"]` its input,
`meta["out_hook"]` its output; Dunefsky, Chlenski & Nanda 2024) are edited at the output hook:
`add(t, f, s)` adds s·W_dec[f] [d_out] there; `clamp(t, f, v)` adds (v − a_f)·W_dec[f], where
a_f is the feature's activation on the input hook's activation of the same forward pass (read
by a second hook, after any edits at that hook), so `ablate(t, f)` removes exactly what the
feature contributes to the transcoder's output; the skip term, the error and the other latents
are untouched. Both hooks go through one hook block, so the hook modes cover both.

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
from sae.steering_positions import Positions, as_positions, check_positions, position_label


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
    in_hook: str | None = None
    """Transcoder edits: the transcoder's input hook, where a clamp reads the feature's activation
    (the edit itself is added at `hook`, the output hook). None for every other edit."""
    positions: str | Tensor | None = None
    """Where this edit applies ("all", "prompt", "generated" or a bool mask over absolute
    positions); None: the `positions` of the steer block."""

    @property
    def reads_input(self) -> bool:
        """A transcoder clamp: its activation comes from `in_hook`, not from the edited hook."""
        return self.in_hook is not None and self.dictionary is not None

    def activation(self, x: Tensor) -> Tensor:
        """The clamped feature's activation on x [..., d_in] (the dictionary's input), flattened
        to [rows], in the dictionary's dtype."""
        flat = x.reshape(-1, x.shape[-1])
        codes = self.dictionary.encode(flat)  # in the dictionary's dtype
        chosen = (codes.flat_indices() == self.feature).to(codes.flat_values().dtype) * codes.flat_values()
        return chosen.new_zeros(len(flat)).index_add_(0, codes.row_ids(), chosen)

    def delta(self, x: Tensor, current: Tensor | None = None) -> Tensor:
        """What this edit adds to activations x [..., d], in x's dtype (direction and dictionary
        on x's device: `steer` puts them there). `current` [rows]: a clamp's feature activation
        when it is not read off x (transcoders: read at the input hook)."""
        if self.dictionary is None:
            return self.strength * self.direction.to(x.dtype).expand_as(x)
        current = self.activation(x) if current is None else current
        direction = self.direction.to(current.dtype)
        return ((self.strength - current).unsqueeze(1) * direction).view(x.shape).to(x.dtype)


def add(
    dictionary: Dictionary,
    feature: int,
    strength: float,
    hook: str | None = None,
    *,
    positions: str | Tensor | Sequence[int] | None = None,
) -> Edit:
    """Add `strength` times the feature's decoder direction W_dec[feature] [d_in] (what the feature
    writes when active) at `hook` (default: the dictionary's). For a transcoder the direction is
    [d_out] and is added at its output hook (`hook` overrides that one). `positions`: where this
    edit applies, overriding the steer block's (see the module docstring). Raises DictionaryError
    for a feature outside 0..n_latents-1, a dictionary that records no hook, bad positions;
    `steer` checks the rest."""
    from sae.crosslayer import refuse_cross_layer

    refuse_cross_layer(dictionary, "this dictionary", "steering and splicing (sae.steer, sae.splice)")
    if not 0 <= int(feature) < dictionary.n_latents:
        raise DictionaryError(f"feature {feature} is outside 0..{dictionary.n_latents - 1}")
    direction = dictionary.W_dec[int(feature)].detach()
    where = as_positions(positions)
    if is_transcoder(dictionary):
        hook, in_hook = transcoder_hooks(dictionary, hook)
    else:
        hook, in_hook = hook_of(dictionary, hook), None
    return Edit(
        hook,
        direction,
        float(strength),
        f"feature {int(feature)} x {strength:g}{position_label(where)}",
        feature=int(feature),
        source=dictionary,
        in_hook=in_hook,
        positions=where,
    )


def clamp(
    dictionary: Dictionary,
    feature: int,
    value: float,
    hook: str | None = None,
    *,
    positions: str | Tensor | Sequence[int] | None = None,
) -> Edit:
    """Hold the feature's activation at `value` (its error term untouched), at every position or
    at `positions`. A transcoder's feature is read at its input hook on the same pass and the
    change (value − a_f)·W_dec[f] added at its output hook."""
    edit = add(dictionary, feature, 0.0, hook, positions=positions)
    return dataclasses.replace(
        edit,
        strength=float(value),
        label=f"feature {int(feature)} = {value:g}{position_label(edit.positions)}",
        dictionary=dictionary,
    )


def ablate(
    dictionary: Dictionary,
    feature: int,
    hook: str | None = None,
    *,
    positions: str | Tensor | Sequence[int] | None = None,
) -> Edit:
    """Remove the feature's contribution wherever it fires (or at `positions`); for a transcoder,
    exactly a_f·W_dec[f] is subtracted from its output hook."""
    return clamp(dictionary, feature, 0.0, hook, positions=positions)


def is_transcoder(dictionary: Dictionary) -> bool:
    """Whether the dictionary decodes to another hook than it reads (a transcoder)."""
    return bool(getattr(dictionary, "is_transcoder", False) or dictionary.meta.get("out_hook"))


def transcoder_hooks(transcoder: Dictionary, out_hook: str | None = None) -> tuple[str, str]:
    """(output hook, input hook) of a transcoder: `out_hook` or its recorded `meta["out_hook"]`,
    and its `meta["hook"]`. Raises DictionaryError when one is not recorded."""
    in_hook, out_hook = transcoder.meta.get("hook"), out_hook or transcoder.meta.get("out_hook")
    if not in_hook:
        raise DictionaryError("this transcoder does not record its input hook (meta['hook']); set it")
    if not out_hook:
        raise DictionaryError(
            "this transcoder does not record its output hook (meta['out_hook']); pass hook="
        )
    return out_hook, in_hook


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


def check_edits(model, edits: Sequence[Edit], positions: str | Tensor | Sequence[int] = "all") -> None:
    """Refuse, in one line, edits `model` cannot apply: UnknownHookError for a hook that does not
    fire or holds no per-token activations; DictionaryError for a direction that is not [d] (d
    the hook's width) or not finite, a non-finite strength, a feature outside its dictionary, a
    dictionary of another width or trained at another hook or on another model, bad positions
    (a transcoder: d_in is its input hook's width, d_out its output hook's)."""
    as_positions(positions)
    for edit in edits:
        check_positions(edit.positions)
        width = model.width(edit.hook)
        name = f"{edit.label}: " if edit.source is not None else ""
        for dictionary in {id(d): d for d in (edit.source, edit.dictionary) if d is not None}.values():
            if edit.in_hook is not None:
                _check_transcoder(model, dictionary, edit.in_hook, edit.hook, edit.label or "edit")
            else:
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


def _check_transcoder(model, transcoder: Dictionary, in_hook: str, out_hook: str, what: str) -> None:
    """`check_trained_at` at the input hook (d_in, recorded hook and model), then d_out against
    the output hook's width and the recorded output hook against `out_hook`."""
    check_trained_at(model, transcoder, in_hook, what)
    width, d_out = model.width(out_hook), getattr(transcoder, "d_out", transcoder.W_dec.shape[-1])
    if d_out != width:
        raise DictionaryError(f"{what}: the transcoder has d_out={d_out}, hook {out_hook} has d={width}")
    trained = transcoder.meta.get("out_hook")
    if trained and trained != out_hook and trained in model.hook_widths():
        raise DictionaryError(f"{what}: the transcoder was trained to write {trained}, not {out_hook}")


@contextlib.contextmanager
def steer(
    model, edits: Sequence[Edit], positions: str | Tensor | Sequence[int] = "all"
) -> Iterator[SteeringReport]:
    """Apply `edits` on every forward pass of `model` inside the block, at `positions` (each
    edit's own `positions` override them), on the model's device (edits made from a dictionary
    elsewhere are moved, not refused; see the module docstring). Raises what `check_edits`
    raises, before any pass and with nothing attached."""
    check_edits(model, edits, positions)
    positions = as_positions(positions)
    groups: dict[str, list[tuple[int, Edit]]] = {}
    readers: dict[str, list[tuple[int, Edit]]] = {}
    for i, edit in enumerate(placed(edits, model.device)):
        groups.setdefault(edit.hook, []).append((i, edit))
        if edit.reads_input:
            readers.setdefault(edit.in_hook, []).append((i, edit))
    report = SteeringReport(edits, positions)
    readings: dict[int, Tensor] = {}  # edit index -> the clamped feature's activation [rows], this pass
    hook_fns = [
        (hook, _adder(hook, groups.get(hook, []), readers.get(hook, []), readings, positions, report))
        for hook in dict.fromkeys([*groups, *readers])
    ]
    with model.hooks(hook_fns):  # one block: the hook modes are those of every hook involved
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


def _adder(name: str, group, readers, readings: dict, positions, report: SteeringReport):
    """The hook function at `name`: adds the deltas of `group` ((index, edit) pairs whose hook
    this is), then reads the activations that `readers` (transcoder clamps whose input hook this
    is) need later in the pass, off the edited activation (what the MLP reads)."""
    where = Positions()

    def hook_fn(activation: Tensor, hook=None) -> Tensor | None:
        x = activation.flatten(2)  # [batch, pos, d] (attention hooks: heads flattened)
        if group:
            x = _apply(name, group, x, where, readings, positions, report)
        if readers:
            with torch.no_grad():
                for i, edit in readers:
                    readings[i] = edit.activation(x)
        return x.view(activation.shape) if group else None

    return hook_fn


def _apply(name: str, group, x: Tensor, where: Positions, readings: dict, positions, report) -> Tensor:
    where.step(x.shape[1])
    rows, edited = x.shape[0] * x.shape[1], None
    delta = torch.zeros_like(x)
    with torch.no_grad():
        for i, edit in group:  # every edit sees the unedited activation
            current = _reading(edit, readings.pop(i, None), rows) if edit.reads_input else None
            change = edit.delta(x, current)
            mask = where.mask(positions if edit.positions is None else edit.positions, *x.shape[:2], x.device)
            if mask is None:
                edited = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            else:
                change = change * mask.unsqueeze(-1).to(change.dtype)
                edited = mask if edited is None else edited | mask
            delta = delta + change
    report.passes[name] = report.passes.get(name, 0) + 1
    report.positions_edited[name] = report.positions_edited.get(name, 0) + int(edited.sum())
    return x + delta


def _reading(edit: Edit, current: Tensor | None, rows: int) -> Tensor:
    if current is None or current.numel() != rows:
        raise DictionaryError(
            f"{edit.label}: the transcoder's input hook {edit.in_hook} did not fire before {edit.hook} "
            f"in this pass, so the feature's activation is unknown"
        )
    return current


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
