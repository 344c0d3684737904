"""Read circuit-tracer's cross-layer transcoder folders as our `CrossLayerTranscoder`.

Layout (circuit-tracer `circuit_tracer/transcoder/cross_layer_transcoder.py`, `to_safetensors`
and `load_clt`): per layer i, `W_enc_{i}.safetensors` holding W_enc_{i} [d_transcoder, d_model],
b_enc_{i} [d_transcoder], b_dec_{i} [d_model] and, for a JumpReLU CLT, threshold_{i}
[d_transcoder]; `W_dec_{i}.safetensors` holding W_dec_{i} [d_transcoder, n_layers - i, d_model]
(layer i's latents writing to outputs i, i+1, ...). The same orientation as ours, no transposes.
Activation: ReLU, or with thresholds f = z * 1[z > threshold] (no ReLU first, so a negative
threshold, which we cannot reproduce, is refused). `load_clt` reads no skip connection from
these files. Hooks: `config.yaml` beside them (feature_input_hook, feature_output_hook,
model_name, as the hub's CLT repositories carry) gives blocks.L.<hook>; without one they are None.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae.base import DictionaryError
from sae.crosslayer import CrossLayerConfig, CrossLayerTranscoder
from sae.weights import read_weights

FIRST_ENCODER = "W_enc_0.safetensors"


def is_circuit_tracer_clt(folder: Path) -> bool:
    return (folder / FIRST_ENCODER).exists()


def load_circuit_tracer_clt(folder: str | Path) -> CrossLayerTranscoder:
    """The CLT in a circuit-tracer folder (see the module docstring), giving circuit-tracer's
    activations and reconstructions. Raises DictionaryError (one line naming the file and the
    tensor) for a missing or unused tensor, shapes that disagree, or a negative threshold."""
    folder = Path(folder)
    n_layers = 0
    while (folder / f"W_enc_{n_layers}.safetensors").exists():
        n_layers += 1
    encoders = [read_weights(folder / f"W_enc_{i}.safetensors") for i in range(n_layers)]
    jump = f"threshold_{0}" in encoders[0]
    tensors: dict = {}
    for i, t in enumerate(encoders):
        names = [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", *([f"threshold_{i}"] if jump else [])]
        _exactly(t, names, folder / f"W_enc_{i}.safetensors")
        decoder = read_weights(folder / f"W_dec_{i}.safetensors")
        _exactly(decoder, [f"W_dec_{i}"], folder / f"W_dec_{i}.safetensors")
        tensors.update({n: v.float() for n, v in {**t, **decoder}.items()})
    m, d_in = tensors["W_enc_0"].shape
    d_out = tensors["b_dec_0"].shape[0]
    architecture = "jumprelu" if jump else "relu"
    clt = CrossLayerTranscoder(
        CrossLayerConfig(
            architecture=architecture, n_layers=n_layers, d_in=d_in, d_out=d_out, n_latents=m, k=1
        )
    )
    state = dict(clt.state_dict())  # controller buffers keep their initial values
    for name, ours in (("W_enc", "W_enc"), ("b_enc", "b_enc"), ("b_dec", "b_dec")):
        state[ours] = _stacked(tensors, name, n_layers, tuple(state[ours].shape[1:]), folder)
    for i in range(n_layers):
        state[f"W_dec.{i}"] = _shaped(tensors, f"W_dec_{i}", tuple(state[f"W_dec.{i}"].shape), folder)
    if jump:
        state["threshold"] = _stacked(tensors, "threshold", n_layers, (m,), folder)
        if bool((state["threshold"] < 0).any()):
            raise DictionaryError(
                f"{folder}: a threshold is negative; circuit-tracer's JumpReLU (z * 1[z > t]) then keeps "
                "negative activations, which ours cannot"
            )
    clt.load_state_dict(state)
    hooks = _hooks(folder, n_layers)
    clt.meta = {"format": "circuit-tracer", **hooks}
    return clt


def _exactly(t: dict, names: list, where: Path) -> None:
    if missing := [n for n in names if n not in t]:
        raise DictionaryError(f"{where}: circuit-tracer CLT weights lack {', '.join(missing)}")
    if unused := sorted(set(t) - set(names)):
        raise DictionaryError(
            f"{where}: holds {', '.join(map(repr, unused))}, which a circuit-tracer CLT does not use; "
            "refusing to drop it"
        )


def _shaped(tensors: dict, name: str, shape: tuple, folder: Path) -> torch.Tensor:
    if tuple(tensors[name].shape) != shape:
        raise DictionaryError(f"{folder}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    return tensors[name]


def _stacked(tensors: dict, stem: str, n_layers: int, shape: tuple, folder: Path) -> torch.Tensor:
    return torch.stack([_shaped(tensors, f"{stem}_{i}", shape, folder) for i in range(n_layers)])


def _hooks(folder: Path, n_layers: int) -> dict:
    config = folder / "config.yaml"
    if not config.exists():
        return {"in_hooks": None, "out_hooks": None, "model": None}
    import yaml  # transformers' dependency

    try:
        values = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DictionaryError(f"{config}: unreadable ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise DictionaryError(f"{config}: a circuit-tracer config is a mapping")
    hook_in, hook_out = values.get("feature_input_hook"), values.get("feature_output_hook")
    return {
        "in_hooks": [f"blocks.{i}.{hook_in}" for i in range(n_layers)] if hook_in else None,
        "out_hooks": [f"blocks.{i}.{hook_out}" for i in range(n_layers)] if hook_out else None,
        "model": values.get("model_name"),
    }
