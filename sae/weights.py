"""Reading a dictionary's tensors: a safetensors file, checked, into an instance of its class.

Both loaders use it: `sae.io` for our folders, `sae.peers` for SAELens's and sparsify's (after
renaming and converting their tensors). A file that is missing or not safetensors, and tensors
whose names or shapes do not fit the class, are a one-line DictionaryError naming the file.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from sae.base import Dictionary, DictionaryError
from sae.config import DictionaryConfig


def read_weights(path: Path) -> dict:
    if not path.exists():
        raise DictionaryError(f"{path}: weights file missing")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise DictionaryError(f"{path}: unreadable safetensors ({str(exc).splitlines()[0]})") from None


def from_tensors(
    cls: type[Dictionary],
    config: DictionaryConfig,
    tensors: dict,
    where: Path,
    buffers_optional: bool = False,
) -> Dictionary:
    """A dictionary of class `cls` holding exactly `tensors` (names and shapes checked). With
    `buffers_optional` (peers' folders), absent training-state buffers keep their initial values."""
    dictionary = cls(config)
    expected = dictionary.state_dict()
    optional = [name for name, _ in dictionary.named_buffers()] if buffers_optional else cls.defaulted_buffers
    tensors = {**{name: b for name, b in dictionary.named_buffers() if name in optional}, **tensors}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise DictionaryError(
            f"{where}: tensors do not fit a {cls.architecture} dictionary "
            f"(missing {missing}, unexpected {unexpected})"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise DictionaryError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    dictionary.load_state_dict(
        {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    )
    return dictionary
