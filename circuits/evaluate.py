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


def roc_auc(scores: dict[str, float] | list[float], positives: set[str] | list[bool], names: list[str] | None = None) -> float:
    """Area under the ROC curve of |score| separating ground-truth members from the rest."""
    if isinstance(scores, dict):
        names = list(scores)
        values = [abs(scores[n]) for n in names]
        labels = [n in positives for n in names]
    else:
        values, labels = [abs(v) for v in scores], list(positives)
    if all(labels) or not any(labels):
        return float("nan")
    return float(roc_auc_score(labels, values))


def mask_of_edges(model: GraphTransformer, kept: Tensor) -> Tensor:
    """A 0/1 mask [sources, receivers] keeping the edges where `kept` [edges] is true."""
    return model.graph.matrix(kept.to(torch.float32))


def top_edges(scores: Tensor, n: int) -> Tensor:
    kept = torch.zeros(len(scores), dtype=torch.bool)
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
    return float(spearmanr(a.numpy(), b.numpy()).statistic)
