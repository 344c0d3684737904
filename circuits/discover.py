"""One call for every method: `discover(model, task, method=...)` -> scores, a circuit, its JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
from circuits.codes import circuit_of_heads, code_scores, edge_scores_of_heads
from circuits.config import METHODS
from circuits.evaluate import circuit_faithfulness, faithful_prefix, mask_of_edges, ranking, top_edges
from circuits.graph import Circuit, Edge, Node
from circuits.search import FaithfulSearch, check_target, smallest_faithful
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
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(edges kept, faithfulness) of every circuit the size search evaluated, by size; empty for a
    fixed `n_edges`."""

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
    faithfulness_target: float = 0.8,
) -> Discovery:
    """Score every edge with `method` and pick the circuit: with `n_edges` > 0 the `n_edges`
    best-ranked edges; by default (0) the smallest prefix of the ranking whose faithfulness under
    `ablation` reaches `faithfulness_target` (circuits/search.py: O(log edges) forwards, its
    curve kept in `Discovery.curve`). Rankings: |score|; ACDC's largest surviving τ, ties broken
    by the drop the edge's removal caused; discrete codes (head-level) rank heads, the circuit of
    the k best heads being `circuit_of_heads` (heads scoring 0 never join). Raises TaskError for
    an unknown method or ablation, ConfigError for a target outside (0, 1]."""
    if method not in METHODS:
        raise TaskError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    check_target(faithfulness_target)
    started = time.perf_counter()
    ablated = ablated_outputs(model, task, ablation)
    if method == "codes":
        heads = code_scores(model, task)
        kept, curve = _head_circuit(model, task, heads, ablated, n_edges, faithfulness_target)
        return Discovery(
            method, edge_scores_of_heads(model, heads), kept, time.perf_counter() - started, heads, curve
        )
    tiebreak = None
    if method == "acdc":
        stop = None if n_edges else faithfulness_target  # only the smallest faithful circuit is needed
        scores, tiebreak, _ = acdc_scores(model, task, ablated, stop_at=stop)
    else:
        scores = {
            "exact": lambda: exact_scores(model, task, ablated, batch_size),
            "eap": lambda: eap_scores(model, task, ablated, batch_size),
            "eap-ig": lambda: eap_ig_input_scores(model, task, ablated, steps, batch_size),
            "eap-ig-activations": lambda: eap_ig_activation_scores(model, task, ablated, steps, batch_size),
        }[method]()
    if n_edges:
        return Discovery(method, scores, top_edges(scores, n_edges, tiebreak), time.perf_counter() - started)
    kept, search = faithful_prefix(model, task, ranking(scores, tiebreak), ablated, faithfulness_target)
    return Discovery(method, scores, kept, time.perf_counter() - started, curve=search.curve)


def _head_circuit(
    model: GraphTransformer, task: Task, heads: dict[str, float], ablated: Tensor, n_edges: int, target: float
) -> tuple[Tensor, list[tuple[int, float]]]:
    """A head-level method's circuit ([edges] bool) and size curve: the heads (score > 0) by
    score, best first; with `n_edges` the first that many edges of `edge_scores_of_heads`
    among the edges they carry, else the fewest heads whose `circuit_of_heads` reaches `target`."""
    ranked = [h for h in sorted(heads, key=lambda h: -heads[h]) if heads[h] > 0]
    if n_edges:
        scores = edge_scores_of_heads(model, heads)
        return top_edges(scores, n_edges) & (scores != 0), []
    of_circuit = circuit_faithfulness(model, task, ablated)
    sizes: dict[int, int] = {}

    def faithfulness_of(k: int) -> float:
        kept = circuit_of_heads(model, set(ranked[:k]))
        sizes[k] = int(kept.sum())
        return of_circuit(kept)

    search: FaithfulSearch = smallest_faithful(faithfulness_of, len(ranked), target)
    return circuit_of_heads(model, set(ranked[: search.k])), [(sizes[k], f) for k, f in search.curve]


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
