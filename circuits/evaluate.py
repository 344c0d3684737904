"""Scoring circuits: ROC AUC against ground truth, faithfulness under three ablations, and the
approximation audit (rank correlation of attribution with exact patching)."""

from __future__ import annotations

import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import Tensor

from circuits.attribution import ABLATIONS, ablated_outputs, task_score
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


def top_edges(scores: Tensor, n: int) -> Tensor:
    """[edges] bool on the scores' device: the `n` largest |scores|."""
    kept = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    kept[scores.abs().topk(min(n, len(scores))).indices] = True
    return kept


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
