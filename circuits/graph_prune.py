"""Influence and pruning of an attribution graph, as circuit-tracer defines them.

The adjacency A is sparse: A[t, s] = direct effect of source node s on target node t (rows are
targets, as in circuit-tracer's `Graph.adjacency_matrix`). Nodes are ordered [features, errors,
embeddings, logits]. Definitions (safety-research/circuit-tracer `graph.py`):
- normalised adjacency Â = |A| with each row divided by its L1 norm (here the norm of the whole
  row, including entries a row did not keep: `Adjacency.row_abs`);
- influence of the logits on every node: w Â + w Â² + ... = w ((I − Â)^-1 − I), w the target
  probabilities on the logit nodes (A is a DAG: the sum ends after at most n_layers + 2 terms);
- nodes are kept by cumulative influence share up to `node_threshold` (embeddings and logits
  always), edges of the graph restricted to kept nodes by cumulative edge score
  Â_pruned[t, s] · (influence_t + w_t) up to `edge_threshold`; then features and errors without a
  kept outgoing edge, and features without a kept incoming edge, are dropped until nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Adjacency:
    """Sparse direct effects over n nodes: entries (rows[j], cols[j], values[j])."""

    n: int
    rows: Tensor  # [nnz] long, target node
    cols: Tensor  # [nnz] long, source node
    values: Tensor  # [nnz] signed direct effect
    row_abs: Tensor  # [n] Σ_s |A[t, s]| over ALL sources of row t (kept or not)
    remainder: Tensor  # [n] signed Σ of the entries a row did not keep (0 when it kept all)

    def incoming(self) -> Tensor:
        """[n] Σ_s A[t, s] over every source (kept entries + remainder)."""
        return (
            torch.zeros(self.n, dtype=self.values.dtype).index_add_(0, self.rows, self.values)
            + self.remainder
        )

    def dense(self) -> Tensor:
        """[n, n] dense A (kept entries only); for small graphs and tests."""
        out = torch.zeros(self.n, self.n, dtype=self.values.dtype)
        out[self.rows, self.cols] = self.values
        return out


def propagate(rows: Tensor, cols: Tensor, values: Tensor, start: Tensor, max_steps: int = 1000) -> Tensor:
    """Σ_{k ≥ 1} start Â^k for the sparse Â (rows, cols, values): mass flows from targets to sources."""
    total = torch.zeros_like(start)
    current = start
    for _ in range(max_steps):
        current = torch.zeros_like(start).index_add_(0, cols, current[rows] * values)
        if not current.any():
            return total
        total += current
    raise RuntimeError("influence did not converge: the adjacency has a cycle")


def normalised(adjacency: Adjacency, row_abs: Tensor | None = None) -> Tensor:
    """Â's values: |A[t, s]| / Σ_s |A[t, s]| (the row norm given, else the whole row's)."""
    norms = adjacency.row_abs if row_abs is None else row_abs
    return adjacency.values.abs() / norms[adjacency.rows].clamp_min(1e-10)


def node_influence(adjacency: Adjacency, logit_weights: Tensor) -> Tensor:
    """[n] influence of the weighted logits on each node (0 on the logits themselves)."""
    return propagate(adjacency.rows, adjacency.cols, normalised(adjacency), logit_weights)


def find_threshold(scores: Tensor, threshold: float) -> Tensor:
    """The smallest score kept when keeping the top scores up to `threshold` of their sum."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    index = min(
        int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=cumulative.dtype))), len(ordered) - 1
    )
    return ordered[index]


def cumulative_share(influence: Tensor) -> Tensor:
    """[n] each node's cumulative influence share in descending order (the first node's own share
    .. 1): a node is kept at threshold τ iff its share is at most the first share ≥ τ."""
    ordered, order = influence.sort(descending=True)
    out = torch.zeros_like(influence)
    out[order] = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    return out


@dataclass
class Pruned:
    node_mask: Tensor  # [n] bool
    edge_mask: Tensor  # [nnz] bool over the adjacency's entries
    influence: Tensor  # [n] node influence (unnormalised)
    cumulative: Tensor  # [n] cumulative influence share (the JSON's "influence")


def prune(
    adjacency: Adjacency,
    logit_weights: Tensor,
    n_features: int,
    n_fixed: int,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Pruned:
    """Keep nodes and edges as circuit-tracer's `prune_graph` does. `n_fixed`: the trailing
    embedding + logit nodes, always kept; nodes [n_features, n − n_fixed) are the errors."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    n, rows, cols = adjacency.n, adjacency.rows, adjacency.cols
    influence = node_influence(adjacency, logit_weights)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[n - n_fixed :] = True
    alive = node_mask[rows] & node_mask[cols]
    kept_abs = torch.zeros(n, dtype=adjacency.values.dtype).index_add_(
        0, rows, adjacency.values.abs() * alive
    )
    pruned_values = normalised(adjacency, kept_abs) * alive
    pruned_influence = propagate(rows, cols, pruned_values, logit_weights) + logit_weights
    scores = pruned_values * pruned_influence[rows]
    edge_mask = alive & (scores >= find_threshold(scores[alive], edge_threshold)) if alive.any() else alive
    while True:
        before = node_mask.clone()
        edge_mask &= node_mask[rows] & node_mask[cols]
        has_out = torch.zeros(n, dtype=torch.bool)
        has_out[cols[edge_mask]] = True
        has_in = torch.zeros(n, dtype=torch.bool)
        has_in[rows[edge_mask]] = True
        node_mask[: n - n_fixed] &= has_out[: n - n_fixed]
        node_mask[:n_features] &= has_in[:n_features]
        if torch.equal(before, node_mask):
            break
    return Pruned(node_mask, edge_mask, influence, cumulative_share(influence))


def graph_scores(adjacency: Adjacency, logit_weights: Tensor, errors: slice, embeddings: slice) -> dict:
    """circuit-tracer's `compute_graph_scores`: replacement score = share of the embeddings'
    influence against embeddings + errors; completeness = influence-weighted share of each node's
    normalised input that does not come from error nodes."""
    influence = node_influence(adjacency, logit_weights)
    token, error = influence[embeddings].sum(), influence[errors].sum()
    replacement = float(token / (token + error).clamp_min(1e-30))
    values = normalised(adjacency)
    is_error = (adjacency.cols >= errors.start) & (adjacency.cols < errors.stop)
    from_errors = torch.zeros(adjacency.n, dtype=values.dtype).index_add_(
        0, adjacency.rows, values * is_error
    )
    weight = influence + logit_weights
    completeness = float(((1 - from_errors) * weight).sum() / weight.sum().clamp_min(1e-30))
    return {"replacement_score": replacement, "completeness": completeness}
