"""Read dictionaries saved by SAELens and sparsify, giving the outputs those libraries give.

SAELens folder: `cfg.json` + `sae_weights.safetensors`, W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_enc, b_dec; "architecture" standard | topk | jumprelu (+ threshold) | gated (b_gate, r_mag,
b_mag, W_enc as the gate). Inference: z = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc;
standard f = ReLU(z), topk f = ReLU(TopK(z)), jumprelu f = ReLU(z) * 1[z > threshold]. Older
configs name the activation in "activation_fn_str"/"activation_fn" with k in
"activation_fn_kwargs". Activation normalisation is supported where it is folded (none,
expected_average_only_in); run-time normalisations are refused.

sparsify folder: `cfg.json` + `sae.safetensors`, encoder.weight [m, d], encoder.bias, W_dec
[m, d], b_dec; f = TopK(ReLU(encoder(x - b_dec))), x_hat = f @ W_dec + b_dec.
"""

from __future__ import annotations

from pathlib import Path

from sae.base import Dictionary, DictionaryError, dictionary_class
from sae.config import DictionaryConfig
from sae.io import from_tensors, read_weights
from workbench.files import read_json

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"

_SAELENS_ARCHITECTURES = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
_FOLDED_NORMALISATIONS = (None, "none", "expected_average_only_in")


def load_saelens(folder: Path) -> Dictionary:
    where = folder / SAELENS_CONFIG
    cfg = read_json(where, "SAELens cfg.json", DictionaryError)
    arch = _saelens_architecture(cfg, where)
    if cfg.get("normalize_activations") not in _FOLDED_NORMALISATIONS:
        raise DictionaryError(f"{where}: normalize_activations={cfg['normalize_activations']!r} is applied at run time; only folded norms are supported")
    d_in, d_sae = _positive_int(cfg, "d_in", where), _positive_int(cfg, "d_sae", where)
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = int(cfg.get("k") or kwargs.get("k") or 1)
    tensors = read_weights(folder / SAELENS_WEIGHTS)
    ours = _saelens_tensors(arch, tensors, bool(cfg.get("apply_b_dec_to_input", True)), folder / SAELENS_WEIGHTS)
    config = DictionaryConfig(architecture=arch, d_in=d_in, n_latents=d_sae, k=min(k, d_sae))
    dictionary = from_tensors(dictionary_class(arch), config, ours, folder / SAELENS_WEIGHTS, buffers_optional=True)
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    dictionary.meta = {"format": "saelens", "hook": cfg.get("hook_name") or meta.get("hook_name"),
                       "model": cfg.get("model_name") or meta.get("model_name")}
    return dictionary


def _saelens_architecture(cfg: dict, where: Path) -> str:
    arch = str(cfg.get("architecture", "standard"))
    activation = cfg.get("activation_fn_str") or cfg.get("activation_fn")
    if arch == "standard" and activation == "topk":
        arch = "topk"
    if arch not in _SAELENS_ARCHITECTURES:
        raise DictionaryError(f"{where}: SAELens architecture {arch!r} is not supported (supported: {', '.join(_SAELENS_ARCHITECTURES)})")
    return _SAELENS_ARCHITECTURES[arch]


def _saelens_tensors(arch: str, t: dict, apply_b_dec: bool, where: Path) -> dict:
    names = {"relu": ["W_enc", "b_enc"], "topk": ["W_enc", "b_enc"], "jumprelu": ["W_enc", "b_enc", "threshold"],
             "gated": ["W_enc", "b_gate", "r_mag", "b_mag"]}[arch] + ["W_dec", "b_dec"]
    missing = [n for n in names if n not in t]
    if missing:
        raise DictionaryError(f"{where}: SAELens {arch} weights lack {', '.join(missing)}")
    ours = {n: t[n].float() for n in names}
    ours["W_enc"] = ours["W_enc"].t().contiguous()  # SAELens keeps W_enc as [d_in, d_sae]
    if arch == "jumprelu":  # ReLU(z) * 1[z > t] == z * 1[z > max(t, 0)]
        ours["threshold"] = ours["threshold"].clamp_min(0)
    if not apply_b_dec:  # our encoders subtract b_dec first; move it into the encoder biases
        shift = ours["W_enc"] @ ours["b_dec"]
        if arch == "gated":
            ours["b_gate"] = ours["b_gate"] + shift
            ours["b_mag"] = ours["b_mag"] + ours["r_mag"].exp() * shift
        else:
            ours["b_enc"] = ours["b_enc"] + shift
    return ours


def load_sparsify(folder: Path) -> Dictionary:
    where = folder / SPARSIFY_CONFIG
    cfg = read_json(where, "sparsify cfg.json", DictionaryError)
    t = read_weights(folder / SPARSIFY_WEIGHTS)
    if cfg.get("skip_connection") or "W_skip" in t:
        raise DictionaryError(f"{where}: sparsify coders with a skip connection (transcoders) are not supported")
    needed = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"]
    if missing := [n for n in needed if n not in t]:
        raise DictionaryError(f"{folder / SPARSIFY_WEIGHTS}: sparsify weights lack {', '.join(missing)}")
    m, d = t["encoder.weight"].shape
    if int(cfg.get("d_in", d)) != d:
        raise DictionaryError(f"{where}: d_in {cfg.get('d_in')} does not match encoder.weight {tuple(t['encoder.weight'].shape)}")
    k = _positive_int(cfg, "k", where)
    ours = {"W_enc": t["encoder.weight"].float(), "b_enc": t["encoder.bias"].float(),
            "W_dec": t["W_dec"].float(), "b_dec": t["b_dec"].float()}
    config = DictionaryConfig(architecture="topk", d_in=d, n_latents=m, k=min(k, m))
    dictionary = from_tensors(dictionary_class("topk"), config, ours, folder / SPARSIFY_WEIGHTS, buffers_optional=True)
    dictionary.meta = {"format": "sparsify", "hook": folder.name, "model": None}
    return dictionary


def _positive_int(cfg: dict, key: str, where: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise DictionaryError(f"{where}: field {key!r} must be a positive integer, got {value!r}")
    return value

