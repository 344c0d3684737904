"""Edge scores on a GraphTransformer: exact patching (the reference), EAP, EAP-IG.

Every score estimates the same quantity, the change of the task score when one edge reads
the ablated value instead of the clean one:  s(u→r) ≈ m(M with edge u→r ablated) − m(M).
- exact: one forward pass per edge with that edge's mask entry at 0 (downstream recomputed);
- eap: −∂m/∂M[u, r] at M = 1, i.e. (ablated_u − out_u) · ∂m/∂input_r (Syed et al. 2023);
- eap-ig (inputs): (ablated_u − out_u) · ∂m/∂input_r averaged over `steps` points of the path
  from the corrupted to the clean embeddings (Hanna et al. 2024);
- eap-ig-activations: −∫₀¹ ∂m/∂M dα along M = α·1 (all edges interpolated together), which
  sums over edges to m(all ablated) − m(clean) (completeness, tested).
Prompts are processed in chunks of `batch_size`, so attribution memory stays bounded.
Everything runs on the model's device; gradients and activation differences are summed in at
least float32 (a bfloat16 model's included), and every score vector comes back on the CPU.
"""

from __future__ import annotations

from typing import Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.config import ABLATIONS
from circuits.tasks import Task, TaskError
from circuits.transformer import GraphTransformer


def ablated_outputs(
    model: GraphTransformer,
    task: Task,
    ablation: str = "resample",
) -> Float[Tensor, "sources batch pos d_model"]:
    """[sources, N, P, d]: what an ablated edge carries (corrupted run, clean mean, or zero)."""
    if ablation not in ABLATIONS:
        raise TaskError(f"unknown ablation {ablation!r} (one of {', '.join(ABLATIONS)})")
    with torch.no_grad():
        if ablation == "resample":
            return model(task.corrupted, keep=True)[1]
        clean = model(task.clean, keep=True)[1]
    if ablation == "zero":
        return torch.zeros_like(clean)
    return clean.mean(dim=1, keepdim=True).expand_as(clean).contiguous()  # per node and position


def chunks(n: int, batch_size: int) -> Iterator[slice]:
    return (slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size))


def task_score(
    model: GraphTransformer,
    task: Task,
    mask: Float[Tensor, "sources receivers"] | None = None,
    ablated: Float[Tensor, "sources batch pos d_model"] | None = None,
    batch_size: int = 256,
) -> float:
    """The task score with edges mixed by `mask` (None: the model itself)."""
    total, n = 0.0, len(task.clean)
    with torch.no_grad():
        for rows in chunks(n, batch_size):
            part = None if ablated is None else ablated[:, rows]
            logits = model(task.clean[rows], mask=mask, ablated=part)
            total += float(task.metric(logits, rows).sum())
    return total / n


def exact_scores(
    model: GraphTransformer,
    task: Task,
    ablated: Float[Tensor, "sources batch pos d_model"],
    batch_size: int = 256,
) -> Float[Tensor, " edges"]:
    """[edges] on the CPU: m(edge ablated) − m(clean), one forward pass per edge."""
    full = model.full_mask()
    base = task_score(model, task, full, ablated, batch_size)
    scores = torch.zeros(len(model.graph.edges))
    for index, (s, r) in enumerate(model.graph.edges):
        mask = full.clone()
        mask[s, r] = 0
        scores[index] = task_score(model, task, mask, ablated, batch_size) - base
    return scores


def _mask_gradient(
    model: GraphTransformer, task: Task, ablated: Tensor, alpha: float, batch_size: int
) -> Tensor:
    """∂m/∂M at M = alpha·1, [sources, receivers] on the model's device, in `summing(ablated)`
    (the mask itself is in that dtype, so its gradient arrives there)."""
    dtype = summing(ablated.dtype)
    total = torch.zeros(
        len(model.graph.sources), len(model.graph.receivers), dtype=dtype, device=ablated.device
    )
    n = len(task.clean)
    for rows in chunks(n, batch_size):
        mask = model.full_mask(alpha).to(dtype).requires_grad_(True)
        logits = model(task.clean[rows], mask=mask, ablated=ablated[:, rows])
        (grad,) = torch.autograd.grad(task.metric(logits, rows).sum() / n, mask)
        total += grad
    return total


def summing(dtype: torch.dtype) -> torch.dtype:
    """The dtype attribution sums in: float32, or the inputs' dtype when wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def eap_scores(
    model: GraphTransformer,
    task: Task,
    ablated: Float[Tensor, "sources batch pos d_model"],
    batch_size: int = 64,
) -> Float[Tensor, " edges"]:
    """[edges] on the CPU: −∂m/∂M at M = 1."""
    return _per_edge(model, -_mask_gradient(model, task, ablated, 1.0, batch_size))


def eap_ig_activation_scores(
    model: GraphTransformer,
    task: Task,
    ablated: Float[Tensor, "sources batch pos d_model"],
    steps: int = 8,
    batch_size: int = 64,
) -> Float[Tensor, " edges"]:
    """[edges] on the CPU: the midpoint rule over α ∈ (0, 1) of −∂m/∂M at M = α·1."""
    alphas = [(i + 0.5) / steps for i in range(steps)]
    grad = torch.stack([_mask_gradient(model, task, ablated, alpha, batch_size) for alpha in alphas]).mean(0)
    return _per_edge(model, -grad)


def eap_ig_input_scores(
    model: GraphTransformer,
    task: Task,
    ablated: Float[Tensor, "sources batch pos d_model"],
    steps: int = 8,
    batch_size: int = 64,
) -> Float[Tensor, " edges"]:
    """[edges] on the CPU: (ablated_u − out_u) · mean over α of ∂m/∂input_r, the embeddings
    interpolated from the corrupted (α = 0) to the clean (α = 1) prompts."""
    n = len(task.clean)
    dtype, device = summing(ablated.dtype), ablated.device
    scores = torch.zeros(len(model.graph.sources), len(model.graph.receivers), dtype=dtype, device=device)
    for rows in chunks(n, batch_size):
        with torch.no_grad():
            clean_embed, corrupt_embed = model.embed(task.clean[rows]), model.embed(task.corrupted[rows])
            outputs = model(task.clean[rows], keep=True)[1]
            delta = ablated[:, rows].to(dtype) - outputs.to(dtype)  # [sources, n, P, d]
        grads = torch.zeros(len(model.graph.receivers), *clean_embed.shape, dtype=dtype, device=device)
        for i in range(steps):
            embed = (corrupt_embed + (i + 0.5) / steps * (clean_embed - corrupt_embed)).requires_grad_(True)
            logits, _, inputs, _ = model(task.clean[rows], embed_override=embed, keep=True)
            value = task.metric(logits, rows).sum() / n
            grads += torch.stack(torch.autograd.grad(value, inputs)).to(dtype) / steps
        scores += torch.einsum("snpd,rnpd->sr", delta, grads)
    return _per_edge(model, scores)


def _per_edge(model: GraphTransformer, matrix: Tensor) -> Tensor:
    """[edges] entries of a [sources, receivers] score matrix, on the CPU."""
    return model.graph.per_edge(matrix).detach().cpu()


def node_of_receiver(receiver: str) -> str:
    """'a1.2.k' -> 'a1.2'; 'm0' and 'logits' are nodes themselves."""
    return receiver.rsplit(".", 1)[0] if receiver.count(".") == 2 else receiver


def node_scores(model: GraphTransformer, edge_scores: Float[Tensor, " edges"]) -> dict[str, float]:
    """A node's score: Σ |score| of the edges into and out of it."""
    totals: dict[str, float] = {}
    for (s, r), score in zip(model.graph.edges, edge_scores.abs().tolist()):
        for node in (model.graph.sources[s], node_of_receiver(model.graph.receivers[r])):
            totals[node] = totals.get(node, 0.0) + score
    return totals
