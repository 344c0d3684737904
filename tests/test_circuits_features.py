"""Feature circuits: latent and error-term effects by integrated gradients, edges between hooks."""

from __future__ import annotations

import json

import pytest
import torch

from circuits.features import (
    _activations,
    _replacement,
    _split_detached,
    exact_feature_effects,
    feature_circuit,
    feature_edges,
    feature_effects,
)
from circuits.graph import load_circuit
from circuits.tasks import TaskError, induction_task
from tests.sae_cases import small

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


@pytest.fixture(scope="module")
def task(tiny_model):
    return induction_task(tiny_model.d_vocab, n=6, length=25, bos=tiny_model.bos_token_id, seed=3)


@pytest.fixture(scope="module")
def dictionaries(tiny_model, task):
    """TopK dictionaries (40 latents, k 6) whose latents point at centred activation rows."""
    out = {}
    acts = _activations(tiny_model, task.clean, list(HOOKS))
    for seed, hook in enumerate(HOOKS):
        sample = acts[hook][:, 1:].reshape(-1, acts[hook].shape[-1])
        dictionary = small("topk", seed=seed, d_in=sample.shape[1], n_latents=40, k=6, aux_k=0)
        picks = sample[
            torch.randperm(len(sample), generator=torch.Generator().manual_seed(seed))[:40]
        ] - sample.mean(0)
        with torch.no_grad():
            dictionary.W_enc.copy_(picks / picks.norm(dim=1, keepdim=True))
            dictionary.W_dec.copy_(dictionary.W_enc)
            dictionary.b_dec.copy_(sample.mean(0))
        out[hook] = dictionary
    return out


def test_rebuilding_a_hook_from_latents_and_error_leaves_the_model_unchanged(tiny_model, task, dictionaries):
    with torch.no_grad():
        plain = tiny_model(task.clean)
        for hook, dictionary in dictionaries.items():
            f, e = _split_detached(dictionary, _activations(tiny_model, task.clean, [hook])[hook])
            assert f.abs().sum() > 0 and e.abs().sum() > 0  # both parts carry something
            with tiny_model.hooks([_replacement(hook, dictionary, f, e)]):
                assert torch.allclose(tiny_model(task.clean), plain, atol=1e-4)


def test_node_effects_add_up_to_patching_the_whole_hook(tiny_model, task, dictionaries):
    """Integrated gradients are complete: latents + error term = m(hook corrupted) − m(clean)."""
    found = feature_effects(tiny_model, task, dictionaries, steps=32)
    assert found.hooks == list(HOOKS)
    with torch.no_grad():
        base = float(task.score(tiny_model(task.clean)))
        for hook, dictionary in dictionaries.items():
            corrupted = _split_detached(dictionary, _activations(tiny_model, task.corrupted, [hook])[hook])
            with tiny_model.hooks([_replacement(hook, dictionary, *corrupted)]):
                patched = float(task.score(tiny_model(task.clean)))
            total = float(found.latents[hook].sum()) + found.errors[hook]
            assert total == pytest.approx(patched - base, rel=0.03, abs=1e-3)
            assert found.latents[hook].abs().sum() > 0


def test_exact_latent_patching_by_hand(tiny_model, task, dictionaries):
    hook = HOOKS[1]
    dictionary = dictionaries[hook]
    f0, e0 = _split_detached(dictionary, _activations(tiny_model, task.clean, [hook])[hook])
    f1, _ = _split_detached(dictionary, _activations(tiny_model, task.corrupted, [hook])[hook])
    latent = int((f1 - f0).abs().sum((0, 1)).argmax())
    f0[..., latent] = f1[..., latent]
    with torch.no_grad():
        base = float(task.score(tiny_model(task.clean)))
        with tiny_model.hooks([_replacement(hook, dictionary, f0, e0)]):
            by_hand = float(task.score(tiny_model(task.clean))) - base
    assert by_hand != 0
    assert float(exact_feature_effects(tiny_model, task, dictionaries, hook, [latent])[0]) == pytest.approx(
        by_hand, abs=1e-5
    )


def test_an_edge_is_the_directional_derivative_of_the_downstream_term(tiny_model, task, dictionaries):
    """edge(u_i -> d_j) = d/dε Σ w_j f_d_j (f_u + ε Δf_u_i) at ε = 0, w_j = ∂m/∂f_d_j
    (central differences)."""
    found = feature_effects(tiny_model, task, dictionaries, steps=4)
    feature_edges(tiny_model, task, dictionaries, found, per_hook=4)
    up, down = HOOKS
    edges = [e for e in found.edges if e[1] >= 0 and e[3] >= 0]
    assert len(edges) == 16 and len(found.edges) == 25  # 4 x 4 latents, + error rows and columns
    _, i, _, j, weight = max(edges, key=lambda e: abs(e[4]))
    assert abs(weight) > 0
    du, dd = dictionaries[up], dictionaries[down]
    f0, e0 = _split_detached(du, _activations(tiny_model, task.clean, [up])[up])
    f1, _ = _split_detached(du, _activations(tiny_model, task.corrupted, [up])[up])
    step = torch.zeros_like(f0)
    step[..., i] = f1[..., i] - f0[..., i]
    held = {}

    def grab(activation, hook=None):
        held["f"] = _split_detached(dd, activation.float())[0]

    def downstream_latent(eps: float) -> torch.Tensor:
        with torch.no_grad(), tiny_model.hooks([_replacement(up, du, f0 + eps * step, e0), (down, grab)]):
            tiny_model(task.clean)
        return held["f"][..., j]

    leaf_f, leaf_e = _split_detached(dd, _activations(tiny_model, task.clean, [down])[down])
    leaf_f.requires_grad_(True)
    with tiny_model.hooks([_replacement(down, dd, leaf_f, leaf_e)]):
        task.score(tiny_model(task.clean)).backward()
    weights = leaf_f.grad[..., j]
    eps = 1e-3
    numeric = float(((downstream_latent(eps) - downstream_latent(-eps)) * weights)[:, 1:].sum() / (2 * eps))
    assert weight == pytest.approx(numeric, rel=0.02, abs=1e-6)


def test_feature_circuit_json_has_feature_and_error_nodes_and_reads_back(
    tiny_model, task, dictionaries, tmp_path
):
    circuit = feature_circuit(
        tiny_model, task, dictionaries, steps=4, per_hook=3, stores={HOOKS[0]: "s0.duckdb"}
    )
    kinds = [n.kind for n in circuit.nodes]
    assert kinds.count("feature") == 6 and kinds.count("error") == 2 and kinds.count("logits") == 1
    ids = {n.id for n in circuit.nodes}
    assert all(e.source in ids and e.target in ids for e in circuit.edges) and any(
        e.in_circuit for e in circuit.edges
    )
    assert {n.store for n in circuit.nodes if n.kind == "feature" and n.hook == HOOKS[0]} == {"s0.duckdb"}
    path = tmp_path / "f.circuit.json"
    circuit.save(path)
    again = load_circuit(path)
    assert again.to_json() == json.loads(json.dumps(circuit.to_json())) and again.method == "feature-ig"


def test_feature_circuit_refusals(tiny_model, task, dictionaries):
    with pytest.raises(TaskError, match="at least one dictionary"):
        feature_effects(tiny_model, task, {})
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match="blocks.9"):
        feature_effects(tiny_model, task, {"blocks.9.hook_resid_post": dictionaries[HOOKS[0]]})


def test_cli_feature_circuit_links_the_feature_store(capsys, tiny_run, tiny_model_dir, tmp_path):
    from tests.test_cli import run_cli

    out = tmp_path / "features.circuit.json"
    code, stdout, err = run_cli(
        capsys,
        "circuits",
        "--model",
        str(tiny_model_dir),
        "--dictionary",
        str(tiny_run),
        "--prompts",
        "4",
        "--length",
        "17",
        "--steps",
        "2",
        "--out",
        str(out),
        "--json",
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["method"] == "feature-ig"
    circuit = load_circuit(out)
    stores = {n.store for n in circuit.nodes if n.kind == "feature"}
    assert stores == {str(tiny_run / "features.duckdb")}
    assert circuit.config["dictionary"] == [str(tiny_run.absolute())] and circuit.config["steps"] == 2
    code, _, err = run_cli(capsys, "circuits", "--config", str(out), "--out", str(tmp_path / "again.json"))
    assert code == 0, err
    assert load_circuit(tmp_path / "again.json").nodes == circuit.nodes  # the file reruns to the same effects


def test_codebook_codes_are_nodes_with_complete_effects_and_no_incoming_gradient_edges(tiny_model, task):
    from sae.base import create
    from sae.config import DictionaryConfig

    acts = _activations(tiny_model, task.clean, list(HOOKS))
    books = {}
    for hook in HOOKS:
        books[hook] = create(
            DictionaryConfig(architecture="codebook", d_in=acts[hook].shape[-1], n_latents=24, k=2)
        )
        with torch.no_grad():
            books[hook].initialize_from(acts[hook][:, 1:].reshape(-1, acts[hook].shape[-1]))
    found = feature_effects(tiny_model, task, books, steps=32)
    with torch.no_grad():
        base = float(task.score(tiny_model(task.clean)))
        corrupted = _split_detached(
            books[HOOKS[0]], _activations(tiny_model, task.corrupted, [HOOKS[0]])[HOOKS[0]]
        )
        with tiny_model.hooks([_replacement(HOOKS[0], books[HOOKS[0]], *corrupted)]):
            patched = float(task.score(tiny_model(task.clean)))
    total = float(found.latents[HOOKS[0]].sum()) + found.errors[HOOKS[0]]
    assert total == pytest.approx(patched - base, rel=0.03, abs=1e-3)
    feature_edges(tiny_model, task, books, found, per_hook=3)
    into_codes = [w for _, _, _, j, w in found.edges if j >= 0]
    into_error = [w for _, _, _, j, w in found.edges if j < 0]
    assert into_codes and all(w == 0.0 for w in into_codes) and any(w != 0.0 for w in into_error)
