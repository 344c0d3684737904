"""The local replacement model of one prompt: MLPs -> transcoder features + error, the rest frozen.

For a prompt, every MLP that has a transcoder is written as

    MLP_ℓ(x) = Σ_i a_i W_dec[i] + b_dec + x̂ W_skip^T + err_ℓ,      err_ℓ = MLP_ℓ(x) − transcoder_ℓ(x̂)

where x̂ is what the transcoder reads (TransformerLens `blocks.ℓ.ln2.hook_normalized`, i.e. the
residual centred and divided by the LayerNorm scale, *before* the LN weight and bias: checked
on the demo model's TransformerBridge, where that hook equals (x − mean)/σ to 0.0 and differs from
the LN output by 0.75). Attention patterns and every LayerNorm's σ are frozen at their clean
values, so attention and LayerNorm become affine maps of the residual stream. With the feature
activations a_i and the errors err_ℓ held as constant *sources*, every node input (a feature's
pre-activation z = W_enc x̂ + b_enc [− W_enc shift for an SAE; a gated transcoder's
magnitude path, `linear_encoder`], a target logit) is an affine
function of the source writes: the embeddings [P, d] and the per-layer MLP-output writes
[L, P, d]. `FrozenSystem` is that function; at the clean writes it reproduces the logits exactly.
(Ameisen et al. 2025, "Circuit tracing", transformer-circuits.pub; circuit-tracer's
`ReplacementModel` does the same with hooks.) With `zero_bos` the BOS position (0) has no
feature activations (transcoders are trained with BOS rows skipped, so its latents are noise);
their write stays in that position's error, err_ℓ[0] = MLP_ℓ(x)[0] − b_dec − x̂[0] W_skip^T.
Layers without a transcoder keep their whole MLP
output as the error write, and a model without MLPs (d_mlp 0) has embeddings and logits only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.transformer import GraphTransformer
from workbench.errors import WorkbenchError


def encoder_shift(dictionary) -> Tensor | None:
    """The vector a dictionary's encoder subtracts from its input: b_dec for an SAE (our encoders
    act on x − b_dec), None for a transcoder (`Dictionary.encoder_shift`)."""
    if hasattr(dictionary, "encoder_shift"):
        return dictionary.encoder_shift
    return getattr(dictionary, "b_dec", None)


def linear_encoder(dictionary) -> tuple[Tensor, Tensor]:
    """(W [n_latents, d_in], b [n_latents]) with z = x̂ W^T + b the dictionary's pre-activation
    (`Dictionary.pre_activations`, the encoder shift folded into b): W_enc, b_enc for TopK /
    BatchTopK / JumpReLU / ReLU / Matryoshka / choice; for a gated dictionary its magnitude path
    (W_mag = exp(r_mag) W_gate, b_mag), the value an active latent takes while its gate is open.
    Raises WorkbenchError (one line) for a dictionary with no linear pre-activation (a codebook)."""
    name = getattr(dictionary, "architecture", type(dictionary).__name__)
    W = getattr(dictionary, "W_enc", None)
    if W is not None and getattr(dictionary, "r_mag", None) is not None and hasattr(dictionary, "b_mag"):
        W, b = W * dictionary.r_mag.exp()[:, None], dictionary.b_mag  # gated: the magnitude path
    else:
        b = getattr(dictionary, "b_enc", None)
    if W is None or b is None:
        raise WorkbenchError(
            f"attribution graphs need transcoders whose features are a linear pre-activation "
            f"W_enc x + b_enc; a {name} dictionary has none"
        )
    shift = encoder_shift(dictionary)
    return W, (b if shift is None else b - W @ shift)


def skip_weight(dictionary) -> Tensor | None:
    """W_skip [d_out, d_in] of a skip transcoder, else None."""
    return getattr(dictionary, "W_skip", None)


@dataclass
class CleanRun:
    """What the clean forward pass fixes (P positions, L layers, H heads, d = d_model)."""

    tokens: Tensor  # [P]
    embed: Tensor  # [P, d] token + position embedding
    ln1_scale: Tensor  # [L, P, 1] σ of each attention LayerNorm
    ln2_scale: Tensor  # [L, P, 1] σ of each MLP LayerNorm
    lnf_scale: Tensor  # [P, 1]
    patterns: Tensor  # [L, H, P, P]
    mlp_in: Tensor  # [L, P, d] what each transcoder reads (x̂)
    mlp_out: Tensor  # [L, P, d] the true MLP output
    activations: dict[int, Tensor]  # layer -> [P, n_latents] dense feature activations
    errors: Tensor  # [L, P, d] true MLP output − transcoder output (whole MLP without transcoder)
    logits: Tensor  # [P, V] the model's logits
    resid_final: Tensor  # [P, d] the residual stream before ln_f


class FrozenSystem:
    """The prompt's frozen-attention, frozen-norm affine system (see the module docstring).

    `model` is a GraphTransformer (float64 copies for precise checks: `FrozenSystem(..., dtype=)`),
    `transcoders` {layer: Dictionary} reading x̂ of that layer and writing its MLP output.
    """

    def __init__(
        self,
        model: GraphTransformer,
        tokens: Tensor,
        transcoders: dict[int, object],
        dtype: torch.dtype | None = None,
        zero_bos: bool = False,
    ):
        self.zero_bos = bool(zero_bos)
        """True: position 0 (BOS) has no feature activations; its transcoders' whole output
        (their latents' write included) is that position's error, so the logits stay exact."""
        if dtype is not None and dtype != model.dtype:
            model = copy.deepcopy(model).to(dtype)
        transcoders = {  # copies where the model computes, in its dtype (the caller's stay put)
            layer: d
            if (d.W_dec.device, d.W_dec.dtype) == (model.device, model.dtype)
            else copy.deepcopy(d).to(model.device, model.dtype)
            for layer, d in transcoders.items()
        }
        self.model, self.transcoders = model, transcoders
        self.encoders = {layer: linear_encoder(d) for layer, d in transcoders.items()}
        """{layer: (W [n_latents, d_in], b [n_latents])}: each feature's input z = x̂ W^T + b."""
        self.shape = model.shape
        self.has_mlp = bool(model.shape.d_mlp)
        with torch.no_grad():
            self.clean = self._clean_run(tokens.to(model.device).long())

    # --- the clean pass ------------------------------------------------------------------
    def _scale(self, x: Tensor) -> Tensor:
        if not self.shape.layer_norm:
            return torch.ones_like(x[..., :1])
        centred = x - x.mean(-1, keepdim=True)
        return (centred.pow(2).mean(-1, keepdim=True) + self.shape.eps).sqrt()

    def _clean_run(self, tokens: Tensor) -> CleanRun:
        g, L, P = self.model, self.shape.n_layers, tokens.shape[0]
        embed = g.embed(tokens[None])[0]
        r = embed
        ln1, ln2, patterns, mlp_in, mlp_out, errors, acts = [], [], [], [], [], [], {}
        zeros = torch.zeros_like(embed)
        for layer in range(L):
            ln1.append(self._scale(r))
            qkv = r.expand(3, self.shape.n_heads, P, -1)[:, :, None]  # [3, H, 1, P, d]
            heads, pattern = g.heads(layer, qkv)
            patterns.append(pattern[0])
            mid = r + heads.sum(0)[0]
            ln2.append(self._scale(mid))
            x_hat = self.transcoder_input(mid, ln2[-1])
            mlp_in.append(x_hat)
            out = g.mlp(layer, mid) if self.has_mlp else zeros
            mlp_out.append(out)
            error = out
            if layer in self.transcoders:
                acts[layer] = self.activations_of(layer, x_hat)
                if self.zero_bos:
                    acts[layer][0] = 0  # BOS: its latents' write goes to the error below
                error = out - self._transcoder_out(layer, x_hat, acts[layer])
            errors.append(error)
            r = mid + out
        return CleanRun(
            tokens,
            embed,
            torch.stack(ln1),
            torch.stack(ln2),
            self._scale(r),
            torch.stack(patterns),
            torch.stack(mlp_in),
            torch.stack(mlp_out),
            acts,
            torch.stack(errors),
            g.unembed(r[None])[0],
            r,
        )

    def activations_of(self, layer: int, x_hat: Tensor) -> Tensor:
        """[P, n_latents] dense activations of the layer's transcoder on x̂ [P, d]."""
        return self.transcoders[layer].encode(x_hat).to_dense().to(x_hat.dtype)

    def pre_activations(self, layer: int, x_hat: Tensor) -> Tensor:
        """[..., n_latents] z = W_enc (x̂ − shift) + b_enc, the input of a feature node (for
        TopK/ReLU/JumpReLU-style encoders an active latent's activation equals z; gated: the
        magnitude path, `linear_encoder`)."""
        W, b = self.encoders[layer]
        return x_hat @ W.T + b

    def check_features(self) -> None:
        """Refuse, in one line (WorkbenchError), transcoders the graph cannot treat as linear
        nodes: where `linear_encoder`'s z differs from the dictionary's own `pre_activations` on
        the prompt, or an active latent's activation differs from its z (the graph's edges sum
        to z; a feature whose activation is another function of z is no linear node)."""
        with torch.no_grad():
            for layer in self.clean.activations:
                self._check_layer(layer)

    def _check_layer(self, layer: int) -> None:
        tol = 1e-3 if self.model.dtype in (torch.float32, torch.float64) else 5e-2
        d, x_hat, acts = self.transcoders[layer], self.clean.mlp_in[layer], self.clean.activations[layer]
        z = self.pre_activations(layer, x_hat)
        name = getattr(d, "architecture", type(d).__name__)
        scale = 1.0 + float(z.abs().max()) if z.numel() else 1.0
        if hasattr(d, "pre_activations"):
            try:
                own = d.pre_activations(x_hat).to(z.dtype)
            except (WorkbenchError, AttributeError, NotImplementedError) as error:
                raise WorkbenchError(
                    f"layer {layer}'s {name} transcoder gives no pre-activations: {error}"
                ) from None
            if float((own - z).abs().max()) > tol * scale:
                raise WorkbenchError(
                    f"layer {layer}'s {name} transcoder: its pre-activations are not W_enc x + b_enc; "
                    "attribution graphs cannot take it"
                )
        active = acts != 0
        if bool(active.any()) and float((acts - z)[active].abs().max()) > tol * scale:
            raise WorkbenchError(
                f"layer {layer}'s {name} transcoder: an active feature's activation is not its "
                "pre-activation, so its edges would not sum to it; attribution graphs cannot take it"
            )

    def _transcoder_out(self, layer: int, x_hat: Tensor, acts: Tensor) -> Tensor:
        d = self.transcoders[layer]
        out = acts @ d.W_dec + d.b_dec
        skip = skip_weight(d)
        return out if skip is None else out + x_hat @ skip.T

    def transcoder_input(self, mid: Tensor, scale: Tensor) -> Tensor:
        """x̂: the residual centred and divided by the (frozen) LN scale, before its weight and
        bias (= TransformerLens `ln2.hook_normalized`); the residual itself without LayerNorm."""
        if not self.shape.layer_norm:
            return mid
        return (mid - mid.mean(-1, keepdim=True)) / scale

    # --- the frozen affine system ----------------------------------------------------------
    def feature_writes(self) -> Tensor:
        """[L, P, d] Σ_i a_i W_dec[i] per layer and position (zero where no transcoder)."""
        writes = torch.zeros_like(self.clean.errors)
        for layer, acts in self.clean.activations.items():
            writes[layer] = acts @ self.transcoders[layer].W_dec
        return writes

    def source_writes(self) -> tuple[Tensor, Tensor]:
        """(embed [P, d], MLP writes [L, P, d] = feature writes + errors) at the clean point."""
        return self.clean.embed, self.feature_writes() + self.clean.errors

    def norm(self, x: Tensor, scale: Tensor, params: Tensor) -> Tensor:
        """A LayerNorm with its σ frozen at `scale` (affine in x); x itself without LayerNorm."""
        if not self.shape.layer_norm:
            return x
        return (x - x.mean(-1, keepdim=True)) / scale * params[0] + params[1]

    def attention(self, layer: int, r: Tensor) -> Tensor:
        """The layer's attention output [Q, d] from the residual [Q, d], patterns and σ frozen."""
        g, Q = self.model, r.shape[-2]
        normed = self.norm(r, self.clean.ln1_scale[layer, :Q], g.ln1[layer])
        v = torch.einsum("pd,hde->hpe", normed, g.W_QKV[layer, 2]) + g.b_QKV[layer, 2][:, None]
        z = self.clean.patterns[layer, :, :Q, :Q] @ v  # [H, Q, dh]
        return torch.einsum("hpe,hed->pd", z, g.W_O[layer]) + g.b_O[layer]

    def mlp_write(self, layer: int, mid: Tensor, write: Tensor) -> Tensor:
        """What the layer's MLP adds: the source write + b_dec + the skip term (transcoder
        layers), the source write alone elsewhere."""
        d = self.transcoders.get(layer)
        if d is None:
            return write
        out = write + d.b_dec
        skip = skip_weight(d)
        if skip is not None:
            out = out + self.transcoder_input(mid, self.clean.ln2_scale[layer, : mid.shape[-2]]) @ skip.T
        return out

    def run(self, embed: Tensor, writes: Tensor, stop: int) -> Tensor:
        """The frozen system from the source writes (embed [Q, d], writes [≥ stop, Q, d] of the
        layers before `stop`) up to layer `stop`'s transcoder input x̂ [Q, d]; stop = n_layers:
        the final residual after ln_f (weight and bias included) [Q, d]. Affine in the writes.
        Q ≤ P: the first Q positions (attention is causal, so a prefix is its own system)."""
        r, Q = embed, embed.shape[-2]
        for layer in range(stop):
            mid = r + self.attention(layer, r)
            r = mid + self.mlp_write(layer, mid, writes[layer])
        if stop == self.shape.n_layers:
            return self.norm(r, self.clean.lnf_scale[:Q], self.model.ln_f)
        mid = r + self.attention(stop, r)
        return self.transcoder_input(mid, self.clean.ln2_scale[stop, :Q])

    def logits(self, embed: Tensor, writes: Tensor) -> Tensor:
        """[P, V] logits of the frozen system."""
        return self.run(embed, writes, self.shape.n_layers) @ self.model.W_U

    # --- its transpose ---------------------------------------------------------------------
    def _norm_t(self, g: Tensor, scale: Tensor, weight: Tensor | None) -> Tensor:
        """Transpose of the frozen norm's linear part (centre, divide by σ, times weight)."""
        if not self.shape.layer_norm:
            return g
        g = g / scale if weight is None else g * weight / scale
        return g - g.mean(-1, keepdim=True)

    def _attention_t(self, layer: int, g: Tensor) -> Tensor:
        """[B, Q, d] -> [B, Q, d]: transpose of the frozen attention's linear part."""
        m, Q = self.model, g.shape[-2]
        gz = torch.einsum("bqd,hed->bhqe", g, m.W_O[layer])
        gv = torch.einsum("hqk,bhqe->bhke", self.clean.patterns[layer, :, :Q, :Q], gz)
        gn = torch.einsum("bhke,hde->bkd", gv, m.W_QKV[layer, 2])
        return self._norm_t(gn, self.clean.ln1_scale[layer, :Q], m.ln1[layer, 0])

    def pull_back(self, cotangent: Tensor, stop: int, final_norm: bool = True) -> tuple[Tensor, Tensor]:
        """The transpose of `run(·, ·, stop)`'s linear part, batched: cotangents [B, Q, d] on its
        output -> (gradient on embed [B, Q, d], on the writes [B, stop, Q, d]). The hand-written
        twin of `torch.func.vmap(vjp(run))` (tested equal; about 2x faster on the CPU).
        final_norm=False (stop = n_layers): cotangents on the final residual, before ln_f."""
        Q, L = cotangent.shape[-2], self.shape.n_layers
        if stop == L and not final_norm:
            g = cotangent
        elif stop == L:
            g = self._norm_t(cotangent, self.clean.lnf_scale[:Q], self.model.ln_f[0])
        else:
            g = self._norm_t(cotangent, self.clean.ln2_scale[stop, :Q], None)
            g = g + self._attention_t(stop, g)
        writes = []
        for layer in reversed(range(stop)):
            writes.append(g)
            skip = skip_weight(self.transcoders[layer]) if layer in self.transcoders else None
            if skip is not None:
                g = g + self._norm_t(g @ skip.to(g.dtype), self.clean.ln2_scale[layer, :Q], None)
            g = g + self._attention_t(layer, g)
        if not writes:
            return g, g.new_zeros(g.shape[0], 0, *g.shape[1:])
        return g, torch.stack(writes[::-1], 1)
