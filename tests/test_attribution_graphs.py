"""Attribution graphs (circuits.graphs): exactness of the replacement model and its edges, and the
graphs against ground truth (planted induction and gate models) and real ablations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from circuits.gates import FALSE_TOKEN, TRUE_TOKEN, gate_model
from circuits.graph_checks import feature_ablation, predicted_effects, replacement_ablation, spearman
from circuits.graphs import AttributionGraph, ablate_feature_effect, attribution_graph
from circuits.induction import induction_model
from circuits.transformer import GraphTransformer, Shape
from sae.base import create
from sae.config import DictionaryConfig
from workbench.errors import ConfigError, WorkbenchError


def _toy(seed: int = 0) -> tuple[GraphTransformer, dict, torch.Tensor]:
    """A random 2-layer model with LayerNorm and MLPs, TopK transcoders with biases (layer 1 with a
    skip connection) and a prompt of 9 tokens; every draw from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # GraphTransformer's own init draws from the global RNG
        model = GraphTransformer(Shape(2, 16, 2, 24, 12, 32, True))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model.ln1[:, 0] += 1
        model.ln2[:, 0] += 1
        model.ln_f[0] += 1
    transcoders = {}
    for layer in range(2):
        d = create(
            DictionaryConfig(architecture="topk", d_in=16, n_latents=24, k=4), seed=seed, salt=str(layer)
        )
        with torch.no_grad():
            d.b_enc.copy_(torch.randn(24, generator=gen) * 0.3)
            d.b_dec.copy_(torch.randn(16, generator=gen) * 0.3)
        if layer == 1:
            d.W_skip = nn.Parameter(torch.randn(16, 16, generator=gen) * 0.2)
        transcoders[layer] = d.eval()
    tokens = torch.randint(0, 24, (9,), generator=gen)
    return model.eval(), transcoders, tokens


def _target_input(system, nodes, row: int, embed, writes) -> torch.Tensor:
    """A target node's input (feature pre-activation z or logit) in the frozen system."""
    if row >= nodes.logit_start:
        return system.logits(embed, writes)[-1, nodes.targets[row - nodes.logit_start]]
    layer, pos, latent = nodes.features[row].tolist()
    return system.pre_activations(layer, system.run(embed, writes, layer))[pos, latent]


def test_replacement_reproduces_the_logits_and_every_input_is_its_edges_plus_its_bias():
    model, transcoders, tokens = _toy()
    graph = attribution_graph(model, transcoders, tokens, edges_per_target=None)
    system, att = graph.system, graph.attribution
    nodes = att.nodes
    embed, writes = system.source_writes()
    with torch.no_grad():
        clean = model(tokens[None])[0]
        assert (system.logits(embed, writes) - clean).abs().max() < 1e-4
        zero_e, zero_w = torch.zeros_like(embed), torch.zeros_like(writes)
        assert nodes.n_features > 20 and len(nodes.targets) >= 1
        for row in list(range(nodes.n_features)) + list(range(nodes.logit_start, nodes.n)):
            # inputs and biases computed independently of the edge code, in the frozen system
            assert att.inputs[row] == pytest.approx(
                float(_target_input(system, nodes, row, embed, writes)), abs=1e-4
            )
            assert att.biases[row] == pytest.approx(
                float(_target_input(system, nodes, row, zero_e, zero_w)), abs=1e-4
            )
        z = torch.stack([system.pre_activations(layer, system.clean.mlp_in[layer]) for layer in (0, 1)])
        layer, pos, latent = nodes.features.T
        assert torch.allclose(nodes.activations, z[layer, pos, latent], atol=1e-5)  # TopK: a = z when active
        assert torch.allclose(att.inputs[: nodes.n_features], nodes.activations, atol=1e-4)
    gap = att.adjacency.incoming() + att.biases - att.inputs
    assert gap.abs().max() < 1e-4
    # rows cut to their 3 largest entries keep the dropped ones' sum, so the books still balance
    cut = attribution_graph(model, transcoders, tokens, edges_per_target=3).attribution
    assert len(cut.adjacency.values) <= 3 * (nodes.n_features + len(nodes.targets))
    assert (cut.adjacency.incoming() + cut.biases - cut.inputs).abs().max() < 1e-4
    assert torch.allclose(cut.adjacency.row_abs, att.adjacency.row_abs, atol=1e-5)


def test_every_edge_is_a_finite_difference_of_its_source_in_the_frozen_model():
    model, transcoders, tokens = _toy(seed=1)
    graph = attribution_graph(model, transcoders, tokens, edges_per_target=None, dtype=torch.float64)
    system, att = graph.system, graph.attribution
    nodes, adj = att.nodes, att.adjacency
    embed, writes = system.source_writes()
    gen = torch.Generator().manual_seed(0)
    picks = torch.randperm(len(adj.values), generator=gen)[:40]
    kinds, eps = set(), 1e-3
    with torch.no_grad():
        for j in picks.tolist():
            row, col, weight = int(adj.rows[j]), int(adj.cols[j]), float(adj.values[j])
            e, w = embed.clone(), writes.clone()
            if col < nodes.error_start:
                layer, pos, latent = nodes.features[col].tolist()
                w[layer, pos] += (
                    eps * system.clean.activations[layer][pos, latent] * transcoders[layer].W_dec[latent]
                )
                kinds.add("feature")
            elif col < nodes.embed_start:
                k = col - nodes.error_start
                layer, pos = nodes.error_layers[k // nodes.n_positions], k % nodes.n_positions
                w[layer, pos] += eps * system.clean.errors[layer, pos]
                kinds.add("error")
            else:
                pos = col - nodes.embed_start
                e[pos] += eps * embed[pos]
                kinds.add("embedding")
            moved = _target_input(system, nodes, row, e, w) - _target_input(system, nodes, row, embed, writes)
            assert float(moved) / eps == pytest.approx(weight, rel=1e-3, abs=1e-9)
    assert kinds == {"feature", "error", "embedding"}


def test_the_graphs_total_effect_is_the_frozen_replacement_models_ablation():
    """(I − A)^-1 over the features (active ones responding linearly) = removing the feature's
    write in the frozen replacement model and letting the later layers' features recompute."""
    model, transcoders, tokens = _toy(seed=3)
    graph = attribution_graph(model, transcoders, tokens, edges_per_target=None, dtype=torch.float64)
    att, system = graph.attribution, graph.system
    nodes = att.nodes
    token = int(nodes.targets[0])
    total = predicted_effects(att, nodes.logit_start, "total")
    direct = predicted_effects(att, nodes.logit_start, "direct")
    frozen = torch.tensor(
        [replacement_ablation(system, *f, token, real_final_norm=False) for f in nodes.features.tolist()],
        dtype=total.dtype,
    )
    assert torch.allclose(total, frozen, atol=1e-8)
    assert not torch.allclose(direct, frozen, atol=1e-3)  # layer-0 features act through layer 1 too


def test_the_hand_written_transpose_equals_autograd():
    model, transcoders, tokens = _toy(seed=2)
    from circuits.replacement import FrozenSystem

    system = FrozenSystem(model, tokens, transcoders, dtype=torch.float64)
    embed, writes = system.source_writes()
    gen = torch.Generator().manual_seed(0)
    for stop, Q in ((0, 9), (1, 5), (2, 9)):
        cot = torch.randn(3, Q, 16, generator=gen, dtype=torch.float64)
        _, pull = torch.func.vjp(lambda e, w: system.run(e, w, stop), embed[:Q], writes[:stop, :Q])
        want = torch.func.vmap(pull)(cot)
        got = system.pull_back(cot, stop)
        assert torch.allclose(got[0], want[0], atol=1e-10) and torch.allclose(got[1], want[1], atol=1e-10)


def test_the_pruned_graph_json_round_trips_and_keeps_the_tokens_and_logits(tmp_path):
    model, transcoders, tokens = _toy()
    graph = attribution_graph(model, transcoders, tokens, targets=[3, 5], node_threshold=0.98)
    path = graph.save(tmp_path / "g.circuit.json")
    data = AttributionGraph.load(path).to_json()
    assert data["kind"] == "attribution-graph" and data["tokens"] == tokens.tolist()
    ids = {n["id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"])
    assert {f"t.{p}" for p in range(9)} | {"l.3", "l.5"} <= ids
    assert all(e["source"] in ids and e["target"] in ids for e in data["edges"])
    assert all(0.0 <= n["influence"] <= 1.0 + 1e-6 for n in data["nodes"])
    kept = [n for n in data["nodes"] if n["type"] == "feature"]
    before = data["pruning"]["nodes_before"]
    assert 0 < len(kept) < graph.attribution.nodes.n_features < before
    assert len(data["edges"]) < data["pruning"]["edges_before"]
    with pytest.raises(WorkbenchError, match="token ids"):
        attribution_graph(model, transcoders, tokens, targets=[99])
    with pytest.raises(WorkbenchError, match="GraphTransformer"):
        attribution_graph(object(), transcoders, tokens)


def test_the_induction_graph_routes_the_prediction_through_the_token_after_the_earlier_occurrence():
    model = induction_model()
    seq = [5, 9, 3, 12, 7, 4]
    tokens = torch.tensor([0, *seq, *seq[:4]])  # ... 3 12 | next is 7, at position 5 earlier
    graph = attribution_graph(model, {}, tokens)
    att = graph.attribution
    assert int(att.nodes.targets[0]) == 7 and att.nodes.n_features == 0
    row = att.nodes.logit_start
    from_embeddings = att.adjacency.dense()[row, att.nodes.embed_start : att.nodes.logit_start]
    assert int(from_embeddings.abs().argmax()) == 5
    assert from_embeddings[5] > 0.8 * from_embeddings.abs().sum()


def _gate_transcoder(model: GraphTransformer, seed: int = 0):
    """A 6-latent ReLU transcoder (d_out 12) fitted (Adam, 400 steps) to the gate MLP on every
    position of the four prompts."""
    from circuits.replacement import FrozenSystem

    prompts = [torch.tensor([0, a, b]) for a in (1, 2) for b in (1, 2)]
    rows = [FrozenSystem(model, p, {}).clean for p in prompts]
    x = torch.cat([r.mlp_in[0] for r in rows])
    y = torch.cat([r.mlp_out[0] for r in rows])
    d = create(
        DictionaryConfig(architecture="relu", d_in=12, n_latents=6, k=6, d_out=12), seed=seed, salt="gate"
    )
    assert d.encoder_shift is None  # a transcoder reads x itself
    opt = torch.optim.Adam([d.W_enc, d.b_enc, d.W_dec, d.b_dec], lr=0.03)
    for _ in range(400):
        loss = (torch.relu(x @ d.W_enc.T + d.b_enc) @ d.W_dec + d.b_dec - y).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert torch.allclose(d(x), torch.relu(x @ d.W_enc.T + d.b_enc) @ d.W_dec + d.b_dec, atol=1e-5)
    return d.eval(), float(loss.detach())


def test_the_gate_graph_routes_through_the_bit_tokens_and_its_features_with_a_small_error():
    model = gate_model("and")
    transcoder, loss = _gate_transcoder(model)
    assert loss < 1e-3
    graph = attribution_graph(
        model, {0: transcoder}, torch.tensor([0, 2, 2]), targets=[TRUE_TOKEN, FALSE_TOKEN]
    )
    att, data = graph.attribution, graph.to_json()
    nodes = att.nodes
    A = att.adjacency.dense()
    row = nodes.logit_start  # TRUE
    assert nodes.n_features >= 1
    features_at_2 = (nodes.features[:, 1] == 2).nonzero().flatten()
    through_features = A[row, features_at_2].abs().sum()
    error = A[row, nodes.error_start : nodes.embed_start].abs().sum()
    assert through_features > 0.5 and error < 0.05 * through_features
    # the bits reach those features from their own positions, not from BOS
    into = A[features_at_2][:, nodes.embed_start : nodes.logit_start].abs().sum(0)
    assert into[1] > 0 and into[2] > 0 and into[0] < 0.05 * (into[1] + into[2])
    influence = {n["id"]: n["share"] for n in data["nodes"]}
    assert influence["t.1"] > 0.1 and influence["t.2"] > 0.1 and influence.get("t.0", 0) < 0.05


@pytest.fixture(scope="module")
def demo():
    from circuits.demo_transcoders import neuron_transcoders
    from circuits.transformer import from_gpt2
    from workbench.models import load_model

    model = load_model("demo")
    return model, neuron_transcoders(from_gpt2(model), k=32)


@pytest.mark.parametrize("prompt", ["The king said unto the people, and the", "ROMEO: I will not go to the"])
def test_ablating_a_graphs_top_features_in_the_real_model_moves_the_logit_as_predicted(demo, prompt):
    """The demo model with its own MLP neurons as TopK transcoders (k 32): for the graph's 10 most
    influential features, the graph's predicted change of the top logit (total effect through
    the graph plus the final LayerNorm's first-order response) against the change when the
    feature's write is removed in the unfrozen model."""
    model, transcoders = demo
    graph = attribution_graph(model, [transcoders[layer] for layer in sorted(transcoders)], prompt)
    att, system = graph.attribution, graph.system
    nodes, row = att.nodes, att.nodes.logit_start
    top = graph.pruned.influence[: nodes.n_features].topk(10).indices
    predicted = predicted_effects(att, row, "total+norm", system)[top]
    token = int(nodes.targets[0])
    actual = torch.tensor([feature_ablation(system, *nodes.features[i].tolist(), token) for i in top])
    assert spearman(predicted, actual.to(predicted.dtype)) >= 0.5
    layer, pos, latent = nodes.features[top[0]].tolist()
    listed = [transcoders[i] for i in sorted(transcoders)]
    assert ablate_feature_effect(model, listed, prompt, layer, pos, latent, token) == pytest.approx(
        float(actual[0]), abs=1e-5
    )
    wrong = copy.deepcopy(listed[1])
    wrong.meta["out_hook"] = "blocks.1.hook_resid_post"
    with pytest.raises(WorkbenchError, match="MLP output"):
        attribution_graph(model, [listed[0], wrong], prompt)
    agree = (predicted.sign() == actual.sign()) | (actual.abs() < 0.02)
    assert agree.float().mean() >= 0.7


def test_demo_transcoders_train_through_the_sae_api_and_are_reused(demo, tmp_path):
    from circuits.demo_transcoders import demo_transcoders

    model, _ = demo
    small = dict(n_latents=64, k=8, tokens=2048, steps=60, batch_size=128)
    first = demo_transcoders(tmp_path, model=model, **small)
    assert [d.meta["hook"] for d in first] == [f"blocks.{layer}.ln2.hook_normalized" for layer in range(4)]
    assert all(
        d.is_transcoder and d.meta["out_hook"] == f"blocks.{i}.hook_mlp_out" for i, d in enumerate(first)
    )
    assert all(d.meta["metrics"]["fvu"] < 0.9 for d in first)  # predicts the MLP output, if roughly
    again = demo_transcoders(tmp_path, model=model, **small)  # same settings: read back, not retrained
    assert all(torch.equal(a.W_dec, b.W_dec) for a, b in zip(first, again))
    graph = attribution_graph(model, again, "The king said unto the people")
    assert graph.to_json()["transcoders"][0]["path"] and graph.to_json()["metrics"]["completeness_gap"] < 1e-3


def test_bench_graphs_rows_carry_their_measurements(demo):
    """`workbench bench graphs`'s two parts on small settings (speed is reported, never asserted)."""
    from app.cli import _build_parser
    from app.flags import config_from_args
    from circuits.bench_graphs import GraphBenchConfig, _one_prompt, _speed

    model, transcoders = demo
    args = _build_parser().parse_args(
        ["bench", "graphs", "--n-latents", "64", "--k", "4", "--prompt-tokens", "8"]
    )
    config = config_from_args(GraphBenchConfig, args)
    speed = _speed(model, GraphBenchConfig(n_latents=config.n_latents, k=4, prompt_tokens=8, reps=1))
    assert speed["features"] == 4 * (8 - 1) * 4  # k per token, none at BOS (zero_bos)
    assert speed["seconds_median"] > 0 and speed["completeness_gap"] < 1e-3
    row = _one_prompt(model, [transcoders[layer] for layer in range(4)], "ROMEO: I will not go to the")
    assert -1 <= row["spearman_replacement"] <= 1 and {"spearman_direct", "sign_total+norm"} <= set(row)
    with pytest.raises(ConfigError):
        GraphBenchConfig(k=0)


def _gated(model: GraphTransformer, seed: int = 0) -> dict:
    """Gated transcoders for `_toy`'s model with every gate / magnitude parameter random (the
    magnitude path W_mag = exp(r_mag) W_gate, b_mag differs from the gate's)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(2):
        d = create(
            DictionaryConfig(architecture="gated", d_in=16, n_latents=24, k=4, d_out=16),
            seed=seed,
            salt=str(layer),
        )
        with torch.no_grad():
            for name in ("W_enc", "b_gate", "r_mag", "b_mag", "b_dec"):
                getattr(d, name).copy_(torch.randn(getattr(d, name).shape, generator=gen) * 0.5)
        out[layer] = d.eval()
    return out


def test_a_gated_transcoders_feature_input_is_its_magnitude_path_and_its_edges_stay_exact():
    model, _, tokens = _toy(seed=4)
    transcoders = _gated(model)
    graph = attribution_graph(model, transcoders, tokens, edges_per_target=None, dtype=torch.float64)
    att, system = graph.attribution, graph.system
    nodes, adj = att.nodes, att.adjacency
    assert nodes.n_features > 10
    with torch.no_grad():
        embed, writes = system.source_writes()
        assert (system.logits(embed, writes)[-1] - model(tokens[None])[0, -1]).abs().max() < 1e-4
        # an active gated latent's activation = its magnitude pre-activation = the sum of its edges + bias
        assert torch.allclose(att.inputs[: nodes.n_features], nodes.activations.double(), atol=1e-6)
        assert (adj.incoming() + att.biases - att.inputs).abs().max() < 1e-8
        gen = torch.Generator().manual_seed(0)
        feature_edges = ((adj.cols < nodes.error_start) & (adj.rows < nodes.n_features)).nonzero().flatten()
        picks = feature_edges[torch.randperm(len(feature_edges), generator=gen)[:12]]
        assert len(picks) >= 5
        eps = 1e-3
        for j in picks.tolist():
            row, col, weight = int(adj.rows[j]), int(adj.cols[j]), float(adj.values[j])
            layer, pos, latent = nodes.features[col].tolist()
            w = writes.clone()
            w[layer, pos] += (
                eps * system.clean.activations[layer][pos, latent] * system.transcoders[layer].W_dec[latent]
            )
            moved = _target_input(system, nodes, row, embed, w) - _target_input(
                system, nodes, row, embed, writes
            )
            assert float(moved) / eps == pytest.approx(weight, rel=1e-3, abs=1e-9)
    # a codebook has no linear pre-activation (nor a transcoder form: an SAE stands in)
    codebook = create(DictionaryConfig(architecture="codebook", d_in=16, n_latents=24, k=2), seed=0)
    with pytest.raises(WorkbenchError, match="linear pre-activation") as error:
        attribution_graph(model, {0: codebook.eval()}, tokens)
    assert "\n" not in str(error.value)


def test_bad_inputs_to_a_graph_are_refused_in_one_line():
    """Non-finite weights (named), batched / empty / too-long prompts, repeated targets, a batch
    size of 0: each a one-line WorkbenchError, not a traceback or a silently different graph."""
    model, transcoders, tokens = _toy()
    nan = copy.deepcopy(transcoders)
    with torch.no_grad():
        nan[1].W_enc[3, 5] = float("nan")
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.W_U[0, 0] = float("inf")
    cases = [
        ((model, nan, tokens), {}, r"layer 1: W_enc \(24, 16\) has 1 non-finite"),
        ((broken, transcoders, tokens), {}, r"the model: W_U .* non-finite"),
        ((model, transcoders, torch.stack([tokens, tokens])), {}, "1-D"),
        ((model, transcoders, tokens[:0]), {}, "non-empty"),
        ((model, transcoders, torch.cat([tokens, tokens])), {}, "18 tokens; the model's n_ctx is 12"),
        ((model, transcoders, tokens), {"targets": [3, 3]}, "repeat"),
        ((model, transcoders, tokens), {"batch_size": 0}, "batch_size"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(WorkbenchError, match=message) as error:
            attribution_graph(*args, **kwargs)
        assert "\n" not in str(error.value)


def test_a_long_prompt_or_another_models_transcoder_is_refused_in_one_line(demo):
    """A text prompt longer than n_ctx is an error naming both lengths (the model's tokenizer
    truncates silently, and the graph would explain another position); a transcoder whose folder
    records another model is refused as `sae.steer` refuses it."""
    model, transcoders = demo
    listed = [transcoders[layer] for layer in sorted(transcoders)]
    long = " ".join(["the king and the queen went to the castle"] * 20) + " and then the ZEBRA"
    with pytest.raises(WorkbenchError, match=rf"prompt is \d+ tokens .*n_ctx is {model.n_ctx}") as error:
        attribution_graph(model, listed, long)
    assert "\n" not in str(error.value)
    other = copy.deepcopy(listed[2])
    other.meta["model"] = "gpt2"
    with pytest.raises(WorkbenchError, match="layer 2 was trained on model 'gpt2', not 'demo'"):
        attribution_graph(model, [listed[0], other], "The king said")


def test_a_gpt2_variant_the_graphs_copy_does_not_reproduce_is_refused(demo, monkeypatch):
    """The graph runs on circuits.transformer.from_gpt2's copy; where that copy's logits differ from
    one real forward (a GPT-2 variant from_gpt2 does not model: here the copy's MLP output weights
    are scaled and the config says relu), the graph is refused in one line naming the field."""
    from circuits import graphs
    from circuits.transformer import from_gpt2

    model, transcoders = demo
    listed = [transcoders[layer] for layer in sorted(transcoders)]

    def variant(m):
        copy_ = from_gpt2(m)
        with torch.no_grad():
            copy_.W_out.mul_(1.5)  # any computation the real model does not do
        return copy_

    monkeypatch.setattr(graphs, "from_gpt2", variant)
    monkeypatch.setattr(model.bridge.original_model.config, "activation_function", "relu")
    with pytest.raises(WorkbenchError, match=r"does not reproduce its logits .*activation_function='relu'"):
        attribution_graph(model, listed, "The king said")
    monkeypatch.undo()
    assert attribution_graph(model, listed, "The king said").data["metrics"]["completeness_gap"] < 1e-3


def test_a_half_precision_model_gets_a_float32_graph_that_stays_complete():
    """A bfloat16 model and transcoders: the frozen system is built in float32 (its copies; the
    caller's stay bfloat16), so each input is still its edges plus its bias to 1e-4 (in bfloat16
    the gap was ~0.3 logits on the demo model)."""
    model, transcoders, tokens = _toy(seed=5)
    model = copy.deepcopy(model).to(torch.bfloat16)
    transcoders = {layer: copy.deepcopy(d).to(torch.bfloat16) for layer, d in transcoders.items()}
    graph = attribution_graph(model, transcoders, tokens, edges_per_target=None)
    assert graph.data["metrics"]["completeness_gap"] < 1e-4
    assert graph.system.clean.logits.dtype == torch.float32 and model.dtype == torch.bfloat16
    assert transcoders[0].W_enc.dtype == torch.bfloat16


def test_zero_bos_puts_no_features_at_bos_and_folds_their_write_into_its_error():
    """zero_bos (default): where position 0 is the model's BOS token, no feature nodes sit there
    (our transcoders skip BOS rows in training, so latents there are noise); the BOS error node is
    the MLP's whole BOS output less b_dec and the skip term, so the logits and every node's
    edges-plus-bias stay exact; without BOS at position 0 nothing changes (as circuit-tracer)."""
    model, transcoders, tokens = _toy(seed=2)
    plain = attribution_graph(model, transcoders, tokens, edges_per_target=None)
    assert plain.data["pruning"]["zero_bos"] is False  # a GraphTransformer names no BOS: untouched
    assert (plain.attribution.nodes.features[:, 1] == 0).any()
    model.bos_token_id = int(tokens[0])
    off = attribution_graph(model, transcoders, tokens, edges_per_target=None, zero_bos=False)
    graph = attribution_graph(model, transcoders, tokens, edges_per_target=None)
    assert torch.equal(off.attribution.nodes.features, plain.attribution.nodes.features)
    system, nodes = graph.system, graph.attribution.nodes
    assert graph.data["pruning"]["zero_bos"] is True and nodes.n_features > 10
    assert not (nodes.features[:, 1] == 0).any()
    assert not any(n["type"] == "feature" and n["position"] == 0 for n in graph.data["nodes"])
    clean = system.clean
    for layer, d in transcoders.items():
        skip = 0 if d.W_skip is None else clean.mlp_in[layer, 0] @ d.W_skip.T
        expected = clean.mlp_out[layer, 0] - d.b_dec - skip
        assert torch.allclose(clean.errors[layer, 0], expected, atol=1e-5)
        assert torch.equal(clean.errors[layer, 1:], off.system.clean.errors[layer, 1:])
    embed, writes = system.source_writes()
    with torch.no_grad():
        assert (system.logits(embed, writes) - model(tokens[None])[0]).abs().max() < 1e-4
    assert graph.data["metrics"]["completeness_gap"] < 1e-4


def test_the_api_takes_token_strings_a_transcoder_folder_and_names_paths_stores_and_effects(demo, tmp_path):
    """targets as token strings (one token each, else one line); transcoders as a folder of
    per-layer runs (sae.load sets meta["path"]): the JSON names each run folder and the
    features.duckdb `workbench analyze` built there; graph.predicted_effect(node id) is the
    graph's own prediction for that feature."""
    from circuits.graph_checks import predicted_effects
    from sae.io import load, save
    from workbench.store import STORE_FILE

    model, transcoders = demo
    for layer, d in transcoders.items():
        save(d, tmp_path / "tc" / f"layer{layer}", hook=d.meta["hook"], out_hook=d.meta["out_hook"])
    (tmp_path / "tc" / "layer1" / STORE_FILE).write_bytes(b"")
    prompt = "To be, or not to"
    be = model.tokenizer.encode(" be", add_special_tokens=False)[0]
    graph = attribution_graph(model, str(tmp_path / "tc"), prompt, targets=" be")
    data = graph.to_json()
    assert [t["token"] for t in data["targets"]] == [be]
    entries = {t["layer"]: t for t in data["transcoders"]}
    assert entries[0]["path"] == str((tmp_path / "tc" / "layer0").absolute()) and entries[0]["store"] is None
    assert entries[1]["store"] == str((tmp_path / "tc" / "layer1" / STORE_FILE).absolute())
    listed = [tmp_path / "tc" / f"layer{layer}" for layer in sorted(transcoders)]
    assert attribution_graph(model, listed, prompt, targets=[be]).to_json()["nodes"] == data["nodes"]
    loaded = [load(folder) for folder in listed]  # sae.load records meta["path"]: same entries
    from_loaded = attribution_graph(model, loaded, prompt, targets=[be]).to_json()
    assert from_loaded["transcoders"] == data["transcoders"]
    nodes = graph.attribution.nodes
    index = int(graph.pruned.influence[: nodes.n_features].argmax())
    node_id = "f.{}.{}.{}".format(*nodes.features[index].tolist())
    want = predicted_effects(graph.attribution, nodes.logit_start, "total+norm", graph.system)[index]
    assert graph.predicted_effect(node_id) == pytest.approx(float(want))
    assert graph.predicted_effect(node_id, "direct", target=" be") == pytest.approx(
        float(predicted_effects(graph.attribution, nodes.logit_start, "direct")[index])
    )
    for call, message in [
        (lambda: attribution_graph(model, listed, prompt, targets=[" be or not"]), r"is \d+ tokens"),
        (lambda: attribution_graph(model, tmp_path / "nothing", prompt), "no such folder"),
        (lambda: graph.predicted_effect("e.0.1"), "no active feature"),
        (lambda: graph.predicted_effect(node_id, target=" the"), "not among"),
    ]:
        with pytest.raises(WorkbenchError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
