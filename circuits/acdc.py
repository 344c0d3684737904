"""ACDC-style greedy pruning (Conmy et al. 2023) on the edge mask, with a threshold sweep.

Receivers are visited in reverse topological order (logits first); each incoming edge is
ablated in turn and stays ablated when the task score drops by less than τ. Edges into a node
whose every outgoing edge is already gone cannot matter and are dropped without a pass.

Batched (the default): most candidate removals are accepted, so the next `window` candidates
are scored in one forward (a batch of masks, `GraphTransformer.forward`), candidate j's mask
assuming candidates before it in the window were removed. Walking the window in order, every
decision up to and including the first kept edge was made on the mask the sequential
algorithm would have had, so it is the same decision; the candidates after a kept edge are
scored again. The masks equal the one-forward-per-edge twin's (`acdc_mask_unbatched`, forced
by WORKBENCH_ACDC_UNBATCHED=1; tested equal on the toy tasks).

The sweep (one pass per τ) shares a memo of mask scores: two passes make the same trials until
their thresholds first decide an edge differently, so a later pass pays only from there on.
Each edge's score is the largest τ it survives; the drop its trial measured in that pass breaks
ties, so the ranking that the faithfulness search (circuits/search.py) cuts is finer than τ.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from circuits.attribution import node_of_receiver, task_score
from circuits.evaluate import task_scores
from circuits.tasks import Task
from circuits.transformer import GraphTransformer

MAX_WINDOW = 64
"""Candidate masks scored in one forward at most (the window doubles while every candidate is removed)."""


class AcdcPass(NamedTuple):
    mask: Tensor
    """[sources, receivers] 0/1 on the model's device: the pruned circuit."""
    drops: Tensor
    """[edges] on the CPU: the task score's drop when the edge was tried (0: dropped as dead)."""
    forwards: int
    """Forward passes over the task's prompts the pass took (each of one or more masks)."""


def _visit_order(model: GraphTransformer) -> list[tuple[int, int, int]]:
    """(edge index, source, receiver) in ACDC's order: receivers last to first, sources last to first."""
    index = {edge: i for i, edge in enumerate(model.graph.edges)}
    graph = model.graph
    return [
        (index[(s, r)], s, r)
        for r in reversed(range(len(graph.receivers)))
        for s in reversed(torch.nonzero(graph.allowed[:, r]).flatten().tolist())
    ]


def _is_dead(model: GraphTransformer, mask: Tensor, receiver: int, source_index: dict[str, int]) -> bool:
    """Whether the node reading at `receiver` has no outgoing edge left in `mask` (then its
    inputs cannot matter)."""
    node = node_of_receiver(model.graph.receivers[receiver])
    return node in source_index and not bool(mask[source_index[node]].any())


class _Scores:
    """Task scores of 0/1 masks, each mask scored once: the passes of a sweep retrace one
    another's steps until their thresholds first decide an edge differently."""

    def __init__(self, model: GraphTransformer, task: Task, ablated: Tensor):
        self.model, self.task, self.ablated, self.known, self.forwards = model, task, ablated, {}, 0

    def __call__(self, masks: list[Tensor]) -> list[float]:
        keys = [bytes(m.bool().cpu().numpy().tobytes()) for m in masks]
        new = {key: m for key, m in zip(keys, masks) if key not in self.known}
        if new:
            values = task_scores(self.model, self.task, torch.stack(list(new.values())), self.ablated)
            self.known.update(zip(new, values.tolist()))
            self.forwards += 1
        return [self.known[key] for key in keys]


def acdc_pass(
    model: GraphTransformer,
    task: Task,
    ablated: Tensor,
    threshold: float,
    window: int = 8,
    scores: _Scores | None = None,
) -> AcdcPass:
    """One greedy pass at threshold τ, scoring up to MAX_WINDOW candidates per forward (see the
    module docstring); the same mask as `acdc_mask_unbatched`. `scores`: a sweep's shared memo
    of mask scores (a fresh one by default)."""
    if os.environ.get("WORKBENCH_ACDC_UNBATCHED") == "1":
        return acdc_mask_unbatched(model, task, ablated, threshold)
    scores = scores or _Scores(model, task, ablated)
    source_index = {name: i for i, name in enumerate(model.graph.sources)}
    order = _visit_order(model)
    mask = model.full_mask()
    drops = torch.zeros(len(model.graph.edges))
    forwards_before = scores.forwards
    current = scores([mask])[0]
    i = 0
    while i < len(order):
        state, trials, positions = mask.clone(), [], []
        while i < len(order) and len(trials) < window:
            _, s, r = order[i]
            state[s, r] = 0
            if not _is_dead(model, state, r, source_index):  # a dead node's inputs go without a trial
                trials.append(state.clone())
                positions.append(i)
            i += 1
        if not trials:
            mask = state
            break
        values = scores(trials)
        mask, kept_one = state, False  # every candidate removed, unless one below is kept
        for trial, position, value in zip(trials, positions, values):
            edge, s, r = order[position]
            drops[edge] = current - value
            if current - value < threshold:
                current = value
                continue
            mask, kept_one = trial.clone(), True
            mask[s, r] = 1
            i = position + 1  # later candidates assumed this edge gone: score them again
            break
        window = max(1, window // 2) if kept_one else min(2 * window, MAX_WINDOW)
    return AcdcPass(mask, drops, scores.forwards - forwards_before)


def acdc_mask_unbatched(model: GraphTransformer, task: Task, ablated: Tensor, threshold: float) -> AcdcPass:
    """The sequential twin of `acdc_pass`: one forward per candidate edge."""
    graph = model.graph
    mask = model.full_mask()
    drops = torch.zeros(len(graph.edges))
    current = task_score(model, task, mask, ablated)
    source_index = {name: i for i, name in enumerate(graph.sources)}
    forwards = 1
    for edge, s, r in _visit_order(model):
        trial = mask.clone()
        trial[s, r] = 0
        if _is_dead(model, mask, r, source_index):
            mask = trial
            continue
        value = task_score(model, task, trial, ablated)
        forwards += 1
        drops[edge] = current - value
        if current - value < threshold:
            mask, current = trial, value
    return AcdcPass(mask, drops, forwards)


def acdc_mask(model: GraphTransformer, task: Task, ablated: Tensor, threshold: float) -> Tensor:
    """The pruned 0/1 mask [sources, receivers] at threshold τ."""
    return acdc_pass(model, task, ablated, threshold).mask


class AcdcSweep(NamedTuple):
    scores: Tensor
    """[edges] on the CPU: the largest swept τ at which the edge survives (0: never)."""
    effects: Tensor
    """[edges] on the CPU: the drop the edge's trial measured in the pass of that τ (the smallest
    τ's pass for edges that never survive); breaks ties among edges of one τ."""
    masks: dict
    """τ -> the pass's mask [sources, receivers] (on the model's device)."""


def default_thresholds(model: GraphTransformer, task: Task, ablated: Tensor, count: int = 10) -> list[float]:
    """`count` thresholds log-spaced from 1e-4 to 0.5 of the gap between the clean and fully
    ablated task scores."""
    gap = abs(task_score(model, task) - task_score(model, task, model.full_mask(0.0), ablated)) or 1.0
    return [gap * f for f in torch.logspace(-4, torch.log10(torch.tensor(0.5)), count).tolist()]


def acdc_scores(
    model: GraphTransformer, task: Task, ablated: Tensor, thresholds: list[float] | None = None
) -> AcdcSweep:
    """One pass per threshold (default: `default_thresholds`); per edge the largest τ it survives."""
    thresholds = sorted(default_thresholds(model, task, ablated) if thresholds is None else thresholds)
    scores = torch.zeros(len(model.graph.edges))
    effects = torch.zeros(len(model.graph.edges))
    masks, memo = {}, _Scores(model, task, ablated)
    for n, tau in enumerate(thresholds):
        found = acdc_pass(model, task, ablated, tau, scores=memo)
        masks[tau] = found.mask
        kept = (model.graph.per_edge(found.mask) > 0).cpu()
        if n == 0:
            effects = found.drops.clone()
        scores[kept] = tau
        effects[kept] = found.drops[kept]
    return AcdcSweep(scores, effects, masks)
