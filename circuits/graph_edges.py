"""Direct-effect edges of an attribution graph, by batched back-propagation through the frozen system.

Nodes (order fixed here, used by pruning and the JSON): active features (layer, position, id)
sorted by layer, position, id; error nodes (layer, position) for every layer with an MLP;
token-embedding nodes (position); logit targets. The targets (rows) are the features and logits.

Edge s -> t = the contribution of s's write to t's input through the frozen linear system only
(`circuits.replacement.FrozenSystem`: residual, frozen attention OV and norms, transcoder skip
paths; other features are fixed sources). For the targets whose inputs read layer ℓ (features
of layer ℓ; the logits read layer n_layers) the frozen map from the source writes of layers < ℓ
to x̂_ℓ is linearised once (`torch.func.vjp`) and its pull-back is `vmap`-ped over a batch of
cotangents (W_enc[i] at the feature's position; W_U[:, token] at the last position). With G the
gradient at a layer's MLP-output write: edge(feature s) = a_s G[ℓ_s, p_s] · W_dec[s], edge(error)
= G[ℓ, p] · err[ℓ, p], edge(embedding) = G_embed[p] · embed[p]. Since the system is affine, each
target's input = Σ of its incoming edges + its bias (the system with every source write zero).

Memory: each batch's rows are dense over the nodes ([batch, n_nodes]) and then cut to the
`edges_per_target` (default 1024) largest |weights| per row; the dropped entries' signed sum
and every entry's |weight| are recorded per row (`Adjacency.remainder`, `.row_abs`), so the sums
above and the pruning's row normalisation stay exact. The influence, though, flows only through the kept
entries: with a cut, a node reached through many small edges gets less influence than in the
whole graph, and pruning may keep fewer nodes (`edges_per_target=None` keeps every entry: exact
influence, memory up to features² in the worst case). Nothing of size features² is formed with a cut.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.graph_prune import Adjacency
from circuits.replacement import FrozenSystem


@dataclass
class NodeTable:
    """The graph's nodes (P positions, L layers)."""

    features: Tensor  # [F, 3] long (layer, position, latent id)
    activations: Tensor  # [F]
    error_layers: list[int]  # layers with an MLP (each has P error nodes)
    n_positions: int
    targets: Tensor  # [T] token ids of the logit nodes

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def embed_start(self) -> int:
        return self.n_features + len(self.error_layers) * self.n_positions

    @property
    def logit_start(self) -> int:
        return self.embed_start + self.n_positions

    @property
    def n(self) -> int:
        return self.logit_start + len(self.targets)

    def error_index(self, layer: int, position: int) -> int:
        return self.error_start + self.error_layers.index(layer) * self.n_positions + position


def node_table(system: FrozenSystem, targets: Tensor) -> NodeTable:
    rows, acts = [], []
    for layer in sorted(system.clean.activations):
        a = system.clean.activations[layer]
        position, latent = a.nonzero(as_tuple=True)  # row-major: sorted by position, then id
        rows.append(torch.stack([torch.full_like(position, layer), position, latent], 1))
        acts.append(a[position, latent])
    P = system.clean.tokens.shape[0]
    features = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)
    activations = torch.cat(acts) if acts else torch.zeros(0, dtype=system.clean.embed.dtype)
    layers = list(range(system.shape.n_layers)) if system.has_mlp else []
    return NodeTable(features.cpu(), activations.cpu(), layers, P, targets.cpu())


@dataclass
class Attribution:
    nodes: NodeTable
    adjacency: Adjacency
    inputs: Tensor  # [n] each target's input (z or logit) at the clean point; 0 for non-targets
    biases: Tensor  # [n] each target's input with every source write zero


def target_cotangents(system: FrozenSystem, nodes: NodeTable, rows: Tensor, layer: int, Q: int) -> Tensor:
    """[B, Q, d] the gradient of each target's input with respect to x̂_layer (or ln_f's output)
    over the first Q positions."""
    out = torch.zeros(
        len(rows), Q, system.shape.d_model, dtype=system.clean.embed.dtype, device=system.clean.embed.device
    )
    batch = torch.arange(len(rows))
    if layer == system.shape.n_layers:
        token = nodes.targets[rows - nodes.logit_start].to(out.device)
        out[batch, Q - 1] = system.model.W_U[:, token].T.to(out.dtype)
    else:
        f = nodes.features[rows]
        out[batch, f[:, 1]] = system.encoders[layer][0][f[:, 2].to(out.device)].to(out.dtype)
    return out


def padded_writes(system: FrozenSystem, nodes: NodeTable, layer: int) -> tuple[Tensor, Tensor]:
    """([P, K, d] a_s W_dec[s] of the layer's active features per position, zero-padded;
    [P, K] their node index, −1 for padding)."""
    P, d = nodes.n_positions, system.shape.d_model
    in_layer = (nodes.features[:, 0] == layer).nonzero().flatten()
    pos = nodes.features[in_layer, 1]
    counts = torch.bincount(pos, minlength=P)
    K = int(counts.max()) if len(in_layer) else 0
    slot = torch.arange(len(in_layer)) - torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])[pos]
    index = torch.full((P, K), -1, dtype=torch.long)
    index[pos, slot] = in_layer
    device, dtype = system.clean.embed.device, system.clean.embed.dtype
    writes = torch.zeros(P, K, d, dtype=dtype, device=device)
    W_dec = system.transcoders[layer].W_dec if layer in system.transcoders else None
    if K:
        latent = nodes.features[in_layer, 2].to(device)
        writes[pos, slot] = nodes.activations[in_layer].to(device, dtype)[:, None] * W_dec[latent].to(dtype)
    return writes, index


def attribute(
    system: FrozenSystem, targets: Tensor, batch_size: int = 256, edges_per_target: int | None = 1024
) -> Attribution:
    """Every edge of the prompt's graph (see the module docstring). `edges_per_target` (default
    1024) entries with the largest |weight| are kept per target row; None keeps every nonzero
    entry. 1024, not 256: on a 64-token demo prompt 256 kept 125 nodes (replacement score 0.648),
    1024 kept 172 (0.676), None 201 (0.683); stored edges stay ≤ targets × 1024, and at 8,192
    features 1024 costs about a third more CPU time than 256 (README, `workbench bench graphs`)."""
    nodes = node_table(system, targets)
    n, L = nodes.n, system.shape.n_layers
    embed, writes = system.source_writes()
    padded = {layer: padded_writes(system, nodes, layer) for layer in system.clean.activations}
    rows_out, cols_out, vals_out = [], [], []
    row_abs = torch.zeros(n, dtype=embed.dtype)
    remainder, inputs, biases = (
        torch.zeros_like(row_abs),
        torch.zeros_like(row_abs),
        torch.zeros_like(row_abs),
    )
    for layer in range(L + 1):
        if layer == L:
            group = torch.arange(nodes.logit_start, n)
        else:
            group = (nodes.features[:, 0] == layer).nonzero().flatten()
        for start in range(0, len(group), batch_size):
            rows = group[start : start + batch_size]
            # targets are sorted by position and attention is causal: only the prefix matters
            Q = nodes.n_positions if layer == L else int(nodes.features[rows, 1].max()) + 1
            e, w = embed[:Q], writes[:layer, :Q]
            cot = target_cotangents(system, nodes, rows, layer, Q)
            with torch.no_grad():
                g_embed, g_writes = pull_back(system, layer, cot, e, w)
                dense = row_entries(system, nodes, padded, layer, g_embed, g_writes)
                inputs[rows], biases[rows] = _inputs(system, nodes, rows, layer, cot, e, w)
            _keep(dense, rows, edges_per_target, rows_out, cols_out, vals_out, row_abs, remainder)
    adjacency = Adjacency(
        n, torch.cat(rows_out), torch.cat(cols_out), torch.cat(vals_out), row_abs, remainder
    )
    return Attribution(nodes, adjacency, inputs, biases)


def pull_back(system: FrozenSystem, layer: int, cot: Tensor, embed: Tensor, writes: Tensor):
    """Gradients of the targets' x̂ (cotangents [B, Q, d]) on the source writes: the hand-written
    transpose, or with WORKBENCH_GRAPH_AUTOGRAD=1 its twin `vmap(vjp(FrozenSystem.run))`."""
    if os.environ.get("WORKBENCH_GRAPH_AUTOGRAD") == "1":
        with torch.enable_grad():
            _, pull = torch.func.vjp(lambda e, w: system.run(e, w, layer), embed, writes)
            return torch.func.vmap(pull)(cot)
    return system.pull_back(cot, layer)


def _inputs(system, nodes, rows, layer, cot, embed, writes) -> tuple[Tensor, Tensor]:
    """Targets' inputs with the given source writes and with all of them zero: cot · x + constant
    (b_enc − W_enc shift for a feature's z, `replacement.linear_encoder`; 0 for a logit, GPT-2 has
    no unembedding bias)."""
    with torch.no_grad():
        x = system.run(embed, writes, layer)
        x0 = system.run(torch.zeros_like(embed), torch.zeros_like(writes), layer)
    if layer == system.shape.n_layers:
        return (cot[:, -1] @ x[-1]).cpu(), (cot[:, -1] @ x0[-1]).cpu()
    W, b = system.encoders[layer]
    pos, latent = nodes.features[rows, 1].to(cot.device), nodes.features[rows, 2].to(cot.device)
    enc, const = W[latent].to(cot.dtype), b[latent].to(cot.dtype)
    return ((enc * x[pos]).sum(1) + const).cpu(), ((enc * x0[pos]).sum(1) + const).cpu()


def row_entries(system, nodes, padded, layer, g_embed, g_writes) -> Tensor:
    """[B, n] a batch of rows, dense over the nodes (sources of layers < `layer`, positions < Q)."""
    B, Q = g_embed.shape[:2]
    dense = torch.zeros(B, nodes.n + 1, dtype=g_embed.dtype, device=g_embed.device)  # last: padding
    dense[:, nodes.embed_start : nodes.embed_start + Q] = (g_embed * system.clean.embed[:Q]).sum(-1)
    for source in range(layer):
        if source in nodes.error_layers:
            start = nodes.error_index(source, 0)
            dense[:, start : start + Q] = (g_writes[:, source] * system.clean.errors[source, :Q]).sum(-1)
        if source in padded:
            writes, index = padded[source]
            if writes.shape[1]:
                values = torch.einsum("bpd,pkd->bpk", g_writes[:, source], writes[:Q]).reshape(B, -1)
                columns = torch.where(index[:Q] < 0, nodes.n, index[:Q]).flatten().to(dense.device)
                dense.index_copy_(1, columns, values)
    return dense[:, : nodes.n].cpu()


def _keep(dense, rows, per_row, rows_out, cols_out, vals_out, row_abs, remainder) -> None:
    magnitude = dense.abs()
    row_abs[rows] = magnitude.sum(1)
    if per_row is None or per_row >= dense.shape[1]:
        r, c = dense.nonzero(as_tuple=True)
        rows_out.append(rows[r])
        cols_out.append(c)
        vals_out.append(dense[r, c])
        return
    top = magnitude.topk(per_row, dim=1).indices
    kept = dense.gather(1, top)
    remainder[rows] = dense.sum(1) - kept.sum(1)
    nonzero = kept != 0
    rows_out.append(rows[:, None].expand_as(top)[nonzero])
    cols_out.append(top[nonzero])
    vals_out.append(kept[nonzero])
