"""The circuit graph and its attribution methods against exact patching on a small GPT-2."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from circuits.attribution import (
    ablated_outputs,
    eap_ig_activation_scores,
    eap_ig_input_scores,
    eap_scores,
    exact_scores,
    node_scores,
    task_score,
)
from circuits.tasks import Task, next_token_logprob
from circuits.transformer import build_graph, from_gpt2


@pytest.fixture(scope="module")
def graph_model(tiny_model):
    return from_gpt2(tiny_model)


@pytest.fixture(scope="module")
def task(tiny_model):
    text = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
    tokens = tiny_model.tokenize(text)[:, :24]
    other = tiny_model.tokenize(
        "KING HENRY:\nOnce more unto the breach, dear friends, once more; or close the wall up"
    )[:, :24]
    clean = torch.cat([tokens, tokens.roll(3, dims=1)])
    corrupted = torch.cat([other, other.flip(1)])
    clean[:, 0] = corrupted[:, 0] = tokens[0, 0]
    return Task(
        "next-token", clean, corrupted, next_token_logprob(clean, torch.ones_like(clean, dtype=torch.bool))
    )


def test_graph_model_reproduces_the_hf_logits(tiny_model, graph_model, task):
    with torch.no_grad():
        reference = tiny_model(task.clean)
        torch.testing.assert_close(graph_model(task.clean), reference, atol=1e-4, rtol=1e-4)
        ablated = ablated_outputs(graph_model, task, "zero")
        torch.testing.assert_close(
            graph_model(task.clean, mask=graph_model.full_mask(), ablated=ablated),
            reference,
            atol=1e-4,
            rtol=1e-4,
        )
        # every edge ablated with resample ablation is the corrupted run itself
        everything_patched = graph_model(
            task.clean, mask=graph_model.full_mask(0.0), ablated=ablated_outputs(graph_model, task)
        )
        torch.testing.assert_close(everything_patched, graph_model(task.corrupted), atol=1e-4, rtol=1e-4)


def test_graph_counts_every_edge_once():
    from circuits.transformer import Shape

    graph = build_graph(Shape(n_layers=2, d_model=8, n_heads=2, d_vocab=5, n_ctx=4, d_mlp=16))
    assert graph.sources == ("embed", "a0.0", "a0.1", "m0", "a1.0", "a1.1", "m1")
    assert len(graph.receivers) == 2 * (2 * 3 + 1) + 1
    # layer-0 head inputs see embed; m0 sees embed + layer-0 heads; logits see everything
    expected = 6 * 1 + 3 + 6 * 4 + 6 + 7
    assert len(graph.edges) == expected and len(set(graph.edges)) == expected


def test_exact_patching_of_one_edge_by_hand(graph_model, task):
    ablated = ablated_outputs(graph_model, task)
    scores = exact_scores(graph_model, task, ablated)
    edge = graph_model.graph.edges.index((0, len(graph_model.graph.receivers) - 1))  # embed -> logits
    with torch.no_grad():
        logits, outputs, inputs, _ = graph_model(task.clean, keep=True)
        patched_input = inputs[-1] - outputs[0] + ablated[0]
        by_hand = task.score(graph_model.unembed(patched_input)) - task.score(logits)
    assert float(scores[edge]) == pytest.approx(float(by_hand), rel=1e-4, abs=1e-6)


def test_eap_is_the_derivative_of_the_patched_metric(graph_model, task):
    import copy

    model = copy.deepcopy(graph_model).double()  # central differences in float64
    ablated = ablated_outputs(model, task)
    scores = eap_scores(model, task, ablated)
    full, eps = model.full_mask().double(), 1e-4
    for index in (0, 7, len(scores) // 2, len(scores) - 1):
        s, r = model.graph.edges[index]
        up, down = full.clone(), full.clone()
        up[s, r], down[s, r] = 1 + eps, 1 - eps
        finite = (task_score(model, task, down, ablated) - task_score(model, task, up, ablated)) / (2 * eps)
        assert float(scores[index]) == pytest.approx(finite, rel=1e-4, abs=1e-9)


def test_eap_ig_is_complete_and_tracks_exact_patching(graph_model, task):
    ablated = ablated_outputs(graph_model, task)
    exact = exact_scores(graph_model, task, ablated)
    ig = eap_ig_activation_scores(graph_model, task, ablated, steps=16)
    total = task_score(graph_model, task, graph_model.full_mask(0.0), ablated) - task_score(graph_model, task)
    assert float(ig.sum()) == pytest.approx(total, rel=0.02)
    inputs = eap_ig_input_scores(graph_model, task, ablated, steps=8)
    eap = eap_scores(graph_model, task, ablated)
    pearson = {
        name: float(torch.corrcoef(torch.stack([s, exact]))[0, 1])
        for name, s in (("ig", ig), ("inputs", inputs), ("eap", eap))
    }
    # Measured here: IG 0.994, inputs 0.998, EAP 0.961. EAP, a local slope, misses part of the
    # large nonlinear effects that IG integrates (as the EAP-IG paper reports).
    assert (
        pearson["ig"] >= 0.98
        and pearson["inputs"] >= 0.98
        and min(pearson["ig"], pearson["inputs"]) > pearson["eap"]
    )
    assert spearmanr(inputs, exact).statistic > 0.5  # the many near-zero edges rank noisily


def test_chunked_attribution_equals_one_batch(graph_model, task):
    ablated = ablated_outputs(graph_model, task, "mean")
    torch.testing.assert_close(
        eap_scores(graph_model, task, ablated, batch_size=1),
        eap_scores(graph_model, task, ablated),
        atol=1e-6,
        rtol=1e-4,
    )
    torch.testing.assert_close(
        eap_ig_input_scores(graph_model, task, ablated, steps=2, batch_size=1),
        eap_ig_input_scores(graph_model, task, ablated, steps=2),
        atol=1e-6,
        rtol=1e-4,
    )
    scores = node_scores(graph_model, eap_scores(graph_model, task, ablated))
    assert set(scores) == set(graph_model.graph.sources) | {"logits"} and min(scores.values()) >= 0


def test_eap_equals_exact_patching_on_a_one_edge_linear_model():
    """No layers, no LayerNorm, a logit-difference metric: the only edge (embed -> logits) acts
    linearly, so the first-order estimate is exact."""
    from circuits.transformer import GraphTransformer, Shape

    torch.manual_seed(0)
    model = GraphTransformer(Shape(n_layers=0, d_model=8, n_heads=1, d_vocab=11, n_ctx=5, layer_norm=False))
    assert model.graph.edges == ((0, 0),)
    clean, corrupted = torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5))

    def metric(logits, rows=slice(None)):
        return logits[:, -1, 3] - logits[:, -1, 7]

    toy = Task("one-edge", clean, corrupted, metric)
    ablated = ablated_outputs(model, toy)
    exact, eap = exact_scores(model, toy, ablated), eap_scores(model, toy, ablated)
    assert torch.allclose(eap, exact, rtol=1e-5, atol=1e-6) and exact.abs().item() > 1e-3
