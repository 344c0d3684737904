"""Read transcoders saved by SAELens and circuit-tracer, giving the outputs those libraries give.

The same rule as `sae.peers`: every tensor used, every output-changing field either given or
defaulted the way the peer documents it (listed in `meta["defaulted"]`); anything else is a
one-line DictionaryError naming the file and the field or tensor. The result is a transcoder
Dictionary (config.d_out > 0, W_skip for skip transcoders) with meta hook / out_hook.

SAELens (`sae_lens/saes/transcoder.py`, 6.x): folder `cfg.json` + `sae_weights.safetensors`;
architecture "transcoder" | "skip_transcoder" | "jumprelu_transcoder" | "jumprelu_skip_transcoder";
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], threshold [d_sae]
(jumprelu), W_skip [d_out, d_in] (skip). z = x @ W_enc + b_enc (no b_dec subtracted:
`TranscoderConfig` refuses apply_b_dec_to_input, whose `SAEConfig` default is true, so the field
must say false); f = ReLU(z), jumprelu f = ReLU(z) * 1[z > threshold]; y = f @ W_dec + b_dec
(+ x @ W_skip.T). d_out's documented default is 768. Hooks: metadata.hook_name, and
metadata.hook_name_out (SAELens's `LLM_METADATA_KEYS`), or the same keys at the top level.

circuit-tracer (`circuit_tracer/transcoder/single_layer_transcoder.py`): one file per layer.
`load_relu_transcoder`'s safetensors: W_enc [d_sae, d_model] and W_dec [d_model, d_sae] (both
transposed on load), b_enc, b_dec, W_skip [d_model, d_model] (skip = x @ W_skip.T); f = ReLU(z),
z = x @ W_enc.T + b_enc; log_thresholds is refused (circuit-tracer asserts it absent).
`load_gemma_scope_transcoder`'s params.npz: W_enc [d_model, d_sae], W_dec [d_sae, d_model],
b_enc, b_dec, threshold; f = z * 1[z > threshold] (no ReLU, so a negative threshold, which we
cannot reproduce, is refused). A set is described by a YAML config (`circuit_tracer/configs/`):
model_name, feature_input_hook / feature_output_hook (TransformerLens names inside block L,
e.g. ln2.hook_normalized / hook_mlp_out, so ours are blocks.L.<name>), transcoders: [{id, layer,
filepath}]. hf:// paths are refused (nothing is downloaded).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from sae.base import Dictionary, DictionaryError, dictionary_class
from sae.config import DictionaryConfig
from sae.weights import from_tensors, read_weights

SAELENS_TRANSCODERS = {  # label -> (our architecture, skip)
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
CIRCUIT_TRACER_SUFFIXES = (".safetensors", ".npz")


def _check_tensors(t: dict, needed: list, where: Path, what: str, ignorable: tuple = ()) -> None:
    if missing := [n for n in needed if n not in t]:
        raise DictionaryError(f"{where}: {what} weights lack {', '.join(missing)}")
    if unused := sorted(set(t) - set(needed) - set(ignorable)):
        raise DictionaryError(
            f"{where}: holds {', '.join(map(repr, unused))}, which a {what} does not use; refusing to drop it"
        )


def _transcoder(arch: str, skip: bool, ours: dict, where: Path, k: int = 1) -> Dictionary:
    """Our transcoder Dictionary holding `ours` (shapes checked by `from_tensors`)."""
    m, d_in = ours["W_enc"].shape
    d_out = ours["W_dec"].shape[1]
    config = DictionaryConfig(architecture=arch, d_in=d_in, n_latents=m, k=min(k, m), d_out=d_out, skip=skip)
    return from_tensors(dictionary_class(arch), config, ours, where, buffers_optional=True)


def load_saelens_transcoder(cfg, label: str, folder: Path, weights_name: str) -> Dictionary:
    """A SAELens transcoder folder whose cfg.json (`cfg`, a `sae.peers._Fields`) names a transcoder
    architecture `label`; see the module docstring."""
    arch, skip = SAELENS_TRANSCODERS[label]
    if cfg.flag("apply_b_dec_to_input", True):
        raise cfg.error(
            f"apply_b_dec_to_input is true (or absent: SAELens's default is true), which SAELens "
            f"refuses for a {label}"
        )
    d_in, d_sae, d_out = cfg.positive_int("d_in"), cfg.positive_int("d_sae"), cfg.positive_int("d_out", 768)
    where = folder / weights_name
    t = read_weights(where)
    names = [
        "W_enc",
        "b_enc",
        "W_dec",
        "b_dec",
        *(["threshold"] if arch == "jumprelu" else []),
        *(["W_skip"] if skip else []),
    ]
    _check_tensors(t, names, folder, f"SAELens {label}", ignorable=("scaling_factor",))
    if "scaling_factor" in t and not torch.equal(t["scaling_factor"], torch.ones_like(t["scaling_factor"])):
        raise DictionaryError(
            f"{where}: scaling_factor is not all ones, which a SAELens {label} cannot apply"
        )
    ours = {n: t[n].float() for n in names}
    if tuple(ours["W_enc"].shape) != (d_in, d_sae) or tuple(ours["W_dec"].shape) != (d_sae, d_out):
        raise DictionaryError(
            f"{where}: W_enc {tuple(ours['W_enc'].shape)} / W_dec {tuple(ours['W_dec'].shape)} do not fit "
            f"cfg.json's d_in {d_in}, d_sae {d_sae}, d_out {d_out}"
            f"{' (d_out defaulted to 768)' if 'd_out' in cfg.defaulted else ''}"
        )
    ours["W_enc"] = ours["W_enc"].t().contiguous()  # SAELens keeps W_enc as [d_in, d_sae]
    if arch == "jumprelu":  # ReLU(z) * 1[z > t] == z * 1[z > max(t, 0)]
        ours["threshold"] = ours["threshold"].clamp_min(0)
    dictionary = _transcoder(arch, skip, ours, where)
    meta = cfg.values.get("metadata") if isinstance(cfg.values.get("metadata"), dict) else {}
    dictionary.meta = {
        "format": "saelens",
        "hook": meta.get("hook_name") or cfg.values.get("hook_name"),
        "out_hook": meta.get("hook_name_out") or cfg.values.get("hook_name_out"),
        "model": meta.get("model_name") or cfg.values.get("model_name"),
        "defaulted": cfg.defaulted,
    }
    return dictionary


def load_circuit_tracer(
    path: str | Path, *, layer: int | None = None, in_hook=None, out_hook=None
) -> Dictionary:
    """One circuit-tracer layer file (.safetensors: ReLU or skip transcoder; .npz: Gemma Scope
    JumpReLU) as a transcoder. Layer and hooks come from the arguments, else from a YAML config
    in the same folder that lists this file, else the layer from a `layer_N` file name (hooks
    None). `.meta`: format, layer, hook, out_hook, model, id."""
    path = Path(path)
    if not path.is_file():
        raise DictionaryError(f"{path}: no circuit-tracer transcoder file here")
    listed = _listed_in_config(path)
    if layer is None:
        layer = listed.get("layer", _layer_from_name(path))
    t = _read_npz(path) if path.suffix == ".npz" else read_weights(path)
    if path.suffix == ".npz":
        _check_tensors(t, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], path, "Gemma Scope transcoder")
        if bool((t["threshold"] < 0).any()):
            raise DictionaryError(
                f"{path}: threshold has negative entries; circuit-tracer's JumpReLU (z * 1[z > t]) "
                "then keeps negative activations, which our jumprelu cannot"
            )
        ours = {
            "W_enc": t["W_enc"].t().contiguous(),
            "W_dec": t["W_dec"],
            "b_enc": t["b_enc"],
            "b_dec": t["b_dec"],
        }
        ours["threshold"] = t["threshold"]
        arch, skip = "jumprelu", False
    else:
        if "log_thresholds" in t:
            raise DictionaryError(
                f"{path}: holds log_thresholds, which circuit-tracer's ReLU transcoder refuses"
            )
        skip = "W_skip" in t
        names = ["W_enc", "W_dec", "b_enc", "b_dec", *(["W_skip"] if skip else [])]
        _check_tensors(t, names, path, "circuit-tracer ReLU transcoder")
        ours = {n: t[n] for n in names}
        ours["W_dec"] = t["W_dec"].t().contiguous()  # stored [d_model, d_sae]; W_enc already [d_sae, d_model]
        arch = "relu"
    ours = {n: v.float() for n, v in ours.items()}
    if (
        ours["W_enc"].dim() != 2
        or ours["W_dec"].dim() != 2
        or ours["W_enc"].shape[0] != ours["W_dec"].shape[0]
    ):
        raise DictionaryError(
            f"{path}: W_enc {tuple(t['W_enc'].shape)} and W_dec {tuple(t['W_dec'].shape)} "
            "do not share a latent axis"
        )
    dictionary = _transcoder(arch, skip, ours, path)
    block = f"blocks.{layer}." if layer is not None else None
    dictionary.meta = {
        "format": "circuit-tracer",
        "layer": layer,
        "hook": in_hook or (block + listed["in"] if block and listed.get("in") else None),
        "out_hook": out_hook or (block + listed["out"] if block and listed.get("out") else None),
        "model": listed.get("model"),
        "id": listed.get("id"),
    }
    return dictionary


def load_transcoder_set(path: str | Path) -> list:
    """circuit-tracer's transcoder set: a YAML config (or a folder holding exactly one) listing
    one file per layer, or a folder of `layer_N.safetensors` / `.npz` files without one (hooks
    then None). Returns the Dictionaries ordered by layer. Raises DictionaryError (one line) for
    a config it cannot read, a hf:// path, a missing file, or two files for one layer."""
    path = Path(path)
    config = path if path.is_file() else _config_in(path)
    if config is None:
        files = (
            [p for p in sorted(path.glob("*")) if p.suffix in CIRCUIT_TRACER_SUFFIXES]
            if path.is_dir()
            else []
        )
        if not files:
            raise DictionaryError(
                f"{path}: neither a circuit-tracer YAML config nor layer_N.safetensors files"
            )
        entries = [(_layer_from_name(p), p, {}) for p in files]
        if any(layer is None for layer, _, _ in entries):
            raise DictionaryError(
                f"{path}: without a YAML config every file must be named layer_N (got {files[0].name})"
            )
    else:
        values = _read_yaml(config)
        entries = [(e["layer"], _resolve(config, e["filepath"]), e) for e in values["transcoders"]]
    layers = [layer for layer, _, _ in entries]
    if len(set(layers)) != len(layers):
        raise DictionaryError(f"{config or path}: more than one transcoder for a layer ({sorted(layers)})")
    loaded = []
    for layer, file, entry in sorted(entries, key=lambda e: e[0]):
        hooks = {}
        if config is not None:
            hooks = {
                "in_hook": f"blocks.{layer}.{values['feature_input_hook']}",
                "out_hook": f"blocks.{layer}.{values['feature_output_hook']}",
            }
        dictionary = load_circuit_tracer(file, layer=layer, **hooks)
        if config is not None:
            dictionary.meta.update(model=values.get("model_name"), id=entry.get("id"))
        loaded.append(dictionary)
    return loaded


def _config_in(folder: Path):
    found = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []
    if len(found) > 1:
        raise DictionaryError(
            f"{folder}: several YAML configs ({', '.join(p.name for p in found)}); pass one"
        )
    return found[0] if found else None


def _read_yaml(config: Path) -> dict:
    import yaml  # transformers' dependency; only circuit-tracer configs need it

    try:
        values = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DictionaryError(
            f"{config}: unreadable circuit-tracer config ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(values, dict):
        raise DictionaryError(f"{config}: a circuit-tracer config is a mapping")
    for key in ("feature_input_hook", "feature_output_hook", "transcoders"):
        if key not in values:
            raise DictionaryError(f"{config}: field {key!r} is missing (circuit-tracer requires it)")
    entries = values["transcoders"]
    if not isinstance(entries, list) or not entries:
        raise DictionaryError(f"{config}: 'transcoders' must be a non-empty list")
    for entry in entries:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("layer"), int)
            or not entry.get("filepath")
        ):
            raise DictionaryError(
                f"{config}: each transcoder needs an integer 'layer' and a 'filepath', got {entry!r}"
            )
        if str(entry["filepath"]).startswith("hf://"):
            raise DictionaryError(
                f"{config}: filepath {entry['filepath']} is on the Hugging Face hub; "
                "download it and give its local path"
            )
    return values


def _resolve(config: Path, filepath: str) -> Path:
    """circuit-tracer opens a relative filepath from the working directory; beside the config first."""
    p = Path(filepath)
    return p if p.is_absolute() or not (config.parent / p).exists() else config.parent / p


def _listed_in_config(path: Path) -> dict:
    """{layer, in, out, model, id} of `path` from a YAML config beside it that lists it, else {}."""
    try:
        config = _config_in(path.parent)
    except DictionaryError:
        return {}
    if config is None:
        return {}
    values = _read_yaml(config)
    for entry in values["transcoders"]:
        if _resolve(config, entry["filepath"]).resolve() == path.resolve():
            return {
                "layer": entry["layer"],
                "in": values["feature_input_hook"],
                "out": values["feature_output_hook"],
                "model": values.get("model_name"),
                "id": entry.get("id"),
            }
    return {}


def _layer_from_name(path: Path):
    match = re.search(r"layer_(\d+)", path.name)
    return int(match.group(1)) if match else None


def _read_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in data.files}
    except Exception as exc:  # numpy raises several types for a corrupt archive
        raise DictionaryError(f"{path}: unreadable npz ({str(exc).splitlines()[0]})") from None
