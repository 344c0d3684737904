"""`workbench circuits --benchmark`: every method on every ground-truth model, scored.

Per (task, method): edge- and head-level ROC AUC against the planted circuit, faithfulness of
the circuit under resample/mean/zero ablation, Spearman rank correlation of |scores| with
exact patching's, and seconds. The circuit a method proposes keeps as many edges as the
ground truth holds (its top-ranked edges; ACDC ranks by the largest swept threshold an edge
survives, ties by the measured drop), so methods compare at one size.

Real-model tasks (`ioi`, `greater-than`, `repeat-tokens`, `repeat-name` on `--model`, e.g.
gemma-3-270m) are scored at head level (circuits.heads): a first row checks the model does the
task (clean and corrupted metric, accuracy), then per method its head ROC AUC against exact
patching (positives: heads whose |exact effect| reaches POSITIVE_SHARE of |m(clean) − m(∅)|),
Spearman of |node scores| with exact's over heads and MLPs, the faithfulness of its smallest
circuit reaching 0.8 (resample ablation), nodes kept, seconds and prompts. A task the model
does not do (`TaskCheck.does_task`: accuracy below real_tasks.MIN_ACCURACY) gets its check row
and no method rows.
"""

from __future__ import annotations

from typing import Iterator

import torch

from circuits.attribution import node_scores
from circuits.catalog import GROUND_TRUTH_TASKS, load_head_task, load_task
from circuits.discover import METHODS, Discovery, discover
from circuits.evaluate import faithfulness_all, roc_auc, spearman
from circuits.real_tasks import REAL_TASKS, check_task
from circuits.tasks import Task, TaskError
from circuits.transformer import GraphTransformer

POSITIVE_SHARE = 0.05
"""A head is in the real-model reference circuit when |its exact patching effect| is at least
this share of the clean-minus-ablated metric gap."""


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
    model_spec: str = "",
    length: int = 17,
) -> Iterator[dict]:
    """One row per (task, method); exact patching runs first as the reference. By default the
    planted tasks (ground truth known); `induction` adds the demo model (no ground truth, so
    only faithfulness and the audit against exact patching; minutes, ACDC most of them); the
    real-model tasks run at head level on `model_spec` (see `head_rows`).
    `device`: where the models run (`load_task`); `dtype`: the demo model's (the planted
    models refuse anything but float32)."""
    known = (*GROUND_TRUTH_TASKS, "induction", *REAL_TASKS)
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise TaskError(f"unknown benchmark task {', '.join(unknown)} (one of {', '.join(known)})")
    for name in names or list(GROUND_TRUTH_TASKS):
        if name in REAL_TASKS:
            yield from head_rows(name, model_spec, methods, prompts, length, device, dtype)
            continue
        torch.manual_seed(0)
        model, task = load_task(name, prompts=prompts, device=device, dtype=dtype)
        n_edges = len(task.ground_truth.get("edges", [])) or 0
        exact = discover(model, task, "exact", n_edges=n_edges)
        for method in methods:
            found = exact if method == "exact" else discover(model, task, method, n_edges=n_edges)
            yield score_discovery(model, task, found, exact)


def head_rows(
    name: str,
    model_spec: str,
    methods: tuple[str, ...],
    prompts: int = 16,
    length: int = 17,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
) -> Iterator[dict]:
    """The check row, then one row per head-level method (exact first, the reference); a method
    the head level lacks (eap-ig-activations) or that fails (a TaskError) gets
    a row saying so."""
    import time

    from circuits.heads import HEAD_METHODS, Patcher, discover_heads

    started = time.perf_counter()
    base = {"task": name, "model": model_spec or "demo", "prompts": prompts}
    try:
        model, task = load_head_task(name, model_spec, prompts, length, 0, device, dtype)
    except TaskError as error:  # e.g. a tokenizer without single-token names or digits
        yield {**base, "method": "dropped", "note": str(error)}
        return
    check = check_task(model, task)
    yield {
        **base,
        "method": "model-check",
        "clean_metric": check.metric,
        "corrupted_metric": check.corrupted,
        "accuracy": check.accuracy,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if not check.does_task:
        yield {**base, "method": "dropped", "note": check.why_not()}
        return
    patcher = Patcher(model, task)
    exact = discover_heads(patcher, "exact")
    truth = head_truth(exact.scores, patcher.full - patcher.empty)
    for method in ("exact", *(m for m in methods if m != "exact")):
        if method not in HEAD_METHODS:
            yield {**base, "method": method, "note": "edge-level only (no head-level form)"}
            continue
        try:
            found = exact if method == "exact" else discover_heads(patcher, method)
        except TaskError as error:
            yield {**base, "method": method, "note": str(error)}
            continue
        yield {**base, **score_heads(found, exact, truth), "nodes": len(found.scores)}
    from circuits.catalog import is_gpt2

    if is_gpt2(model):
        yield from edge_rows(model, task, methods, exact, truth, patcher.full - patcher.empty, base)


def edge_rows(
    model, task: Task, methods, exact_heads, truth: set[str], gap: float, base: dict
) -> Iterator[dict]:
    """On a GPT-2-architecture model, the edge-level methods (from_gpt2's graph) on the same
    task: edge ROC AUC against exact edge patching (positives: |effect| ≥ POSITIVE_SHARE of the
    gap), and head ROC AUC / Spearman of each head's summed out-edge scores against the
    head-level reference, so the two levels are compared on one footing."""
    from circuits.evaluate import faithfulness_all
    from circuits.transformer import from_gpt2

    graph = from_gpt2(model)
    edge_exact = discover(graph, task, "exact")
    positives = [abs(v) >= POSITIVE_SHARE * abs(gap) for v in edge_exact.scores.tolist()]
    names = list(exact_heads.scores)
    for method in ("exact", *(m for m in methods if m not in ("exact", "codes"))):
        found = edge_exact if method == "exact" else discover(graph, task, method)
        out = {n: 0.0 for n in names}
        for (s, _), score in zip(graph.graph.edges, found.scores.tolist()):
            source = graph.graph.sources[s]
            if source in out:
                out[source] += score
        yield {
            **base,
            "method": f"edges:{method}",
            "edge_roc_auc": roc_auc(found.scores.tolist(), positives),
            "head_roc_auc": roc_auc({n: v for n, v in out.items() if n.startswith("a")}, truth),
            "spearman_vs_exact": spearman(
                torch.tensor([out[n] for n in names]).abs(),
                torch.tensor([exact_heads.scores[n] for n in names]).abs(),
            ),
            "faithfulness": {"resample": faithfulness_all(graph, task, found.mask(graph))["resample"]},
            "edges_kept": int(found.kept.sum()),
            "edges": len(found.scores),
            "seconds": round(found.seconds, 3),
        }


def head_truth(exact: dict[str, float], gap: float) -> set[str]:
    """The heads whose |exact effect| is at least POSITIVE_SHARE of |gap| (the reference circuit)."""
    return {n for n, v in exact.items() if n.startswith("a") and abs(v) >= POSITIVE_SHARE * abs(gap)}


def score_heads(found, exact, truth: set[str]) -> dict:
    """A head-level benchmark row: head ROC AUC against `truth`, Spearman of |scores| with
    exact's (heads and MLPs), the circuit's faithfulness (resample), its size and seconds."""
    heads = {n: v for n, v in found.scores.items() if n.startswith("a")}
    names = list(exact.scores)
    return {
        "method": found.method,
        "head_roc_auc": roc_auc(heads, truth),
        "heads_in_reference": len(truth),
        "spearman_vs_exact": spearman(
            torch.tensor([found.scores[n] for n in names]).abs(),
            torch.tensor([exact.scores[n] for n in names]).abs(),
        ),
        "faithfulness": {"resample": found.faithfulness},
        "nodes_kept": len(found.kept),
        "seconds": round(found.seconds, 3),
    }
