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

On the CPU the default is one candidate per forward (a batch of masks cost more per mask there,
measured on a 2-layer 8-head model), each computed from its receiver's layer on: the layers
before it are those of the current circuit, kept from its forward (bitwise the same values).

The sweep (one pass per τ, largest first) shares a memo of mask scores: two passes make the same trials until
their thresholds first decide an edge differently, so a later pass pays only from there on.
Each edge's score is the largest τ it survives; the drop its trial measured in that pass breaks
ties, so the ranking that the faithfulness search (circuits/search.py) cuts is finer than τ.
For the default circuit the sweep stops at the first τ whose circuit reaches the faithfulness
target: the cheap passes come first, the small τ that keep (and try) the most edges are skipped.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from circuits.attribution import node_of_receiver, task_score
from circuits.evaluate import circuit_faithfulness, task_scores
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


def _layer_of(receiver: str, n_layers: int) -> int:
    """'a1.2.k' -> 1, 'm0' -> 0, 'logits' -> n_layers: the first layer a change there affects."""
    return n_layers if receiver == "logits" else int(receiver[1:].split(".")[0])


def _sequential_pass(
    model: GraphTransformer, task: Task, ablated: Tensor, threshold: float, scores: _Scores
) -> AcdcPass:
    """`acdc_mask_unbatched` with the sweep's memo, each trial computed from its receiver's layer
    on (the layers before it are the current circuit's, kept from its forward)."""
    graph, n = model.graph, len(task.clean)
    source_index = {name: i for i, name in enumerate(graph.sources)}
    mask, drops, forwards, upstream = model.full_mask(), torch.zeros(len(graph.edges)), 0, None

    def score(trial: Tensor, layer: int) -> tuple[float, Tensor | None]:
        nonlocal forwards, upstream
        key = bytes(trial.bool().cpu().numpy().tobytes())
        if key in scores.known:
            return scores.known[key], None
        with torch.no_grad():
            if upstream is None:  # the current circuit's outputs, after a replayed (memo) step
                upstream = model(task.clean, mask=mask, ablated=ablated, keep=True)[1]
            logits, outputs = model(task.clean, trial, ablated, keep=True, upstream=(layer, upstream))[:2]
        forwards += 1
        scores.known[key] = float(task.metric(logits, slice(0, n)).sum()) / n
        return scores.known[key], outputs

    current, upstream = score(mask, 0)
    for edge, s, r in _visit_order(model):
        trial = mask.clone()
        trial[s, r] = 0
        if _is_dead(model, mask, r, source_index):
            mask = trial
            continue
        value, outputs = score(trial, _layer_of(graph.receivers[r], model.shape.n_layers))
        drops[edge] = current - value
        if current - value < threshold:
            mask, current, upstream = trial, value, outputs if outputs is not None else None
    scores.forwards += forwards
    return AcdcPass(mask, drops, forwards)


def acdc_pass(
    model: GraphTransformer,
    task: Task,
    ablated: Tensor,
    threshold: float,
    window: int | None = None,
    scores: _Scores | None = None,
) -> AcdcPass:
    """One greedy pass at threshold τ; the same mask as `acdc_mask_unbatched`. `window`: up to
    that many candidates per forward, growing to MAX_WINDOW (see the module docstring); 1 scores
    them one by one, each from its receiver's layer on. By default 1 on the CPU, where a batch of
    M masks cost more than M single forwards (the 2-layer 8-head model, 32 prompts: tensors past
    the caches), and 8 elsewhere. `scores`: a sweep's shared memo (a fresh one by default)."""
    if os.environ.get("WORKBENCH_ACDC_UNBATCHED") == "1":
        return acdc_mask_unbatched(model, task, ablated, threshold)
    scores = scores or _Scores(model, task, ablated)
    window = window or (1 if model.device.type == "cpu" else 8)
    if window == 1:
        return _sequential_pass(model, task, ablated, threshold, scores)
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
    model: GraphTransformer,
    task: Task,
    ablated: Tensor,
    thresholds: list[float] | None = None,
    stop_at: float | None = None,
) -> AcdcSweep:
    """One pass per threshold (default: `default_thresholds`), largest τ first; per edge the
    largest τ it survives. `stop_at`: stop after the first pass whose circuit's faithfulness
    (under `ablated`) reaches it: the smaller τ, whose passes keep more edges and cost the most
    trials, cannot give a smaller faithful circuit's edges a higher score; edges no pass run
    keeps score 0, ranked by the drop of the last pass."""
    thresholds = sorted(default_thresholds(model, task, ablated) if thresholds is None else thresholds)
    scores = torch.zeros(len(model.graph.edges))
    effects = torch.zeros(len(model.graph.edges))
    masks, memo = {}, _Scores(model, task, ablated)
    of_circuit = circuit_faithfulness(model, task, ablated) if stop_at is not None else None
    for tau in reversed(thresholds):
        found = acdc_pass(model, task, ablated, tau, scores=memo)
        masks[tau] = found.mask
        kept = (model.graph.per_edge(found.mask) > 0).cpu()
        first = kept & (scores == 0)  # descending τ: the first pass keeping an edge has its largest τ
        scores[first], effects[first] = tau, found.drops[first]
        never = scores == 0
        effects[never] = found.drops[never]
        if of_circuit is not None and of_circuit(kept) >= stop_at:
            break
    return AcdcSweep(scores, effects, masks)
