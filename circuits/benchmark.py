"""`workbench circuits --benchmark`: every method on every ground-truth model, scored.

Per (task, method): edge- and head-level ROC AUC against the planted circuit, faithfulness of
the circuit under resample/mean/zero ablation, Spearman rank correlation of |scores| with
exact patching's, and seconds. The circuit a method proposes keeps as many edges as the
ground truth holds (ACDC: the edges surviving its median swept threshold).
"""

from __future__ import annotations

from typing import Iterator

import torch

from circuits.attribution import node_scores
from circuits.catalog import GROUND_TRUTH_TASKS, load_task
from circuits.discover import METHODS, Discovery, discover
from circuits.evaluate import faithfulness_all, roc_auc, spearman
from circuits.tasks import Task, TaskError
from circuits.transformer import GraphTransformer


def score_discovery(model: GraphTransformer, task: Task, found: Discovery, exact: Discovery | None) -> dict:
    """The benchmark row of one method's result."""
    truth = task.ground_truth
    row = {
        "task": task.name,
        "method": found.method,
        "edges": len(found.scores),
        "edges_kept": int(found.kept.sum()),
    }
    if truth.get("edges"):
        row["roc_auc"] = roc_auc(
            dict(zip(model.graph.edge_names, found.scores.tolist())), set(truth["edges"])
        )
    if truth.get("heads"):
        heads = found.heads or {
            k: v for k, v in node_scores(model, found.scores).items() if k.startswith("a")
        }
        row["head_roc_auc"] = roc_auc(heads, set(truth["heads"]))
    row["faithfulness"] = faithfulness_all(model, task, found.mask(model))
    row["spearman_vs_exact"] = spearman(found.scores.abs(), exact.scores.abs()) if exact is not None else None
    row["seconds"] = round(found.seconds, 3)
    return row


def run_benchmark(
    names: list[str] | None = None,
    methods: tuple[str, ...] = METHODS,
    prompts: int = 64,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
) -> Iterator[dict]:
    """One row per (task, method); exact patching runs first as the reference. By default the
    planted tasks (ground truth known); `induction` adds the demo model (no ground truth, so
    only faithfulness and the audit against exact patching; minutes, ACDC most of them).
    `device`: where the models run (`load_task`); `dtype`: the demo model's (the planted
    models refuse anything but float32)."""
    known = (*GROUND_TRUTH_TASKS, "induction")
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise TaskError(f"unknown benchmark task {', '.join(unknown)} (one of {', '.join(known)})")
    for name in names or list(GROUND_TRUTH_TASKS):
        torch.manual_seed(0)
        model, task = load_task(name, prompts=prompts, device=device, dtype=dtype)
        n_edges = len(task.ground_truth.get("edges", [])) or 0
        exact = discover(model, task, "exact", n_edges=n_edges)
        for method in methods:
            found = exact if method == "exact" else discover(model, task, method, n_edges=n_edges)
            yield score_discovery(model, task, found, exact)
