"""Checking an attribution graph against the real model: feature ablations and predicted effects.

`ablate_feature_effect` removes a_s W_dec[s] from its layer's MLP output at its position in the
UNFROZEN model (real attention patterns, LayerNorm scales and MLPs downstream) and returns the
change of a target logit at the last position. `predicted_effects` gives the graph's prediction
of that change for every active feature, two ways:
- "direct": −A[target, s], the edge alone;
- "total": −a_s v_s, with v = M[target, F] (I − M_FF)^-1 over the features, M[t, j] = A[t, j] / a_j
  the effect of one unit of j's activation: downstream active features respond linearly (their
  activation moves with their pre-activation z, as TopK/ReLU/JumpReLU latents do while active),
  attention and norms stay frozen. This is the graph's own total effect (its (I − A)^-1 paths).
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuits.graph_edges import Attribution
from circuits.replacement import FrozenSystem


def unfrozen_logits(system: FrozenSystem, edits: dict[int, Tensor] | None = None) -> Tensor:
    """[P, V] logits of the real model on the system's prompt, with `edits` {layer: [P, d]} added
    to each layer's MLP output (attention and norms recomputed)."""
    g, edits = system.model, edits or {}
    tokens = system.clean.tokens
    with torch.no_grad():
        r = g.embed(tokens[None])[0]
        P = tokens.shape[0]
        for layer in range(system.shape.n_layers):
            heads, _ = g.heads(layer, r.expand(3, system.shape.n_heads, P, -1)[:, :, None])
            mid = r + heads.sum(0)[0]
            out = g.mlp(layer, mid) if system.has_mlp else torch.zeros_like(mid)
            r = mid + out + edits.get(layer, 0)
        return g.unembed(r[None])[0]


def feature_ablation(system: FrozenSystem, layer: int, position: int, feature: int, target: int) -> float:
    """Change of logit `target` at the last position when feature (layer, position, feature)'s
    write a W_dec[feature] is removed from the real model's MLP output."""
    a = system.clean.activations[layer][position, feature]
    edit = torch.zeros_like(system.clean.embed)
    edit[position] = -a * system.transcoders[layer].W_dec[feature].to(edit.dtype)
    after = unfrozen_logits(system, {layer: edit})[-1, target]
    return float(after - system.clean.logits[-1, target])


def ablate_feature_effect(
    model, transcoders, prompt, layer: int, position: int, feature: int, target: int
) -> float:
    """The real change of logit `target` (last position) when the feature's decoder contribution is
    removed from layer `layer`'s MLP output at `position` in the unfrozen model (contract API)."""
    from circuits.graphs import graph_model, prompt_tokens, transcoder_layers

    graph = graph_model(model)
    tokens, _, _ = prompt_tokens(model, prompt)
    system = FrozenSystem(graph, tokens, transcoder_layers(model, transcoders))
    return feature_ablation(system, layer, position, feature, target)


def replacement_ablation(
    system: FrozenSystem, layer: int, position: int, feature: int, target: int, real_final_norm: bool = True
) -> float:
    """The graph's own total effect, with the real final LayerNorm: the frozen replacement model
    (patterns and σ of every other norm fixed, errors fixed, active features responding linearly
    to their pre-activation, inactive ones off) run with the feature's write removed, its final
    residual put through the unfrozen ln_f; the change of logit `target` at the last position.
    With real_final_norm=False (ln_f frozen too) it equals predicted_effects(..., "total") (tested)."""
    g, clean = system.model, system.clean
    with torch.no_grad():

        def final(ablate: bool) -> Tensor:
            r = clean.embed
            for ell in range(system.shape.n_layers):
                mid = r + system.attention(ell, r)
                write = clean.errors[ell]
                if ell in system.transcoders:
                    x_hat = system.transcoder_input(mid, clean.ln2_scale[ell])
                    a = system.pre_activations(ell, x_hat) * (clean.activations[ell] != 0)
                    if ablate and ell == layer:
                        a[position, feature] = 0
                    write = write + a @ system.transcoders[ell].W_dec.to(a.dtype)
                r = mid + system.mlp_write(ell, mid, write)
            if real_final_norm:
                return g.unembed(r[None])[0][-1, target]
            return (system.norm(r, clean.lnf_scale, g.ln_f) @ g.W_U)[-1, target]

        return float(final(True) - final(False))


def predicted_effects(
    attribution: Attribution, target_row: int, kind: str = "total", system: FrozenSystem | None = None
) -> Tensor:
    """[F] the graph's predicted change of target row `target_row`'s input when each feature is
    ablated (module docstring). Uses the kept entries: exact when every entry was kept.
    kind "total+norm" (a logit row; needs `system`): "total" plus the first-order response of the
    final LayerNorm's scale σ, which the graph freezes: with K = logit − b_ln_f·W_U[:, t] and
    c the centred final residual, Δlogit ≈ Δ_frozen − K Δσ/σ, Δσ/σ = c·Δr / (d σ²), Δr's
    functional propagated through the same graph."""
    adjacency, nodes = attribution.adjacency, attribution.nodes
    F = nodes.n_features
    row_is_target = adjacency.rows == target_row
    direct = torch.zeros(nodes.n, dtype=adjacency.values.dtype)
    direct[adjacency.cols[row_is_target]] = adjacency.values[row_is_target]
    if kind == "direct":
        return -direct[:F]
    if kind not in ("total", "total+norm"):
        raise ValueError(f"kind must be 'direct', 'total' or 'total+norm', got {kind!r}")
    total = _through_features(attribution, direct[:F])
    if kind == "total":
        return total
    if system is None or target_row < nodes.logit_start:
        raise ValueError("'total+norm' needs the FrozenSystem and a logit row")
    scale = _through_features(attribution, _scale_row(system, nodes)[:F])
    token = int(nodes.targets[target_row - nodes.logit_start])
    clean = system.clean
    K = clean.logits[-1, token] - system.model.ln_f[1] @ system.model.W_U[:, token]
    return total - float(K.detach()) * scale


def _through_features(attribution: Attribution, direct: Tensor) -> Tensor:
    """[F] −a_s v_s with v = direct/a (I − M_FF)^-1: the total effect of ablating each feature on a
    quantity whose direct edges from the features are `direct` [F]."""
    adjacency, nodes = attribution.adjacency, attribution.nodes
    F = nodes.n_features
    a = nodes.activations.to(direct.dtype)
    among = (adjacency.rows < F) & (adjacency.cols < F)
    rows, cols = adjacency.rows[among], adjacency.cols[among]
    per_unit = adjacency.values[among] / a[cols]  # M_FF
    v = direct / a
    total, current = v.clone(), v
    for _ in range(10_000):
        current = torch.zeros_like(v).index_add_(0, cols, current[rows] * per_unit)
        if not current.any():
            break
        total += current
    return -a * total


def _scale_row(system: FrozenSystem, nodes) -> Tensor:
    """[n] direct effects of every source on Δσ/σ of the final LayerNorm at the last position."""
    from circuits.graph_edges import padded_writes, row_entries

    r = system.clean.resid_final[-1]
    c = r - r.mean()
    cot = torch.zeros(1, *system.clean.embed.shape, dtype=r.dtype, device=r.device)
    cot[0, -1] = c / (c.numel() * (c.pow(2).mean() + system.shape.eps))
    with torch.no_grad():
        g_embed, g_writes = system.pull_back(cot, system.shape.n_layers, final_norm=False)
        padded = {layer: padded_writes(system, nodes, layer) for layer in system.clean.activations}
        return row_entries(system, nodes, padded, system.shape.n_layers, g_embed, g_writes)[0]


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(v: Tensor) -> Tensor:
        order = v.double().argsort()
        r = torch.empty_like(order, dtype=torch.float64)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # ties share their mean rank
            same = v == value
            if same.sum() > 1:
                r[same] = r[same].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-30))
