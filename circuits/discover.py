"""One call for every method: `discover(model, task, method=...)` -> scores, a circuit, its JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor

from circuits.acdc import acdc_scores
from circuits.attribution import (
    ablated_outputs,
    eap_ig_activation_scores,
    eap_ig_input_scores,
    eap_scores,
    exact_scores,
    node_of_receiver,
    node_scores,
)
from circuits.codes import circuit_of_heads, code_scores, edge_scores_of_heads, kept_heads
from circuits.config import METHODS
from circuits.evaluate import mask_of_edges, top_edges
from circuits.graph import Circuit, Edge, Node
from circuits.tasks import Task, TaskError
from circuits.transformer import GraphTransformer


@dataclass
class Discovery:
    method: str
    scores: Tensor
    """[edges] estimated change of the task score when the edge is ablated (ACDC: largest τ kept)."""
    kept: Tensor
    """[edges] bool: the circuit."""
    seconds: float
    heads: dict[str, float] | None = None
    """Head-level methods (codes): the score of every head."""

    def mask(self, model: GraphTransformer) -> Tensor:
        return mask_of_edges(model, self.kept)


def discover(
    model: GraphTransformer,
    task: Task,
    method: str = "eap-ig",
    *,
    ablation: str = "resample",
    steps: int = 8,
    batch_size: int = 64,
    n_edges: int = 0,
) -> Discovery:
    """Score every edge with `method`; the circuit keeps the `n_edges` highest |scores| (default:
    5% of the edges, at least 5), for ACDC the edges surviving the median swept threshold, and
    for discrete codes (a head-level method) the edges among heads scoring at least half the best."""
    if method not in METHODS:
        raise TaskError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    started = time.perf_counter()
    ablated = ablated_outputs(model, task, ablation)
    n_edges = n_edges or max(5, len(model.graph.edges) // 20)
    if method == "codes":
        heads = code_scores(model, task)
        return Discovery(
            method,
            edge_scores_of_heads(model, heads),
            circuit_of_heads(model, kept_heads(heads)),
            time.perf_counter() - started,
            heads,
        )
    if method == "acdc":
        scores, masks = acdc_scores(model, task, ablated)
        taus = sorted(masks)
        kept = scores >= taus[len(taus) // 2]
    else:
        scores = {
            "exact": lambda: exact_scores(model, task, ablated, batch_size),
            "eap": lambda: eap_scores(model, task, ablated, batch_size),
            "eap-ig": lambda: eap_ig_input_scores(model, task, ablated, steps, batch_size),
            "eap-ig-activations": lambda: eap_ig_activation_scores(model, task, ablated, steps, batch_size),
        }[method]()
        kept = top_edges(scores, n_edges)
    return Discovery(method, scores, kept, time.perf_counter() - started)


def to_circuit(model: GraphTransformer, task: Task, found: Discovery, metrics: dict | None = None) -> Circuit:
    """The graph as a circuit JSON: heads/MLPs/embed/logits nodes with Σ|edge score|, every edge."""
    totals = {**node_scores(model, found.scores), **(found.heads or {})}
    kept_nodes = set()
    edges = []
    for (s, r), score, keep in zip(model.graph.edges, found.scores.tolist(), found.kept.tolist()):
        receiver = model.graph.receivers[r]
        source, target = model.graph.sources[s], node_of_receiver(receiver)
        edges.append(
            Edge(
                source,
                target,
                float(score),
                bool(keep),
                receiver.rsplit(".", 1)[1] if receiver != target else "",
            )
        )
        if keep:
            kept_nodes |= {source, target}
    nodes = []
    for name in [*model.graph.sources, "logits"]:
        kind, layer = _kind_and_layer(name, model.shape.n_layers)
        nodes.append(Node(name, kind, layer, name, totals.get(name, 0.0), name in kept_nodes))
    return Circuit(nodes, edges, task=task.name, method=found.method, metrics=metrics or {})


def _kind_and_layer(name: str, n_layers: int) -> tuple[str, int]:
    if name == "embed":
        return "embed", 0
    if name == "logits":
        return "logits", n_layers + 1
    layer = int(name[1:].split(".")[0])
    return ("head" if name.startswith("a") else "mlp"), layer + 1
