"""ACDC-style greedy pruning (Conmy et al. 2023) on the edge mask, with a threshold sweep.

Receivers are visited in reverse topological order (logits first); each incoming edge is
ablated in turn and stays ablated when the task score drops by less than τ. Edges into a node
whose every outgoing edge is already gone cannot matter and are dropped without a pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuits.attribution import node_of_receiver, task_score
from circuits.tasks import Task
from circuits.transformer import GraphTransformer


def acdc_mask(model: GraphTransformer, task: Task, ablated: Tensor, threshold: float) -> Tensor:
    """The pruned 0/1 mask [sources, receivers] at threshold τ."""
    graph = model.graph
    mask = model.full_mask()
    current = task_score(model, task, mask, ablated)
    source_index = {name: i for i, name in enumerate(graph.sources)}
    for r in reversed(range(len(graph.receivers))):
        node = node_of_receiver(graph.receivers[r])
        dead = node in source_index and not bool(mask[source_index[node]].any())
        for s in reversed(torch.nonzero(graph.allowed[:, r]).flatten().tolist()):
            trial = mask.clone()
            trial[s, r] = 0
            if dead:
                mask = trial
                continue
            value = task_score(model, task, trial, ablated)
            if current - value < threshold:
                mask, current = trial, value
    return mask


def acdc_scores(
    model: GraphTransformer, task: Task, ablated: Tensor, thresholds: list[float] | None = None
) -> tuple[Tensor, dict]:
    """Per edge (on the CPU), the largest swept τ at which it survives (0: never), and the masks
    per τ (on the model's device).
    The default sweep spans 1e-4 to 0.5 of the gap between the clean and fully ablated scores."""
    if thresholds is None:
        gap = abs(task_score(model, task) - task_score(model, task, model.full_mask(0.0), ablated)) or 1.0
        thresholds = [gap * f for f in torch.logspace(-4, torch.log10(torch.tensor(0.5)), 10).tolist()]
    scores = torch.zeros(len(model.graph.edges))
    masks = {}
    for tau in sorted(thresholds):
        mask = acdc_mask(model, task, ablated, tau)
        masks[tau] = mask
        kept = (model.graph.per_edge(mask) > 0).cpu()
        scores[kept] = tau
    return scores, masks
