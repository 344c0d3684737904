"""Cross-layer transcoders (CLT): one encoder per layer, decoders from each layer to every later
MLP output (Ameisen et al. 2025, "Circuit Tracing", Anthropic; circuit-tracer's
`cross_layer_transcoder.py`).

For L layers with MLP inputs x_l [N, d_in] and outputs y_l [N, d_out]:
    z_l = W_enc[l] x_l + b_enc[l]            (no input shift, as per-layer transcoders)
    f_l = sigma(z_l)                          sparse, n_latents per layer
    y_hat_t = sum_{s <= t} f_s W_dec[s][:, t - s] + b_dec[t]
with W_dec[s]: [n_latents, L - s, d_out] (latent i of layer s writes to outputs s, s+1, ...).
Trained jointly on all layers: loss = sum_t |y_t - y_hat_t|^2 + the architecture's sparsity term
(`sae.crosslayer_train`). sigma is one of topk | batchtopk | jumprelu | relu, computed by the
same fused kernels (`workbench.kernels`) and JumpReLU pseudo-gradients
(`sae.dictionaries.jumprelu`) as the per-layer dictionaries.

Folder: `config.json` {"format_version": 1, "kind": "cross-layer-transcoder", "crosslayer":
CrossLayerConfig, "in_hooks", "out_hooks", "model", "cache", "metrics", ...} and
`weights.safetensors` (W_enc [L, m, d_in], b_enc [L, m], W_dec.{s} [m, L - s, d_out] (fewer with `reach`),
b_dec [L, d_out], and the architecture's thresholds / controller state), acting on raw
activations (training-time scales folded in). `sae.load(folder)` returns the CLT.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn

from sae.base import DictionaryError, gather_per_latent, relu_values
from workbench import seeding
from workbench.errors import ConfigError
from workbench.files import read_json, save_tensors_atomic, write_json_atomic
from workbench.kernels import SparseCodes, decode, encode_batch_topk, encode_threshold, encode_topk

KIND = "cross-layer-transcoder"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")


@dataclass(frozen=True)
class CrossLayerConfig:
    architecture: str = "topk"
    """Sparsity of every layer's latents: topk | batchtopk | jumprelu | relu."""
    n_layers: int = 0
    """Layers (encoders); layer s decodes to the outputs of layers s .. n_layers - 1."""
    d_in: int = 0
    """Width of each layer's input (the MLP input hook)."""
    d_out: int = 0
    """Width of each layer's output (the MLP output hook)."""
    n_latents: int = 0
    """Latents per layer (total n_layers * n_latents)."""
    k: int = 32
    """topk: active latents per token per layer; batchtopk: their mean; jumprelu/relu: the L0
    target per layer when target_l0 is 0."""
    target_l0: float = 0.0
    """jumprelu/relu: per-layer L0 the sparsity controller steers to; 0 means k."""
    bandwidth: float = 0.05
    """jumprelu: width of the threshold pseudo-gradient's rectangle kernel."""
    controller_rate: float = 0.02
    """jumprelu/relu: step of the L0 controller per step, per unit of relative L0 error."""
    l1_coef: float = 5.0
    """relu: starting lambda of the L1 penalty sum_i f_i |d_i| (|d_i| over all its decoders)."""
    aux_k: int = 0
    """topk/batchtopk: dead latents per token fitting each layer's residual (AuxK); 0: d_out // 2."""
    aux_coef: float = 1 / 32
    """AuxK loss coefficient."""
    threshold_momentum: float = 0.01
    """batchtopk: eta of each layer's running inference threshold."""
    reach: int = 0
    """Output layers each latent writes to, from its own: 0 means every later one (a CLT);
    1 gives per-layer transcoders trained side by side (the baseline a CLT is compared with)."""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"cross-layer transcoders support {', '.join(ARCHITECTURES)}, got {self.architecture!r}"
            )
        for name in ("n_layers", "d_in", "d_out", "n_latents", "reach"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.k <= 0 or (self.n_latents and self.k > self.n_latents):
            raise ConfigError(f"k must be in [1, n_latents], got {self.k} for {self.n_latents} latents")
        if self.bandwidth <= 0 or not 0 < self.threshold_momentum <= 1:
            raise ConfigError("bandwidth must be > 0 and threshold_momentum in (0, 1]")
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{field.name} must be finite, got {value}")

    @property
    def effective_target_l0(self) -> float:
        return self.target_l0 or float(self.k)

    @property
    def effective_aux_k(self) -> int:
        return min(self.aux_k or max(1, self.d_out // 2), self.n_latents)

    def span(self, source_layer: int) -> int:
        """How many output layers (source_layer, source_layer + 1, ...) its latents write to."""
        left = self.n_layers - source_layer
        return min(left, self.reach) if self.reach else left

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "CrossLayerConfig":
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in obj.items() if k in names})
        except TypeError as exc:
            raise ConfigError(f"cross-layer config: {exc}") from None


class CrossLayerTranscoder(nn.Module):
    """See the module docstring. `meta`: in_hooks, out_hooks, model, metrics of a loaded folder."""

    def __init__(self, config: CrossLayerConfig, generator: Optional[torch.Generator] = None):
        super().__init__()
        c = config
        if min(c.n_layers, c.d_in, c.d_out, c.n_latents) <= 0:
            raise ConfigError(
                f"a cross-layer transcoder needs n_layers, d_in, d_out and n_latents > 0, got "
                f"{c.n_layers}, {c.d_in}, {c.d_out}, {c.n_latents}"
            )
        self.config = config
        self.meta: dict = {}
        generator = generator or seeding.generator(0, "init", "cross-layer", c.architecture)
        L, m = c.n_layers, c.n_latents
        w_enc = torch.randn(L, m, c.d_in, generator=generator)
        self.W_enc = nn.Parameter(w_enc / w_enc.norm(dim=-1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(L, m))
        decoders = []
        for s in range(L):  # same-layer part random unit rows, later layers start at zero
            w = torch.zeros(m, c.span(s), c.d_out)
            same = torch.randn(m, c.d_out, generator=generator)
            w[:, 0] = same / same.norm(dim=-1, keepdim=True)
            decoders.append(nn.Parameter(w))
        self.W_dec = nn.ParameterList(decoders)
        self.b_dec = nn.Parameter(torch.zeros(L, c.d_out))
        if c.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((L, m), c.bandwidth))
            self.register_buffer("multiplier", torch.full((L,), 0.5))
        elif c.architecture == "batchtopk":
            self.register_buffer("threshold", torch.zeros(L))
            self.register_buffer("threshold_updates", torch.zeros(L, dtype=torch.long))
        elif c.architecture == "relu":
            self.register_buffer("l1_scale", torch.ones(L))

    # --- the API attribution graphs use ------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def n_latents(self) -> int:
        """Latents per layer."""
        return self.config.n_latents

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def in_hooks(self) -> list:
        """The hook each layer's encoder reads (TransformerLens names), or Nones if unknown."""
        return list(self.meta.get("in_hooks") or [None] * self.n_layers)

    @property
    def out_hooks(self) -> list:
        """The hook each layer's output is predicted at, or Nones if unknown."""
        return list(self.meta.get("out_hooks") or [None] * self.n_layers)

    def decoder(self, source_layer: int, target_layer: int) -> Float[Tensor, "n_latents d_out"]:
        """[n_latents, d_out]: what latents of `source_layer` write into `target_layer`'s output
        (a view; zeros beyond the config's reach)."""
        self._check_layer(source_layer)
        self._check_layer(target_layer)
        if target_layer < source_layer:
            raise DictionaryError(
                f"cross-layer transcoder: layer {source_layer} writes only to layers >= itself, "
                f"not {target_layer}"
            )
        if target_layer - source_layer >= self.config.span(source_layer):
            return self.W_dec[source_layer].new_zeros(self.n_latents, self.config.d_out)
        return self.W_dec[source_layer][:, target_layer - source_layer]

    def pre_activations(self, layer: int, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "N n_latents"]:
        """Dense z = W_enc[layer] x + b_enc[layer]; an active latent's activation equals its z."""
        self._check_layer(layer)
        return self._rows(x) @ self.W_enc[layer].t() + self.b_enc[layer]

    def encode(self, layer: int, x: Float[Tensor, "... d_in"]) -> SparseCodes:
        """The latents of `layer` on the rows of x (leading dims flattened), as SparseCodes."""
        self._check_layer(layer)
        return self._encode(layer, self._rows(x))

    def predict(self, xs: list) -> list:
        """[y_hat_0, ..., y_hat_{L-1}], each [N, d_out], from the layers' inputs xs (each [N, d_in])."""
        if len(xs) != self.n_layers:
            raise DictionaryError(f"predict: {len(xs)} inputs for {self.n_layers} layers")
        return self.decode_all([self.encode(s, x) for s, x in enumerate(xs)])

    def forward(self, xs: list) -> list:
        return self.predict(xs)

    def decode_all(self, codes: list) -> list:
        """Outputs of every layer from each layer's codes (one sparse decode per source layer)."""
        outputs = [self.b_dec[t].expand(codes[0].n_rows, -1) for t in range(self.n_layers)]
        for s, f in enumerate(codes):
            w = self.W_dec[s]
            flat = decode(f, w.reshape(self.n_latents, -1)).view(f.n_rows, w.shape[1], -1)
            for t in range(s, s + w.shape[1]):
                outputs[t] = outputs[t] + flat[:, t - s]
        return outputs

    # --- internals --------------------------------------------------------------------------
    def _encode(self, layer: int, x: Tensor) -> SparseCodes:
        W, b, c = self.W_enc[layer], self.b_enc[layer], self.config
        if c.architecture == "topk":
            return relu_values(encode_topk(x, W, b, c.k))
        if c.architecture == "batchtopk":
            if int(self.threshold_updates[layer]) == 0:  # never trained: select over the batch
                return relu_values(encode_batch_topk(x, W, b, c.k))
            return encode_threshold(x, W, b, self.threshold[layer].expand(self.n_latents))
        if c.architecture == "jumprelu":
            return encode_threshold(x, W, b, self.threshold[layer].detach())
        return encode_threshold(x, W, b, torch.zeros_like(b))

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise DictionaryError(f"cross-layer transcoder: no layer {layer} (it has {self.n_layers})")

    def _rows(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.config.d_in or not x.is_floating_point():
            raise DictionaryError(
                f"cross-layer transcoder: input has shape {tuple(x.shape)} ({x.dtype}), "
                f"expected floating [..., {self.config.d_in}]"
            )
        return x.reshape(-1, self.config.d_in).to(self.W_enc.dtype)

    def latent_decoder_norms(self, layer: int) -> Tensor:
        """[n_latents]: |d_i| over all of the latent's decoders (every target layer together)."""
        return self.W_dec[layer].flatten(1).norm(dim=1)

    def latent_scale(self, layer: int, codes: SparseCodes) -> Tensor:
        return gather_per_latent(self.latent_decoder_norms(layer), codes)

    @torch.no_grad()
    def fold_scales(self, in_scales: list, out_scales: list) -> None:
        """Make a CLT trained on x_l * in_scales[l] -> y_t * out_scales[t] act on raw x, y."""
        for s in range(self.n_layers):
            self.W_enc[s] *= in_scales[s]
            for t in range(s, s + self.W_dec[s].shape[1]):
                self.W_dec[s][:, t - s] /= out_scales[t]
        for t in range(self.n_layers):
            self.b_dec[t] /= out_scales[t]


@torch.no_grad()
def from_per_layer(transcoders: list) -> CrossLayerTranscoder:
    """Per-layer transcoders (one Dictionary per layer, ascending, same architecture, k, widths;
    no skip) as a CLT of reach 1 with the same outputs, so the all-MLPs-replaced eval and the
    CLT API apply to them alike. Raises DictionaryError for a set that does not fit."""
    first = transcoders[0]
    c = first.config
    if any(d.config != c for d in transcoders) or c.skip or not c.is_transcoder:
        raise DictionaryError(
            "from_per_layer takes transcoders of one architecture, k and width, without skip"
        )
    if c.architecture not in ARCHITECTURES:
        raise DictionaryError(f"from_per_layer: {c.architecture!r} is not a cross-layer architecture")
    config = CrossLayerConfig(
        architecture=c.architecture,
        n_layers=len(transcoders),
        d_in=c.d_in,
        d_out=c.d_out,
        n_latents=c.n_latents,
        k=c.k,
        reach=1,
    )
    clt = CrossLayerTranscoder(config)
    for layer, d in enumerate(transcoders):
        clt.W_enc[layer].copy_(d.W_enc)
        clt.b_enc[layer].copy_(d.b_enc)
        clt.W_dec[layer][:, 0].copy_(d.W_dec)
        clt.b_dec[layer].copy_(d.b_dec)
        if c.architecture in ("jumprelu", "batchtopk"):
            clt.threshold[layer].copy_(d.threshold)
        if c.architecture == "batchtopk":
            clt.threshold_updates[layer] = d.threshold_updates
    clt.meta = {
        "in_hooks": [d.meta.get("hook") for d in transcoders],
        "out_hooks": [d.meta.get("out_hook") for d in transcoders],
    }
    return clt


def refuse_cross_layer(obj, where, use: str) -> None:
    """One-line DictionaryError when `obj` is a cross-layer transcoder given to `use` (e.g.
    "workbench analyze"), which takes per-layer dictionaries."""
    if isinstance(obj, CrossLayerTranscoder):
        raise DictionaryError(
            f"{where}: a cross-layer transcoder; {use} takes per-layer transcoders "
            "(`workbench eval` scores it with every MLP replaced)"
        )


def save(clt: CrossLayerTranscoder, folder: str | Path, **fields) -> Path:
    """Write the CLT's folder (weights, then config.json last: its presence marks it complete)."""
    folder = Path(folder)
    tensors = {name: t.detach().cpu().contiguous() for name, t in clt.state_dict().items()}
    save_tensors_atomic(folder / WEIGHTS, tensors, metadata={"format": "workbench", "kind": KIND})
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "architecture": clt.architecture,
        "crosslayer": clt.config.to_json(),
        "in_hooks": clt.in_hooks,
        "out_hooks": clt.out_hooks,
        **{k: v for k, v in clt.meta.items() if k not in ("in_hooks", "out_hooks")},
        **fields,
    }
    write_json_atomic(folder / CONFIG, meta)
    return folder


def is_crosslayer_folder(meta: dict) -> bool:
    return meta.get("kind") == KIND


def load(folder: str | Path) -> CrossLayerTranscoder:
    """The CLT saved in `folder`. Raises DictionaryError (one line naming the file) for an unknown
    format_version, a bad config, or tensors whose names or shapes do not fit."""
    from sae.weights import read_weights

    folder = Path(folder)
    meta = read_json(folder / CONFIG, "cross-layer transcoder config", DictionaryError)
    if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") != KIND:
        raise DictionaryError(
            f"{folder / CONFIG}: not a cross-layer transcoder of format_version {FORMAT_VERSION} "
            f"(kind {meta.get('kind')!r}, format_version {meta.get('format_version')!r})"
        )
    try:
        config = CrossLayerConfig.from_json(meta.get("crosslayer") or {})
        clt = CrossLayerTranscoder(config)
    except ConfigError as exc:
        raise DictionaryError(f"{folder / CONFIG}: {exc}") from None
    tensors = read_weights(folder / WEIGHTS)
    expected = clt.state_dict()
    if set(tensors) != set(expected):
        raise DictionaryError(
            f"{folder / WEIGHTS}: tensors do not fit a {config.architecture} cross-layer transcoder "
            f"(missing {sorted(set(expected) - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - set(expected))})"
        )
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise DictionaryError(
                f"{folder / WEIGHTS}: {name} has shape {tuple(t.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    clt.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    clt.meta = {k: v for k, v in meta.items() if k != "crosslayer"}
    for key in ("in_hooks", "out_hooks"):
        hooks = meta.get(key)
        if hooks is not None and (not isinstance(hooks, list) or len(hooks) != config.n_layers):
            raise DictionaryError(
                f"{folder / CONFIG}: {key} must list {config.n_layers} hooks, got {hooks!r}"
            )
    return clt
