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

circuit-tracer (`circuit_tracer/transcoder/single_layer_transcoder.py`): one file per layer, in
two documented layouts. Current (`SingleLayerTranscoder.to_safetensors` / `load_transcoder`):
W_enc and W_dec both [d_sae, d_model], nothing transposed (z = F.linear(x, W_enc, b_enc),
y = f @ W_dec + b_dec + x @ W_skip.T); `activation_function.threshold` makes it JumpReLU, a `k`
tensor or the config's `activation: topk` + `k` TopK (f = z on the top k, not ReLU'd), else
ReLU. Legacy (June 2025 `load_relu_transcoder`): W_dec stored [d_model, d_sae], ReLU,
log_thresholds refused. Which one a file is comes from the caller, the config beside it
(`model_kind` present: current), a threshold or k key (current), or non-square shapes; a square
file with none of these is refused, not guessed. Gemma Scope's params.npz
(`load_gemma_scope_transcoder`): W_enc [d_model, d_sae], threshold, f = z * 1[z > threshold]
(no ReLU, so a negative threshold is refused). Sets are described by a config.yaml: current
(`circuit_tracer/utils/hf_utils.py`: model_kind, feature_input_hook / feature_output_hook,
transcoders as a list of paths or layer_{i}.safetensors files, activation, k) or legacy
(`circuit_tracer/configs/*.yaml`: transcoders as [{id, layer, filepath}]); hooks become
blocks.L.<hook>. hf:// paths are refused (nothing is downloaded).
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
    path: str | Path,
    *,
    layer: int | None = None,
    in_hook: str | None = None,
    out_hook: str | None = None,
    layout: str | None = None,
    activation: str | None = None,
    k: int | None = None,
) -> Dictionary:
    """One circuit-tracer layer file as a transcoder: `.npz` (Gemma Scope JumpReLU) or
    `.safetensors` in the current layout (`load_transcoder`: W_dec [d_sae, d_model];
    activation_function.threshold -> JumpReLU, a `k` tensor or activation "topk" -> TopK, else
    ReLU) or the legacy one (`load_relu_transcoder`: W_dec [d_model, d_sae], ReLU). The layout is
    `layout` ("current" | "legacy"), else what a config beside the file says (a `model_kind`
    field: current; per-entry `layer`/`filepath` dicts: legacy), else the keys (a threshold or k:
    current), else the shapes when d_sae != d_model; a square file without any of these is
    refused rather than guessed. Layer, hooks, activation and k likewise come from the arguments,
    else the config, else the layer from a `layer_N` file name (hooks None).
    `.meta`: format, layout, layer, hook, out_hook, model, id."""
    path = Path(path)
    if not path.is_file():
        raise DictionaryError(f"{path}: no circuit-tracer transcoder file here")
    listed = _listed_in_config(path)
    layer = layer if layer is not None else listed.get("layer", _layer_from_name(path))
    if path.suffix == ".npz":
        arch, skip, ours, layout = *_gemma_scope(_read_npz(path), path), "gemma-scope"
    else:
        t = read_weights(path)
        layout = layout or listed.get("layout") or _layout_of(t, path)
        activation, k = activation or listed.get("activation"), k or listed.get("k")
        arch, skip, ours = (_current if layout == "current" else _legacy)(t, path, activation, k)
    k_of = ours.pop("k", 1)  # TopK's k, a number beside the tensors
    dictionary = _transcoder(arch, skip, {n: v.float() for n, v in ours.items()}, path, k=k_of)
    block = f"blocks.{layer}." if layer is not None else None
    dictionary.meta = {
        "format": "circuit-tracer",
        "layout": layout,
        "layer": layer,
        "hook": in_hook or (block + listed["in"] if block and listed.get("in") else None),
        "out_hook": out_hook or (block + listed["out"] if block and listed.get("out") else None),
        "model": listed.get("model"),
        "id": listed.get("id"),
    }
    if arch == "topk":
        dictionary.meta["differs_when"] = (
            "a row's k-th largest pre-activation is negative: circuit-tracer's TopK keeps it, ours is ReLU'd"
        )
    return dictionary


def _layout_of(t: dict, path: Path) -> str:
    if "activation_function.threshold" in t or "k" in t:
        return "current"
    if "W_dec" in t and "b_enc" in t and t["W_dec"].dim() == 2:
        m = t["b_enc"].shape[0]
        if t["W_dec"].shape[0] == m and t["W_dec"].shape[1] != m:
            return "current"
        if t["W_dec"].shape[1] == m and t["W_dec"].shape[0] != m:
            return "legacy"
    raise DictionaryError(
        f"{path}: W_dec is square ({tuple(t['W_dec'].shape) if 'W_dec' in t else '?'}), so circuit-tracer's "
        "current [d_sae, d_model] and legacy [d_model, d_sae] layouts cannot be told apart: put its "
        "circuit-tracer config.yaml beside it, or pass layout='current' or 'legacy' to "
        "sae.peers.load_circuit_tracer"
    )


def _current(t: dict, path: Path, activation, k):
    """`load_transcoder`'s file: nothing transposed (the module computes F.linear(x, W_enc) and
    acts @ W_dec)."""
    skip = "W_skip" in t
    jump = "activation_function.threshold" in t
    topk = "k" in t or activation == "topk"
    names = ["W_enc", "W_dec", "b_enc", "b_dec", *(["W_skip"] if skip else [])]
    names += ["activation_function.threshold"] if jump else []
    _check_tensors(t, names, path, "circuit-tracer transcoder", ignorable=("k",))
    ours = {n: t[n] for n in ("W_enc", "W_dec", "b_enc", "b_dec", *(["W_skip"] if skip else []))}
    if jump:
        if topk:
            raise DictionaryError(f"{path}: both a JumpReLU threshold and a TopK k")
        ours["threshold"] = _non_negative(t["activation_function.threshold"], path)
        return "jumprelu", skip, ours
    if topk:
        k = int(t["k"]) if "k" in t else k
        if not k:
            raise DictionaryError(f"{path}: a TopK transcoder without k (circuit-tracer requires it)")
        return "topk", skip, {**ours, "k": k}
    if activation not in (None, "relu", "jump_relu"):
        raise DictionaryError(f"{path}: activation {activation!r} is not supported (relu, topk, jump_relu)")
    return "relu", skip, ours


def _legacy(t: dict, path: Path, activation, k):
    """The June 2025 `load_relu_transcoder`'s file: W_dec stored [d_model, d_sae], ReLU."""
    if "log_thresholds" in t:
        raise DictionaryError(f"{path}: holds log_thresholds, which circuit-tracer's ReLU transcoder refuses")
    skip = "W_skip" in t
    names = ["W_enc", "W_dec", "b_enc", "b_dec", *(["W_skip"] if skip else [])]
    _check_tensors(t, names, path, "circuit-tracer (legacy) ReLU transcoder")
    ours = {n: t[n] for n in names}
    ours["W_dec"] = t["W_dec"].t().contiguous()
    return "relu", skip, ours


def _gemma_scope(t: dict, path: Path):
    """`load_gemma_scope_transcoder`'s params.npz: W_enc [d_model, d_sae] (transposed on load),
    W_dec [d_sae, d_model], JumpReLU threshold."""
    _check_tensors(t, ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"], path, "Gemma Scope transcoder")
    ours = {
        "W_enc": t["W_enc"].t().contiguous(),
        "W_dec": t["W_dec"],
        "b_enc": t["b_enc"],
        "b_dec": t["b_dec"],
    }
    ours["threshold"] = _non_negative(t["threshold"], path)
    return "jumprelu", False, ours


def _non_negative(threshold, path: Path):
    if bool((threshold < 0).any()):
        raise DictionaryError(
            f"{path}: threshold has negative entries; circuit-tracer's JumpReLU (z * 1[z > t]) "
            "then keeps negative activations, which our jumprelu cannot"
        )
    return threshold


def load_transcoder_set(path: str | Path, layout: str | None = None) -> list:
    """circuit-tracer's transcoder set, ordered by layer: a folder holding a config.yaml in the
    current format (`model_kind: transcoder_set`, `transcoders: [path per layer]` or
    `layer_{i}.safetensors` files, `activation`, `k`) or the legacy one (`transcoders: [{id,
    layer, filepath}]`), the YAML file itself, or a folder of `layer_N` files without a config
    (hooks then None). Raises DictionaryError (one line) for a config it cannot read, a hf://
    path, a missing file, two files for one layer, or a cross-layer transcoder's config."""
    path = Path(path)
    config = path if path.is_file() else _config_in(path)
    if config is None:
        files = (
            [p for p in sorted(path.glob("*")) if p.suffix in CIRCUIT_TRACER_SUFFIXES]
            if path.is_dir()
            else []
        )
        if not files or any(_layer_from_name(p) is None for p in files):
            raise DictionaryError(
                f"{path}: neither a circuit-tracer YAML config nor only layer_N transcoder files"
            )
        listing = {"entries": [(_layer_from_name(p), p, None) for p in files]}
    else:
        listing = _read_config(config)
    layers = [layer for layer, _, _ in listing["entries"]]
    if len(set(layers)) != len(layers):
        raise DictionaryError(f"{config or path}: more than one transcoder for a layer ({sorted(layers)})")
    loaded = []
    for layer, file, entry_id in sorted(listing["entries"], key=lambda e: e[0]):
        hooks = {}
        if listing.get("in"):
            hooks = {
                "in_hook": f"blocks.{layer}.{listing['in']}",
                "out_hook": f"blocks.{layer}.{listing['out']}",
            }
        options = {"layout": layout or listing.get("layout"), "activation": listing.get("activation")}
        dictionary = load_circuit_tracer(file, layer=layer, k=listing.get("k"), **options, **hooks)
        dictionary.meta.update(model=listing.get("model"), id=entry_id)
        loaded.append(dictionary)
    return loaded


def _config_in(folder: Path):
    found = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []
    if len(found) > 1:
        raise DictionaryError(
            f"{folder}: several YAML configs ({', '.join(p.name for p in found)}); pass one"
        )
    return found[0] if found else None


def _read_config(config: Path) -> dict:
    """{layout, in, out, model, activation, k, entries: [(layer, path, id)]} of a circuit-tracer
    config.yaml, current (`circuit_tracer/utils/hf_utils.py`: model_kind, transcoders as a list of
    paths, index = layer, or layer_{i}.safetensors beside it) or legacy (`circuit_tracer/configs/`:
    transcoders as [{id, layer, filepath}])."""
    import yaml  # transformers' dependency; only circuit-tracer configs need it

    try:
        values = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DictionaryError(
            f"{config}: unreadable circuit-tracer config ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(values, dict):
        raise DictionaryError(f"{config}: a circuit-tracer config is a mapping")
    for key in ("feature_input_hook", "feature_output_hook"):
        if key not in values:
            raise DictionaryError(f"{config}: field {key!r} is missing (circuit-tracer requires it)")
    kind = values.get("model_kind")
    if kind == "cross_layer_transcoder":
        raise DictionaryError(f"{config}: a cross-layer transcoder; load its folder with sae.load")
    if kind not in (None, "transcoder_set"):
        raise DictionaryError(f"{config}: unknown model_kind {kind!r}")
    listed = values.get("transcoders")
    if kind is None and (not isinstance(listed, list) or not listed):
        raise DictionaryError(f"{config}: 'transcoders' must be a non-empty list")
    if kind is None:
        entries = []
        for entry in listed:
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("layer"), int)
                or not entry.get("filepath")
            ):
                raise DictionaryError(f"{config}: each transcoder needs an integer 'layer' and a 'filepath'")
            entries.append(
                (entry["layer"], _resolve(config, _local(config, entry["filepath"])), entry.get("id"))
            )
    elif listed is not None:
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise DictionaryError(f"{config}: 'transcoders' must list one path per layer")
        entries = [(i, _resolve(config, _local(config, p)), None) for i, p in enumerate(listed)]
    else:
        files = sorted(config.parent.glob("layer_*.safetensors"))  # circuit-tracer: layer_{i}, i from 0
        entries = [(_layer_from_name(f), f, None) for f in files if _layer_from_name(f) is not None]
    return {
        "layout": "current" if kind else "legacy",
        "in": values["feature_input_hook"],
        "out": values["feature_output_hook"],
        "model": values.get("model_name"),
        "activation": values.get("activation"),
        "k": values.get("k"),
        "entries": entries,
    }


def _local(config: Path, filepath) -> str:
    if str(filepath).startswith("hf://"):
        raise DictionaryError(
            f"{config}: filepath {filepath} is on the Hugging Face hub; download it and give its local path"
        )
    return str(filepath)


def _resolve(config: Path, filepath: str) -> Path:
    """circuit-tracer opens a relative filepath from the working directory; beside the config first."""
    p = Path(filepath)
    return p if p.is_absolute() or not (config.parent / p).exists() else config.parent / p


def _listed_in_config(path: Path) -> dict:
    """What a config beside `path` says of it ({layer, in, out, model, id, layout, activation,
    k}), else {}."""
    try:
        config = _config_in(path.parent)
        listing = _read_config(config) if config is not None else None
    except DictionaryError:
        return {}
    if listing is None:
        return {}
    for layer, file, entry_id in listing["entries"]:
        if Path(file).resolve() == path.resolve():
            keep = ("in", "out", "model", "layout", "activation", "k")
            return {"layer": layer, "id": entry_id, **{key: listing[key] for key in keep}}
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
