"""Attention-output dictionaries, per head (Kissane, Krzyzanowski, Bloom, Conmy & Nanda 2024,
"Interpreting Attention Layer Outputs with Sparse Autoencoders", arXiv:2406.17759, section 3).

A dictionary trained at `blocks.L.attn.hook_z` reads the concatenated per-head outputs
z = [z_0, ..., z_{H-1}] (the adapter flattens hook_z to n_heads * d_head, head-major), so each
decoder row d_i splits into H blocks d_i^h of d_head each:

    weight-based head attribution:  norm_ih = |d_i^h|_2,  share_ih = norm_ih / sum_h' norm_ih'
                                    (the paper's "decoder weights distribution"; by Pythagoras
                                    sum_h norm_ih^2 = |d_i|^2)

Direct feature attribution by source position: z_h[q] = sum_s A_h[q, s] v_h[s] (A the attention
pattern after softmax, v the value vectors; a grouped-query model shares one v among
n_heads / n_kv_heads query heads), so the feature's encoder pre-activation at query q,
e_i . (z[q] - b_dec) + b_i (e_i the encoder row, b_i its bias), splits exactly into

    DFA[h, s] = A_h[q, s] * (v_h[s] . e_i^h),   pre_i(q) = sum_{h,s} DFA[h, s] + (b_i - e_i . b_dec).

The paper (and SAELens' dashboards) drop the bias term; it is kept here so the terms sum to the
pre-activation exactly. For a Gated SAE the linear map is the magnitude path
(e_i = exp(r_mag_i) W_gate_i, b_i = b_mag_i: the value the feature takes where its gate is open);
codebooks have no linear encoder and are refused.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae.base import Dictionary, DictionaryError

_HOOK_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


def attention_layer(hook: str | None) -> int | None:
    """The layer L of a `blocks.L.attn.hook_z` hook, else None (any other hook)."""
    match = _HOOK_Z.match(hook or "")
    return int(match.group(1)) if match else None


def n_heads_of(model) -> int:
    """The number of query heads of a workbench `Model` (the blocks hook_z concatenates)."""
    return int(model.bridge.cfg.n_heads)


class HeadSplit(NamedTuple):
    norms: Float[Tensor, "n_latents n_heads"]
    """|d_i^h|: the norm of each decoder row restricted to each head's d_head block."""
    shares: Float[Tensor, "n_latents n_heads"]
    """norms / their sum over heads (the paper's weight-based head attribution; rows sum to 1;
    0 for a zero row)."""


def head_split(W_dec: Float[Tensor, "n_latents d_in"], n_heads: int) -> HeadSplit:
    """Each decoder row's norm per head block (see the module docstring), in float64.
    Raises DictionaryError when d_in is not a multiple of `n_heads`."""
    n_latents, d_in = W_dec.shape
    if n_heads <= 0 or d_in % n_heads:
        raise DictionaryError(f"a hook_z dictionary of width {d_in} cannot split into {n_heads} heads")
    norms = W_dec.detach().double().reshape(n_latents, n_heads, d_in // n_heads).norm(dim=2)
    shares = norms / norms.sum(dim=1, keepdim=True).clamp_min(1e-300)
    return HeadSplit(norms, shares)


def heads_table(dictionary: Dictionary, n_heads: int) -> pa.Table:
    """The store's `heads` table: one row per (feature, head) with its norm and share."""
    split = head_split(dictionary.W_dec, n_heads)
    n = split.norms.shape[0]
    return pa.table(
        {
            "feature": np.repeat(np.arange(n, dtype=np.int32), n_heads),
            "head": np.tile(np.arange(n_heads, dtype=np.int16), n),
            "norm": split.norms.reshape(-1).float().cpu().numpy(),
            "share": split.shares.reshape(-1).float().cpu().numpy(),
        }
    )


def output_directions(directions: Float[Tensor, "n d_in"], model, layer: int) -> Float[Tensor, "n d_model"]:
    """hook_z directions mapped to what the attention layer writes: d W_O, with W_O [n_heads,
    d_head, d_model] flattened head-major like hook_z (on `directions`' device and dtype). Exact
    for models whose attention output enters the residual stream directly (GPT-2, Llama); Gemma's
    post-attention norm rescales it further. Raises DictionaryError for a width other than
    n_heads * d_head."""
    W_O = model.bridge.W_O[layer].detach()
    W_O = W_O.reshape(-1, W_O.shape[-1]).to(device=directions.device, dtype=directions.dtype)
    if directions.shape[1] != W_O.shape[0]:
        raise DictionaryError(f"hook_z directions of width {directions.shape[1]}, W_O takes {W_O.shape[0]}")
    return directions @ W_O


# --- direct feature attribution -----------------------------------------------------------
class LinearEncoder(NamedTuple):
    """pre = row . (z - b_dec) + bias: one feature's linear encoder (float64, on the CPU)."""

    row: Tensor
    bias: float
    b_dec: Tensor


def linear_encoder(dictionary: Dictionary, feature: int) -> LinearEncoder:
    """Feature `feature`'s encoder row, bias and the decoder bias the encoder subtracts.
    Raises DictionaryError for an unknown feature or a dictionary with no linear encoder."""
    if not 0 <= int(feature) < dictionary.n_latents:
        raise DictionaryError(f"feature {feature} is outside 0..{dictionary.n_latents - 1}")
    params = dict(dictionary.named_parameters())
    f = int(feature)
    if "r_mag" in params and "b_mag" in params:  # Gated: the magnitude path
        row = params["W_enc"][f] * params["r_mag"][f].exp()
        bias = params["b_mag"][f]
    elif "b_enc" in params and "W_enc" in params:
        row, bias = params["W_enc"][f], params["b_enc"][f]
    else:
        raise DictionaryError(
            f"{dictionary.architecture}: no linear encoder, so no direct feature attribution"
        )
    b_dec = params.get("b_dec")
    b_dec = torch.zeros_like(row) if b_dec is None else b_dec
    cpu = lambda t: t.detach().double().cpu()  # noqa: E731
    return LinearEncoder(cpu(row), float(bias.detach()), cpu(b_dec))


class Attribution(NamedTuple):
    """Direct feature attribution of one feature at one query position of one prompt."""

    terms: Float[Tensor, "n_heads n_source"]
    """DFA[h, s]: the part of the pre-activation that head h moves from source s (s <= position)."""
    bias: float
    """b_i - e_i . b_dec: the part no token carries."""
    pre_activation: float
    """e_i . (z[position] - b_dec) + b_i, from hook_z itself (the terms and bias sum to it)."""
    activation: float
    """The feature's activation at the position (the dictionary's encode)."""
    position: int
    """The query position attributed."""
    activations: list[float]
    """The feature's activation at every position of the prompt."""


@torch.no_grad()
def attention_inputs(model, tokens: Int[Tensor, " pos"], layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """(pattern [n_heads, pos, pos], values [pos, n_heads, d_head], z [pos, n_heads * d_head]) of
    `layer` on one prompt, float64 on the CPU; grouped-query values are repeated per query head."""
    names = [f"blocks.{layer}.attn.hook_{name}" for name in ("pattern", "v", "z")]
    captured: dict[str, Tensor] = {}

    def grab(name):
        def hook_fn(activation, hook=None):
            captured[name] = activation.detach()

        return hook_fn

    with model.hooks([(name, grab(name)) for name in names]):
        model(tokens.reshape(1, -1))
    pattern, values, z = (captured[name][0].double().cpu() for name in names)
    n_heads = pattern.shape[0]
    if values.shape[1] != n_heads:  # GQA: query head h reads key/value head h // (H / H_kv)
        values = values.repeat_interleave(n_heads // values.shape[1], dim=1)
    return pattern, values, z.reshape(z.shape[0], -1)


@torch.no_grad()
def direct_feature_attribution(
    model, dictionary: Dictionary, tokens: Int[Tensor, " pos"], feature: int, position: int | None = None
) -> Attribution:
    """Attribute `feature`'s pre-activation at `position` (default: where it is largest, the BOS
    excluded) of the prompt `tokens` to (head, source position) pairs (module docstring). The
    dictionary must be trained at `blocks.L.attn.hook_z`. Raises DictionaryError (another hook,
    no linear encoder, a bad feature or position)."""
    hook = str(dictionary.meta.get("hook") or "")
    layer = attention_layer(hook)
    if layer is None:
        raise DictionaryError(f"direct feature attribution needs a hook_z dictionary, not one at {hook!r}")
    tokens = tokens.reshape(-1)
    encoder = linear_encoder(dictionary, feature)
    pattern, values, z = attention_inputs(model, tokens, layer)
    if z.shape[1] != encoder.row.numel():
        raise DictionaryError(f"the dictionary has d_in={encoder.row.numel()}, {hook} has {z.shape[1]}")
    device = dictionary.W_dec.device
    acts = dictionary.encode(z.to(device=device, dtype=dictionary.W_dec.dtype)).to_dense()[:, int(feature)]
    acts = acts.float().cpu()
    if position is None:
        position = int(acts[1:].argmax()) + 1 if len(acts) > 1 else 0
    if not 0 <= position < len(tokens):
        raise DictionaryError(f"position {position} is outside the prompt's 0..{len(tokens) - 1}")
    n_heads = pattern.shape[0]
    e_heads = encoder.row.reshape(n_heads, -1)  # [n_heads, d_head]
    value_dot = torch.einsum("shd,hd->hs", values[: position + 1], e_heads)  # v_h[s] . e_i^h
    terms = pattern[:, position, : position + 1] * value_dot
    bias = encoder.bias - float(encoder.row @ encoder.b_dec)
    pre = float(encoder.row @ (z[position] - encoder.b_dec)) + encoder.bias
    return Attribution(terms, bias, pre, float(acts[position]), int(position), acts.tolist())
