"""Discrete-code circuits (after "Sparse Autoencoders Enable Scalable and Reliable Circuit
Identification"): quantise every attention head's output with a codebook, one code per token,
and call a head part of the circuit when the codes it uses on the clean (positive) prompts are
codes it never uses on the corrupted (negative) ones.

A head's score is the fraction of its clean token positions (BOS excluded) whose code does not
occur anywhere in the corrupted prompts. Codebooks are our `codebook` dictionaries (k = 1),
initialised by spherical k-means on the head's outputs over both prompt sets, or given.
The method needs no gradients and no patching; it sees heads whose outputs change between the
prompt sets, not heads that carry information both sets share (a previous-token head).
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuits.attribution import node_of_receiver
from circuits.tasks import Task, widen
from circuits.transformer import GraphTransformer
from sae.base import Dictionary, create
from sae.config import DictionaryConfig


def head_names(model: GraphTransformer) -> list[str]:
    return [s for s in model.graph.sources if s.startswith("a")]


def head_outputs(model: GraphTransformer, tokens: Tensor) -> dict[str, Tensor]:
    """head -> [N, P - 1, d] outputs at the positions after BOS, on the model's device, in at
    least float32 (what the codebooks read)."""
    with torch.no_grad():
        outputs = widen(model(tokens, keep=True)[1])
    return {name: outputs[i, :, 1:] for i, name in enumerate(model.graph.sources) if name.startswith("a")}


def fit_head_codebooks(model: GraphTransformer, task: Task, n_codes: int = 256) -> dict[str, Dictionary]:
    """One k = 1 codebook per head, k-means-initialised on its outputs over both prompt sets."""
    return _fit(head_outputs(model, task.clean), head_outputs(model, task.corrupted), n_codes)


def _fit(clean: dict[str, Tensor], corrupted: dict[str, Tensor], n_codes: int) -> dict[str, Dictionary]:
    books = {}
    for head, outputs in clean.items():
        sample = torch.cat([outputs, corrupted[head]]).reshape(-1, outputs.shape[-1])
        book = create(DictionaryConfig(architecture="codebook", d_in=sample.shape[1], n_latents=n_codes, k=1))
        book = book.to(sample.device)  # made on the CPU (its seeded draws too), then moved
        with torch.no_grad():
            book.initialize_from(sample)
        books[head] = book
    return books


def code_ids(book: Dictionary, x: Tensor) -> Tensor:
    """[rows] the code each row of x [..., d] picks (x on the book's device)."""
    return book.encode(x.reshape(-1, x.shape[-1])).flat_indices()


def code_scores(
    model: GraphTransformer, task: Task, books: dict[str, Dictionary] | None = None, n_codes: int = 256
) -> dict[str, float]:
    """head -> fraction of its clean positions whose code the corrupted prompts never use."""
    clean, corrupted = head_outputs(model, task.clean), head_outputs(model, task.corrupted)
    books = books or _fit(clean, corrupted, n_codes)
    scores = {}
    for head in head_names(model):
        positive = code_ids(books[head], clean[head])
        negative = torch.zeros(books[head].n_latents, dtype=torch.bool, device=positive.device)
        negative[code_ids(books[head], corrupted[head])] = True
        scores[head] = float((~negative[positive]).float().mean())
    return scores


def edge_scores_of_heads(model: GraphTransformer, head_scores: dict[str, float]) -> Tensor:
    """[edges]: an edge into a head carries that head's score, an edge into the logits its source head's."""
    graph = model.graph
    out = torch.zeros(len(graph.edges))
    for index, (s, r) in enumerate(graph.edges):
        target = node_of_receiver(graph.receivers[r])
        out[index] = head_scores.get(
            target, head_scores.get(graph.sources[s], 0.0) if target == "logits" else 0.0
        )
    return out


def circuit_of_heads(model: GraphTransformer, heads: set[str]) -> Tensor:
    """[edges] bool: edges from embed or a kept head into a kept head or the logits."""
    graph = model.graph
    keep = heads | {"embed", "logits"}
    return torch.tensor(
        [
            graph.sources[s] in keep
            and node_of_receiver(graph.receivers[r]) in keep
            and (graph.sources[s] != "embed" or node_of_receiver(graph.receivers[r]) != "logits")
            for s, r in graph.edges
        ]
    )


def kept_heads(head_scores: dict[str, float], share: float = 0.5) -> set[str]:
    """Heads scoring at least `share` of the best head's score (none when no head scores)."""
    best = max(head_scores.values(), default=0.0)
    return {h for h, v in head_scores.items() if best > 0 and v >= share * best}
