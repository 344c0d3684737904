"""Read dictionaries saved by SAELens and sparsify, giving the outputs those libraries give.

A peer folder loads only if every tensor in it is used and every config field that changes the
outputs is either in cfg.json or has a default the peer itself documents (its config
dataclasses). Such a default is applied and listed in `dictionary.meta["defaulted"]`
({field: value}); a field with no documented default, a value we cannot reproduce, or a tensor
the architecture does not use is a one-line DictionaryError naming the folder and the field or
tensor. Nothing is dropped or guessed silently.

SAELens folder: `cfg.json` + `sae_weights.safetensors`, W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_enc, b_dec; "architecture" standard | topk | jumprelu (+ threshold) | gated (b_gate, r_mag,
b_mag, W_enc as the gate). Inference: z = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc;
standard f = ReLU(z), topk f = ReLU(TopK_k(z · n)) with n = |W_dec rows| when
rescale_acts_by_decoder_norm (decoded as f / n), jumprelu f = ReLU(z) * 1[z > threshold].
Documented defaults (`SAEConfig`, `TopKSAEConfig`): apply_b_dec_to_input True,
normalize_activations "none", k 100, rescale_acts_by_decoder_norm False; d_in and d_sae have none.
Configs older than 6.0 (no sae_lens_version, or below 6) are read as SAELens reads them
(`handle_pre_6_0_config`): architecture defaults to "standard", "activation_fn_str"/"activation_fn"
"topk" with "activation_fn_kwargs" k means architecture topk, a boolean normalize_activations means
"expected_average_only_in" / "none", and a `scaling_factor` tensor (the finetuning scaling of
the latents) is folded into W_dec, or ignored when it is all ones. Activation normalisation is
supported where it is folded (none, expected_average_only_in); run-time normalisations are
refused. reshape_activations needs nothing: our `hook_z` activations are already flattened
heads-major, as SAELens flattens them.

SAELens transcoder folders (architecture transcoder, skip_transcoder, jumprelu_transcoder,
jumprelu_skip_transcoder) and circuit-tracer's per-layer transcoder files are read by
`sae.peers_transcoders` (`load_circuit_tracer`, `load_transcoder_set`, re-exported here).

sparsify folder: `cfg.json` + `sae.safetensors`, encoder.weight [m, d], encoder.bias, W_dec
[m, d], b_dec; f = TopK_k(ReLU(encoder(x - b_dec))), x_hat = f @ W_dec + b_dec. Documented
defaults (`SparseCoderConfig`): activation "topk", k 32, num_latents 0 (then m = d_in *
expansion_factor, default 32), skip_connection False, transcode False; d_in has none.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sae.base import Dictionary, DictionaryError, dictionary_class
from sae.config import DictionaryConfig
from sae.peers_transcoders import (  # noqa: F401  (re-exported: sae.peers.load_transcoder_set)
    CIRCUIT_TRACER_SUFFIXES,
    SAELENS_TRANSCODERS,
    load_circuit_tracer,
    load_saelens_transcoder,
    load_transcoder_set,
)
from sae.weights import from_tensors, read_weights
from workbench.files import read_json

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"

_SAELENS_ARCHITECTURES = {
    "standard": "relu",
    "relu": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
}
_SAELENS_TENSORS = {
    "relu": ("W_enc", "b_enc"),
    "topk": ("W_enc", "b_enc"),
    "jumprelu": ("W_enc", "b_enc", "threshold"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag"),
}
_FOLDED_NORMALISATIONS = ("none", "expected_average_only_in")
_REQUIRED = object()


class _Fields:
    """One peer cfg.json, read field by field: a missing field takes the default the peer
    documents (recorded in `defaulted`) or, with none documented, is refused."""

    def __init__(self, values: dict, where: Path, peer: str):
        self.values, self.where, self.peer = values, where, peer
        self.defaulted: dict = {}

    def error(self, text: str) -> DictionaryError:
        return DictionaryError(f"{self.where}: {text}")

    def get(self, name: str, default=_REQUIRED):
        if name in self.values:
            return self.values[name]
        if default is _REQUIRED:
            raise self.error(f"field {name!r} is missing, and {self.peer} documents no default for it")
        self.defaulted[name] = default
        return default

    def positive_int(self, name: str, default=_REQUIRED) -> int:
        value = self.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.error(f"field {name!r} must be a positive integer, got {value!r}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise self.error(f"field {name!r} must be true or false, got {value!r}")
        return value


def load_saelens(folder: Path) -> Dictionary:
    """The SAELens folder as a dictionary whose `encode` and forward give SAELens's latents and
    reconstructions. `.meta`: format, hook, model, defaulted ({field: documented default used}).

    Raises DictionaryError (one line naming the folder) for a missing field without a documented
    default, an unsupported architecture or normalisation, a missing tensor, or a tensor the
    architecture does not use (SAELens refuses those too)."""
    cfg = _Fields(
        read_json(folder / SAELENS_CONFIG, "SAELens cfg.json", DictionaryError),
        folder / SAELENS_CONFIG,
        "SAELens",
    )
    legacy = _saelens_major_version(cfg) < 6
    if cfg.values.get("architecture") in SAELENS_TRANSCODERS:  # transcoders: sae.peers_transcoders
        _saelens_normalisation(cfg, legacy)
        return load_saelens_transcoder(cfg, cfg.values["architecture"], folder, SAELENS_WEIGHTS)
    arch, label, k = _saelens_architecture(cfg, legacy)
    _saelens_normalisation(cfg, legacy)
    d_in, d_sae = cfg.positive_int("d_in"), cfg.positive_int("d_sae")
    if arch == "topk":
        k = k if k is not None else cfg.positive_int("k", 100)
        if k > d_sae:
            raise cfg.error(f"k={k} exceeds d_sae={d_sae}")
    apply_b_dec = cfg.flag("apply_b_dec_to_input", True)
    rescale = arch == "topk" and cfg.flag("rescale_acts_by_decoder_norm", False)
    scaling = cfg.values.get("finetuning_scaling_factor") is True
    weights = folder / SAELENS_WEIGHTS
    ours = _saelens_tensors(arch, label, read_weights(weights), folder, apply_b_dec, rescale, scaling)
    config = DictionaryConfig(architecture=arch, d_in=d_in, n_latents=d_sae, k=k or 1)  # k: read by topk only
    dictionary = from_tensors(dictionary_class(arch), config, ours, weights, buffers_optional=True)
    meta = cfg.values.get("metadata") or cfg.values.get("meta") or {}
    meta = meta if isinstance(meta, dict) else {}
    dictionary.meta = {
        "format": "saelens",
        "hook": cfg.values.get("hook_name") or meta.get("hook_name"),
        "model": cfg.values.get("model_name") or meta.get("model_name"),
        "defaulted": cfg.defaulted,
    }
    return dictionary


def _saelens_major_version(cfg: _Fields) -> int:
    meta = cfg.values.get("metadata")
    version = cfg.values.get("sae_lens_version") or (
        meta.get("sae_lens_version") if isinstance(meta, dict) else None
    )
    if not version:
        return 0  # SAELens reads a config without a version as one from before 6.0
    match = re.match(r"\s*(\d+)\.", str(version))
    if match is None:
        raise cfg.error(f"sae_lens_version {version!r} is not a version number")
    return int(match.group(1))


def _saelens_architecture(cfg: _Fields, legacy: bool) -> tuple[str, str, int | None]:
    """(our architecture, SAELens's label, k when the config gives it the pre-6.0 way)."""
    label = cfg.get("architecture", "standard") if legacy else cfg.get("architecture")
    k = None
    activation = cfg.values.get("activation_fn_str", cfg.values.get("activation_fn"))
    if legacy and activation not in (None, "relu"):  # 6.0 and later ignore these fields
        kwargs = cfg.values.get("activation_fn_kwargs") or {}
        if activation != "topk" or label not in ("standard", "topk"):
            raise cfg.error(f"activation_fn {activation!r} with architecture {label!r} is not supported")
        if not isinstance(kwargs, dict) or kwargs.get("k") is None:
            raise cfg.error(
                "activation_fn 'topk' without activation_fn_kwargs.k (SAELens documents no default for it)"
            )
        label, k = "topk", kwargs["k"]
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise cfg.error(f"activation_fn_kwargs.k must be a positive integer, got {k!r}")
    if label not in _SAELENS_ARCHITECTURES:
        raise cfg.error(
            f"SAELens architecture {label!r} is not supported "
            f"(supported: {', '.join(_SAELENS_ARCHITECTURES)})"
        )
    return _SAELENS_ARCHITECTURES[label], label, k


def _saelens_normalisation(cfg: _Fields, legacy: bool) -> None:
    norm = cfg.get("normalize_activations", "none")
    if legacy and isinstance(norm, bool):  # how SAELens reads pre-6.0 booleans
        norm = "expected_average_only_in" if norm else "none"
    if legacy and norm is None:
        norm = cfg.defaulted["normalize_activations"] = "none"
    if norm not in _FOLDED_NORMALISATIONS:
        raise cfg.error(
            f"normalize_activations={norm!r} is not supported: only norms folded into the weights are "
            f"({', '.join(_FOLDED_NORMALISATIONS)})"
        )


def _saelens_tensors(
    arch: str, label: str, t: dict, folder: Path, apply_b_dec: bool, rescale: bool, scaling: bool
) -> dict:
    names = [*_SAELENS_TENSORS[arch], "W_dec", "b_dec"]
    where = folder / SAELENS_WEIGHTS
    if missing := [n for n in names if n not in t]:
        raise DictionaryError(f"{where}: SAELens {label} weights lack {', '.join(missing)}")
    if unused := sorted(set(t) - set(names) - {"scaling_factor"}):
        raise DictionaryError(
            f"{folder}: cfg.json says architecture {label!r}, but {SAELENS_WEIGHTS} also holds "
            f"{', '.join(map(repr, unused))}, which a SAELens {label} SAE does not use; refusing to drop it"
        )
    ours = {n: t[n].float() for n in names}
    if "scaling_factor" in t:  # latents scaled before decoding: f @ (s * W_dec) == (f * s) @ W_dec
        s = t["scaling_factor"].float()
        if not torch.equal(s, torch.ones_like(s)):
            if not scaling:
                raise DictionaryError(
                    f"{folder}: {SAELENS_WEIGHTS} holds scaling_factor (not all ones), "
                    "but cfg.json does not set finetuning_scaling_factor"
                )
            if s.shape != ours["W_dec"].shape[:1]:
                raise DictionaryError(
                    f"{where}: scaling_factor has shape {tuple(s.shape)}, "
                    f"expected {tuple(ours['W_dec'].shape[:1])}"
                )
            ours["W_dec"] = ours["W_dec"] * s[:, None]
    ours["W_enc"] = ours["W_enc"].t().contiguous()  # SAELens keeps W_enc as [d_in, d_sae]
    if rescale:  # TopK of z * n, decoded as f / n: fold n into the encoder and out of the decoder
        n = ours["W_dec"].norm(dim=1)
        ours["W_enc"], ours["b_enc"], ours["W_dec"] = (
            ours["W_enc"] * n[:, None],
            ours["b_enc"] * n,
            ours["W_dec"] / n[:, None],
        )
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
    """The sparsify folder (one hookpoint's `cfg.json` + `sae.safetensors`) as a topk dictionary
    giving sparsify's latents and reconstructions. `.meta`: format, hook (the folder's name),
    model (None), defaulted ({field: documented default used}).

    Raises DictionaryError (one line naming the folder) for a missing d_in, an unsupported
    activation, skip connection or transcoder, widths that disagree with the tensors, a missing
    tensor, or a tensor a sparse autoencoder does not use."""
    cfg = _Fields(
        read_json(folder / SPARSIFY_CONFIG, "sparsify cfg.json", DictionaryError),
        folder / SPARSIFY_CONFIG,
        "sparsify",
    )
    where = folder / SPARSIFY_WEIGHTS
    t = read_weights(where)
    d = cfg.positive_int("d_in")
    if (activation := cfg.get("activation", "topk")) != "topk":
        raise cfg.error(f"activation {activation!r} is not supported (only 'topk')")
    if cfg.flag("skip_connection", False):
        raise cfg.error("sparsify coders with a skip connection (transcoders) are not supported")
    if cfg.flag("transcode", False):
        raise cfg.error(
            "transcode=true: a transcoder predicts another hook's output; only autoencoders are supported"
        )
    m = cfg.get("num_latents", 0)
    if m == 0:
        m = d * cfg.positive_int("expansion_factor", 32)
    if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
        raise cfg.error(f"field 'num_latents' must be a non-negative integer, got {m!r}")
    k = cfg.positive_int("k", 32)
    if k > m:
        raise cfg.error(f"k={k} exceeds the {m} latents")
    needed = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"]
    if missing := [n for n in needed if n not in t]:
        raise DictionaryError(f"{where}: sparsify weights lack {', '.join(missing)}")
    if unused := sorted(set(t) - set(needed)):
        raise DictionaryError(
            f"{folder}: {SPARSIFY_WEIGHTS} holds {', '.join(map(repr, unused))}, "
            "which a sparsify autoencoder without skip connection does not use; refusing to drop it"
        )
    if tuple(t["encoder.weight"].shape) != (m, d):
        raise DictionaryError(
            f"{folder}: encoder.weight is {tuple(t['encoder.weight'].shape)}, but cfg.json gives "
            f"{m} latents x d_in {d}{' (num_latents defaulted)' if 'num_latents' in cfg.defaulted else ''}"
        )
    ours = {
        "W_enc": t["encoder.weight"].float(),
        "b_enc": t["encoder.bias"].float(),
        "W_dec": t["W_dec"].float(),
        "b_dec": t["b_dec"].float(),
    }
    config = DictionaryConfig(architecture="topk", d_in=d, n_latents=m, k=k)
    dictionary = from_tensors(dictionary_class("topk"), config, ours, where, buffers_optional=True)
    dictionary.meta = {"format": "sparsify", "hook": folder.name, "model": None, "defaulted": cfg.defaulted}
    return dictionary
