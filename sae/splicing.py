"""Dictionaries inside a running model: replace a hook's activation by its reconstruction.

`splice(model, dictionary)` is a context manager (hooks are always removed); positions after
the first are replaced, the BOS position is left alone by default, as the dictionaries are
trained without BOS rows. `replace_activation` does the same with a fixed vector (zero- and
mean-ablation baselines of the evals).

Devices and dtypes: the edits run where the model is. A dictionary on another device is not
refused: the block runs a copy of it on `model.device` (`on_device`; the caller's dictionary
stays where it was). Activations of a bfloat16/float16 model are cast to the dictionary's dtype
(float32) for the encoder and the reconstruction back to the activation's dtype.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from sae.base import Dictionary, DictionaryError


def _edit_positions(edit: Callable[[Tensor], Tensor], skip_bos: bool):
    """A hook function applying `edit` to [rows, d] activations of the positions it edits."""

    def hook_fn(activation: Tensor, hook=None) -> Tensor:
        start = 1 if skip_bos else 0
        part = activation[:, start:]
        flat = part.reshape(-1, part[0, 0].numel())
        out = activation.clone()
        out[:, start:] = edit(flat).to(activation.dtype).reshape(part.shape)
        return out

    return hook_fn


def on_device(dictionary: Dictionary, device: torch.device | str) -> Dictionary:
    """`dictionary` itself when its weights are on `device`, else a copy of it there (parameters,
    buffers, config and meta; the caller's object is untouched). Copies straight to `device`:
    no second host copy of the weights is made."""
    device = torch.device(device)
    if dictionary.W_dec.device == device:
        return dictionary
    memo: dict = {}
    for tensor in itertools.chain(dictionary.parameters(), dictionary.buffers()):
        moved = tensor.detach().to(device)
        if isinstance(tensor, nn.Parameter):
            moved = nn.Parameter(moved, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = moved
    return copy.deepcopy(dictionary, memo)


def hook_of(dictionary: Dictionary, hook: Optional[str]) -> str:
    """The hook `dictionary` runs at: `hook`, else the one it records. One-line DictionaryError for
    none, and for a cross-layer transcoder (it reads and writes every layer: no one hook)."""
    from sae.crosslayer import refuse_cross_layer

    refuse_cross_layer(dictionary, "this dictionary", "steering and splicing (sae.steer, sae.splice)")
    hook = hook or dictionary.meta.get("hook")
    if not hook:
        raise DictionaryError("this dictionary does not record its hook; pass hook=")
    return hook


def check_trained_at(model, dictionary: Dictionary, hook: str, what: str = "the dictionary") -> int:
    """The width of `hook` (d) after refusing, in one line, a dictionary that cannot run there:
    UnknownHookError for a hook that does not fire or holds no per-token activations;
    DictionaryError for d_in != d, or a recorded hook or model other than `hook` and `model`.
    A recorded hook that is no hook of this model (a peer's module name) is not compared."""
    width = model.width(hook)
    if dictionary.d_in != width:
        raise DictionaryError(f"{what}: the dictionary has d_in={dictionary.d_in}, hook {hook} has d={width}")
    trained_hook, trained_model = dictionary.meta.get("hook"), dictionary.meta.get("model")
    if trained_hook and trained_hook != hook and trained_hook in model.hook_widths():
        raise DictionaryError(f"{what}: the dictionary was trained at hook {trained_hook}, not {hook}")
    if trained_model and not model.names_this_model(str(trained_model)):
        raise DictionaryError(
            f"{what}: the dictionary was trained on model {trained_model!r}, not {model.spec!r}"
        )
    return width


@contextlib.contextmanager
def splice(
    model,
    dictionary: Dictionary,
    hook: Optional[str] = None,
    *,
    error_term: bool = False,
    skip_bos: bool = True,
) -> Iterator:
    """Run `model` with the hook's activation replaced by the dictionary's reconstruction x̂.
    error_term=True adds the error x − x̂ back: the output is the model's own (to float
    rounding), with the activation routed through the dictionary's latents. A dictionary on
    another device than the model runs as a copy on `model.device` (see the module docstring).
    Raises (before anything is attached) what `check_trained_at` raises."""
    hook = hook_of(dictionary, hook)
    check_trained_at(model, dictionary, hook, f"splice at {hook}")
    dictionary = on_device(dictionary, model.device)
    rebuild = _with_error(dictionary) if error_term else dictionary.forward
    with model.hooks([(hook, _edit_positions(rebuild, skip_bos))]):
        yield model


def _with_error(dictionary: Dictionary) -> Callable[[Tensor], Tensor]:
    def rebuild(flat: Tensor) -> Tensor:
        flat = flat.to(dictionary.W_dec.dtype)  # a bf16 model's x - x̂ in float32: x comes back exactly
        reconstruction = dictionary.forward(flat)
        return reconstruction + (flat - reconstruction)

    return rebuild


@contextlib.contextmanager
def replace_activation(model, hook: str, value: Tensor, *, skip_bos: bool = True) -> Iterator:
    """Run `model` with the hook's activation replaced by `value` [d] (any device; cast to the
    activation's dtype) at every edited position. Raises UnknownHookError for an unknown hook,
    DictionaryError for a value not of shape [d] or not finite (before anything is attached)."""
    width = model.width(hook)
    if tuple(value.shape) != (width,):
        raise DictionaryError(f"replacement value has shape {tuple(value.shape)}, hook {hook} has d={width}")
    if not bool(torch.isfinite(value).all()):
        raise DictionaryError(f"replacement value at hook {hook} is not finite")
    value = value.to(model.device)
    with model.hooks([(hook, _edit_positions(lambda flat: value.to(flat.dtype).expand_as(flat), skip_bos))]):
        yield model


def capture(hook: str, into: list) -> tuple[str, Callable]:
    """A (hook, fn) pair that appends the activation (detached) to `into` and changes nothing."""

    def hook_fn(activation: Tensor, hook=None) -> None:
        into.append(activation.detach())

    return hook, hook_fn
