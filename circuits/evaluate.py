"""Scoring circuits: ROC AUC against ground truth, faithfulness under three ablations, the
smallest faithful prefix of a ranking (circuits/search.py) and the approximation audit (rank
correlation of attribution with exact patching)."""

from __future__ import annotations

from typing import Callable

import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import Tensor

from circuits.attribution import ABLATIONS, ablated_outputs, chunks, task_score
from circuits.search import FaithfulSearch, smallest_faithful
from circuits.tasks import Task
from circuits.transformer import GraphTransformer


def negligible_to_zero(values: Tensor, tolerance: float = 1e-6) -> Tensor:
    """`values` with entries within `tolerance` x the largest |value| set to 0: an edge that is
    exactly inert under one method and float noise under another must tie, not rank at random."""
    return torch.where(values.abs() <= tolerance * values.abs().max(), torch.zeros_like(values), values)


def roc_auc(scores: dict[str, float] | list[float], positives: set[str] | list[bool]) -> float:
    """Area under the ROC curve of |score| separating ground-truth members from the rest
    (negligible scores tie at 0, see negligible_to_zero)."""
    if isinstance(scores, dict):
        values = list(scores.values())
        labels = [n in positives for n in scores]
    else:
        values, labels = list(scores), list(positives)
    if all(labels) or not any(labels):
        return float("nan")
    return float(
        roc_auc_score(labels, negligible_to_zero(torch.tensor(values, dtype=torch.float64)).abs().numpy())
    )


def mask_of_edges(model: GraphTransformer, kept: Tensor) -> Tensor:
    """A 0/1 mask [sources, receivers] on the model's device keeping the edges where `kept`
    [edges] (on any device) is true."""
    return model.graph.matrix(kept.to(model.device, torch.float32))


def ranking(scores: Tensor, tiebreak: Tensor | None = None) -> Tensor:
    """[edges] int64 on the CPU: edge indices by |score|, largest first; ties go to the larger
    |tiebreak| (ACDC: the drop an edge's removal caused), then to the lower index."""
    order = torch.arange(len(scores))
    if tiebreak is not None:
        order = order[tiebreak.detach().cpu().abs()[order].argsort(descending=True, stable=True)]
    return order[scores.detach().cpu().abs()[order].argsort(descending=True, stable=True)]


def top_edges(scores: Tensor, n: int, tiebreak: Tensor | None = None) -> Tensor:
    """[edges] bool on the scores' device: the first `n` of `ranking(scores, tiebreak)`."""
    kept = torch.zeros(len(scores), dtype=torch.bool)
    kept[ranking(scores, tiebreak)[:n]] = True
    return kept.to(scores.device)


def task_scores(
    model: GraphTransformer, task: Task, masks: Tensor, ablated: Tensor, sequences: int = 512
) -> Tensor:
    """[M] float64 on the CPU: the task score under each of the masks [M, sources, receivers]
    (what `task_score` gives for one), several masks per forward: a forward holds at most
    `sequences` prompt copies (masks × prompts), so memory stays bounded."""
    n, total = len(task.clean), torch.zeros(len(masks), dtype=torch.float64)
    per_forward = min(n, sequences)
    group = max(1, sequences // per_forward)
    with torch.no_grad():
        for first in range(0, len(masks), group):
            some = masks[first : first + group]
            for rows in chunks(n, per_forward):
                logits = model(task.clean[rows], mask=some, ablated=ablated[:, rows])
                b = rows.stop - rows.start
                for m in range(len(some)):
                    total[first + m] += float(task.metric(logits[m * b : (m + 1) * b], rows).sum())
    return total / n


def circuit_faithfulness(model: GraphTransformer, task: Task, ablated: Tensor) -> Callable[[Tensor], float]:
    """kept [edges] bool -> the faithfulness of that circuit (see `faithfulness`) under `ablated`
    [sources, N, P, d], the clean and empty scores computed once; nan when they are equal."""
    full = task_score(model, task)
    empty = task_score(model, task, model.full_mask(0.0), ablated)

    def of(kept: Tensor) -> float:
        value = task_score(model, task, mask_of_edges(model, kept), ablated)
        return (value - empty) / (full - empty) if full != empty else float("nan")

    return of


def faithful_prefix(
    model: GraphTransformer, task: Task, order: Tensor, ablated: Tensor, target: float = 0.8
) -> tuple[Tensor, FaithfulSearch]:
    """The smallest prefix of the edge ranking `order` ([edges] indices, best first) whose
    circuit's faithfulness under `ablated` reaches `target` (`smallest_faithful`: O(log edges)
    forwards over the task's prompts): ([edges] bool on the CPU, the search with its curve)."""
    of_circuit = circuit_faithfulness(model, task, ablated)

    def faithfulness_of(k: int) -> float:
        kept = torch.zeros(len(order), dtype=torch.bool)
        kept[order[:k]] = True
        return of_circuit(kept)

    search = smallest_faithful(faithfulness_of, len(order), target)
    kept = torch.zeros(len(order), dtype=torch.bool)
    kept[order[: search.k]] = True
    return kept, search


def faithfulness(model: GraphTransformer, task: Task, circuit: Tensor, ablation: str) -> float:
    """(m(C) − m(∅)) / (m(M) − m(∅)): the circuit's edges clean, every other edge ablated."""
    ablated = ablated_outputs(model, task, ablation)
    full = task_score(model, task)
    empty = task_score(model, task, model.full_mask(0.0), ablated)
    kept = task_score(model, task, circuit, ablated)
    return (kept - empty) / (full - empty) if full != empty else float("nan")


def faithfulness_all(model: GraphTransformer, task: Task, circuit: Tensor) -> dict[str, float]:
    return {ablation: faithfulness(model, task, circuit, ablation) for ablation in ABLATIONS}


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two score vectors (negligible entries tie at 0); nan when
    either is constant."""
    a, b = negligible_to_zero(a.detach().cpu()), negligible_to_zero(b.detach().cpu())
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return float("nan")
    return float(spearmanr(a.numpy(), b.numpy()).statistic)
