"""Dictionary folders: `config.json` + `weights.safetensors`, and `load` for ours and peers'.

Our format (format_version 1):
    config.json          {"format_version", "architecture", "dictionary": DictionaryConfig,
                          "hook", "model", "cache", "corpus", "context_length",
                          "input_scale_folded", "config": the TrainConfig, "metrics": {...}}
    weights.safetensors  the module's parameters and buffers by name (W_enc [n_latents, d_in],
                         W_dec [n_latents, d_out], b_dec [d_out]; W_skip [d_out, d_in] if skip)
A transcoder (dictionary.d_out > 0) also records "out_hook" (the hook it predicts) and
"output_scale_folded".
Weights act on raw activations: the training-time input scale is folded in at save.
`load` also reads SAELens folders (cfg.json + sae_weights.safetensors) and sparsify folders
(cfg.json + sae.safetensors); see `sae.peers`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

from sae import peers
from sae.base import Dictionary, DictionaryError, dictionary_class
from sae.config import DictionaryConfig
from sae.weights import from_tensors, read_weights
from workbench.devices import resolve_device
from workbench.errors import ConfigError
from workbench.files import read_json, save_tensors_atomic, write_json_atomic

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "weights.safetensors"


def save(
    dictionary: Dictionary,
    folder: str | Path,
    *,
    input_scale: float = 1.0,
    output_scale: Optional[float] = None,
    **fields,
) -> Path:
    """Write the dictionary (scale folded in) and `fields` (hook, model, config, metrics...; a
    transcoder's `out_hook`). `output_scale`: the factor a transcoder's targets were trained at
    (None: `input_scale`); it is folded in too and recorded as output_scale_folded."""
    folder = Path(folder)
    folded = copy.deepcopy(dictionary).cpu()
    if input_scale != 1.0 or output_scale not in (None, input_scale):
        folded.fold_input_scale(input_scale, output_scale)
    if output_scale is not None:
        fields = {"output_scale_folded": output_scale, **fields}
    tensors = {name: t.detach().contiguous() for name, t in folded.state_dict().items()}
    save_tensors_atomic(
        folder / WEIGHTS, tensors, metadata={"format": "workbench", "architecture": dictionary.architecture}
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": dictionary.architecture,
        "dictionary": dictionary.config.to_json(),
        "input_scale_folded": input_scale,
        **fields,
    }
    write_json_atomic(folder / CONFIG, meta)  # last: its presence marks a complete folder
    return folder


def is_dictionary_folder(path: str | Path) -> bool:
    """Whether `path` holds a dictionary `load` reads: our config.json, or a SAELens or sparsify
    weights file (their file names)."""
    folder = Path(path)
    return any((folder / name).exists() for name in (CONFIG, peers.SAELENS_WEIGHTS, peers.SPARSIFY_WEIGHTS))


def load(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """A dictionary from our folder, a SAELens folder or a sparsify folder (transcoders too, and
    a circuit-tracer layer file), or a cross-layer transcoder folder (ours or circuit-tracer's:
    a `sae.crosslayer.CrossLayerTranscoder`), its weights on `device` (a `--device` value: cpu,
    auto, cuda, cuda:N, or a torch.device). `.meta` holds the folder's other fields (hook,
    model, metrics, ...). Raises DictionaryError for a folder it
    cannot read, DeviceError for a device this machine lacks (before reading anything)."""
    device = resolve_device(device)
    folder = Path(path)
    if folder.is_file() and folder.suffix in peers.CIRCUIT_TRACER_SUFFIXES:  # one circuit-tracer layer file
        return peers.load_circuit_tracer(folder).to(device)
    if not folder.is_dir():
        raise DictionaryError(f"{folder}: no dictionary folder here")
    if (folder / CONFIG).exists():
        if _is_cross_layer(folder):  # a cross-layer transcoder: sae.crosslayer
            from sae import crosslayer

            return crosslayer.load(folder).to(device)
        return _load_ours(folder).to(device)
    if (folder / "W_enc_0.safetensors").exists():  # circuit-tracer's cross-layer transcoder
        from sae.crosslayer_peers import load_circuit_tracer_clt

        return load_circuit_tracer_clt(folder).to(device)
    if (folder / peers.SAELENS_WEIGHTS).exists():
        return peers.load_saelens(folder).to(device)
    if (folder / peers.SPARSIFY_WEIGHTS).exists():
        return peers.load_sparsify(folder).to(device)
    raise DictionaryError(
        f"{folder}: neither {CONFIG} (workbench), {peers.SAELENS_WEIGHTS} (SAELens) "
        f"nor {peers.SPARSIFY_WEIGHTS} (sparsify)"
    )


def _is_cross_layer(folder: Path) -> bool:
    from sae.crosslayer import KIND

    return read_json(folder / CONFIG, "dictionary config", DictionaryError).get("kind") == KIND


def _load_ours(folder: Path) -> Dictionary:
    meta = read_json(folder / CONFIG, "dictionary config", DictionaryError)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DictionaryError(
            f"{folder / CONFIG}: unknown format_version {meta.get('format_version')!r} "
            f"(this workbench reads {FORMAT_VERSION})"
        )
    if not isinstance(meta.get("dictionary"), dict):
        raise DictionaryError(f"{folder / CONFIG}: no 'dictionary' object")
    try:
        config = DictionaryConfig.from_json(meta["dictionary"])
        cls = dictionary_class(meta.get("architecture", config.architecture))
    except ConfigError as exc:
        raise DictionaryError(f"{folder / CONFIG}: {exc}") from None
    dictionary = from_tensors(cls, config, read_weights(folder / WEIGHTS), folder / WEIGHTS)
    dictionary.meta = {k: v for k, v in meta.items() if k not in ("dictionary",)}
    dictionary.meta["path"] = str(folder.absolute())  # where it came from (graph JSON, explorer links)
    return dictionary
