"""Cross-layer transcoders (sae.crosslayer): a planted cross-layer latent is recovered, which
per-layer transcoders of the same size cannot do; the folder round-trips through `sae.load`;
every MLP of a real model can be replaced at once; `workbench train --cross-layer` trains one."""

from __future__ import annotations

import pytest
import torch

import sae
from sae.base import DictionaryError
from sae.crosslayer import CrossLayerConfig, CrossLayerTranscoder
from sae.crosslayer_train import CrossLayerTrainConfig, fvu_per_layer, train_cross_layer
from workbench import seeding


class Planted:
    """Two layers of d = 24 with 24 planted features each (sparse, p = 0.05). Layer 0's feature i
    reads x_0 along E0[i] and writes y_0 along A0[i] AND y_1 along B0[i]; layer 1's own features
    write y_1. x_1 carries nothing of layer 0's features, so only a latent of layer 0 that
    writes to layer 1 can predict the B0 part of y_1. LayerPairs's interface (epoch, sample)."""

    def __init__(self, n: int = 8192, d: int = 24, p: float = 0.05, seed: int = 0):
        g = seeding.generator(seed, "planted cross-layer")

        def unit():
            return torch.nn.functional.normalize(torch.randn(d, d, generator=g), dim=-1)

        self.E0, self.A0, self.B0, E1, A1 = unit(), unit(), unit(), unit(), unit()
        f0, f1 = (
            (torch.rand(n, d, generator=g) < p) * (0.5 + torch.rand(n, d, generator=g)) for _ in range(2)
        )
        self.x = [f0 @ self.E0, f1 @ E1]
        self.y = [f0 @ self.A0, f1 @ A1 + f0 @ self.B0]
        self.in_hooks, self.out_hooks = ["x0", "x1"], ["y0", "y1"]
        self.d_in = self.d_out = d
        self.n_layers, self.rows_per_epoch = 2, n

    def epoch(self, epoch: int, batch_size: int):
        order = torch.randperm(self.rows_per_epoch, generator=seeding.generator(0, "planted order", epoch))
        for start in range(0, self.rows_per_epoch - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield [x[rows] for x in self.x], [y[rows] for y in self.y]

    def sample(self, n: int, stream: str):
        return [x[:n] for x in self.x], [y[:n] for y in self.y]


TRAIN = CrossLayerTrainConfig(tokens=8192 * 4, batch_size=256, lr=1e-2)


def test_a_planted_cross_layer_latent_is_recovered_far_better_than_by_per_layer_transcoders(tmp_path):
    planted = Planted()
    fvu, cross = {}, {}
    for reach in (0, 1):  # 0: a CLT; 1: per-layer transcoders, same latents, same training
        config = CrossLayerConfig(architecture="topk", n_latents=32, k=4, reach=reach)
        clt = train_cross_layer(
            planted, [0, 1], config, tmp_path / f"reach{reach}", train=TRAIN, progress=False
        )
        fvu[reach] = fvu_per_layer(clt, planted.x, planted.y)["fvu_per_layer"]
        decoder = torch.nn.functional.normalize(clt.decoder(0, 1).detach(), dim=-1)
        cross[reach] = (planted.B0 @ decoder.T).max(dim=1).values  # best cosine per planted B0 row
    assert fvu[0][1] < 0.15 and fvu[0][1] < fvu[1][1] / 3, fvu  # per-layer cannot see layer 0's part
    assert fvu[0][0] < 0.15 and fvu[1][0] < 0.15, fvu  # layer 0 alone is easy for both
    assert float(cross[0].median()) > 0.95, cross[0]  # the layer 0 -> 1 decoders are the planted B0
    assert float(cross[1].abs().max()) == 0.0  # reach 1 has no layer 0 -> 1 decoder at all


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "relu"])
def test_every_sparsity_trains_a_cross_layer_transcoder(tmp_path, arch):
    planted = Planted(n=4096)
    config = CrossLayerConfig(architecture=arch, n_latents=32, k=4)
    train = CrossLayerTrainConfig(tokens=4096 * 2, batch_size=256, lr=1e-2)
    clt = train_cross_layer(planted, [0, 1], config, tmp_path / arch, train=train, progress=False)
    metrics = fvu_per_layer(clt, planted.x, planted.y)
    assert max(metrics["fvu_per_layer"]) < 0.9, metrics  # learned something on every layer
    assert all(0 < l0 < 32 for l0 in metrics["l0_per_layer"]), metrics  # sparse, not dead


def test_the_folder_round_trips_through_sae_load(tmp_path):
    planted = Planted(n=1024)
    config = CrossLayerConfig(architecture="jumprelu", n_latents=16, k=3)
    train = CrossLayerTrainConfig(tokens=1024, batch_size=256, lr=1e-2)
    clt = train_cross_layer(planted, [0, 1], config, tmp_path / "clt", seed=3, train=train, progress=False)
    loaded = sae.load(tmp_path / "clt")
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.n_layers == 2
    assert loaded.in_hooks == ["x0", "x1"] and loaded.out_hooks == ["y0", "y1"]
    xs = [x[:64] for x in planted.x]
    for a, b in zip(clt.predict(xs), loaded.predict(xs)):
        torch.testing.assert_close(a, b)
    codes = loaded.encode(1, xs[1])
    active = codes.to_dense()
    z = loaded.pre_activations(1, xs[1])
    torch.testing.assert_close(active[active > 0], z[active > 0])  # an active latent's value is its z
    assert loaded.decoder(0, 1).shape == (16, 24) and loaded.b_dec[1].shape == (24,)
    with pytest.raises(DictionaryError, match="only to layers >= itself"):
        loaded.decoder(1, 0)
    assert "metrics" in loaded.meta and len(loaded.meta["metrics"]["fvu_per_layer"]) == 2


def test_a_folder_with_a_wrong_tensor_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    clt = CrossLayerTranscoder(CrossLayerConfig(n_layers=2, d_in=4, d_out=4, n_latents=8, k=2))
    from sae.crosslayer import save

    save(clt, tmp_path / "c")
    weights = load_file(str(tmp_path / "c" / "weights.safetensors"))
    weights["W_dec.1"] = torch.zeros(8, 2, 4)  # layer 1 of 2 can only write to layer 1
    save_file(weights, str(tmp_path / "c" / "weights.safetensors"))
    with pytest.raises(
        DictionaryError, match=r"W_dec\.1 has shape \(8, 2, 4\), expected \(8, 1, 4\)"
    ) as error:
        sae.load(tmp_path / "c")
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def mlp_cache(tiny_model, tiny_model_dir, tmp_path_factory):
    """Both layers' MLP input and output hooks of the tiny model, 4,096 tokens."""
    from sae.crosslayer_train import default_hooks
    from workbench.activations import CacheConfig, build_cache

    ins, outs = default_hooks([0, 1])
    config = CacheConfig(
        model=str(tiny_model_dir),
        hooks=(*ins, *outs),
        corpus="tiny-shakespeare",
        tokens=4096,
        context_length=32,
        batch_size=8,
        shard_tokens=1024,
        out=str(tmp_path_factory.mktemp("clt-cache") / "cache"),
    )
    return build_cache(config, model=tiny_model, progress=False)


def test_every_mlp_of_a_model_is_replaced_at_once(tiny_model, mlp_cache, tmp_path):
    from sae.crosslayer_eval import evaluate_replaced
    from workbench.cache_reader import ActivationCache

    config = CrossLayerConfig(architecture="topk", n_latents=64, k=8)
    train = CrossLayerTrainConfig(tokens=4096 * 3, batch_size=256, lr=3e-3)
    clt = train_cross_layer(mlp_cache, [0, 1], config, tmp_path / "clt", train=train, progress=False)
    assert clt.in_hooks == ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"]
    windows = ActivationCache(mlp_cache).tokens[:8]
    metrics = evaluate_replaced(clt, tiny_model, windows)
    assert max(metrics["fvu_per_layer"]) < 0.3 and metrics["ce_loss_score"] > 0.5, metrics
    assert metrics["kl_replaced"] < metrics["kl_zero_ablation"] / 2, metrics
    with torch.no_grad():  # a CLT that predicts 0 everywhere IS the zero ablation of every MLP
        for w in clt.W_dec:
            w.zero_()
        clt.b_dec.zero_()
    nothing = evaluate_replaced(clt, tiny_model, windows)
    assert nothing["ce_replaced"] == pytest.approx(nothing["ce_zero_ablation"], abs=1e-6)
    assert nothing["ce_replaced"] > metrics["ce_replaced"]


def test_workbench_train_cross_layer(mlp_cache, tmp_path, monkeypatch, capsys):
    """The CLI on the tiny model (the demo's recipe at d_model 64, 2 layers): a cache of both
    layers' MLP hooks -> `workbench train --cross-layer` -> a CLT folder scored with every MLP
    replaced on held-out text."""
    import json

    import sae.crosslayer_run
    import workbench.activations
    from app.cli import main

    monkeypatch.setattr(sae.crosslayer_run, "EVAL_TOKENS", 1024)  # held-out text scored after training
    chosen = {}  # validation windows, tokenized once for the training run's score and `eval`
    select = workbench.activations.select_windows
    monkeypatch.setattr(
        workbench.activations, "select_windows", lambda c, m: chosen.setdefault(c, select(c, m))
    )
    argv = ["train", "--cross-layer", "--transcoder-layer", "all", "--arch", "topk", "--k", "8"]
    argv += ["--n-latents", "64", "--cache", str(mlp_cache), "--tokens", "12288", "--batch-size", "256"]
    capsys.readouterr()
    assert main([*argv, "--lr", "0.003", "--out", str(tmp_path / "clt"), "--quiet", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(row["fvu_per_layer"]) == 2 and row["fvu"] < 0.3 and row["ce_loss_score"] > 0.5, row
    clt = sae.load(tmp_path / "clt")
    assert isinstance(clt, CrossLayerTranscoder) and clt.n_layers == 2 and clt.n_latents == 64
    assert clt.out_hooks == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert clt.meta["metrics"]["replaced_every_mlp"]["tokens"] > 0
    assert main([*argv, "--arch", "topk,relu", "--out", str(tmp_path / "grid")]) == 2  # one CLT, one --arch
    assert main(["eval", str(tmp_path / "clt"), "--tokens", "1024", "--json"]) == 0  # every MLP replaced
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["ce_loss_score"] == pytest.approx(row["ce_loss_score"], abs=1e-4)  # the same windows
    assert (
        json.loads((tmp_path / "clt" / "eval.json").read_text())["fvu_per_layer"] == scored["fvu_per_layer"]
    )
    assert main(["analyze", str(tmp_path / "clt"), "--cache", str(mlp_cache)]) == 2
    assert "a cross-layer transcoder; workbench analyze takes per-layer" in capsys.readouterr().err


@pytest.mark.parametrize("activation", ["relu", "jump_relu"])
def test_circuit_tracer_clt_folder_gives_circuit_tracer_outputs(tmp_path, activation):
    """circuit_tracer/transcoder/cross_layer_transcoder.py's layout (to_safetensors / load_clt):
    W_enc_i [d_tc, d_model], b_enc_i, b_dec_i, threshold_i; W_dec_i [d_tc, L - i, d_model]."""
    from safetensors.torch import save_file

    L, m, d = 3, 10, 6
    g = seeding.generator(0, "circuit-tracer clt")
    weights = {}
    for i in range(L):
        enc = {f"W_enc_{i}": torch.randn(m, d, generator=g), f"b_enc_{i}": torch.randn(m, generator=g) * 0.3}
        enc[f"b_dec_{i}"] = torch.randn(d, generator=g)
        if activation == "jump_relu":
            enc[f"threshold_{i}"] = torch.rand(m, generator=g)
        save_file(enc, str(tmp_path / f"W_enc_{i}.safetensors"))
        dec = {f"W_dec_{i}": torch.randn(m, L - i, d, generator=g)}
        save_file(dec, str(tmp_path / f"W_dec_{i}.safetensors"))
        weights.update(enc | dec)
    config = "model_name: tiny\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n"
    (tmp_path / "config.yaml").write_text(config)
    xs = [torch.randn(20, d, generator=g) for _ in range(L)]
    fs = []
    for i, x in enumerate(xs):  # CrossLayerTranscoder.encode_layer, then compute_reconstruction
        z = x @ weights[f"W_enc_{i}"].T + weights[f"b_enc_{i}"]
        fs.append(z * (z > weights[f"threshold_{i}"]) if activation == "jump_relu" else torch.relu(z))
    ys = [
        weights[f"b_dec_{t}"] + sum(fs[i] @ weights[f"W_dec_{i}"][:, t - i] for i in range(t + 1))
        for t in range(L)
    ]
    clt = sae.load(tmp_path)
    assert isinstance(clt, CrossLayerTranscoder) and clt.architecture == (
        "jumprelu" if "jump" in activation else "relu"
    )
    for i in range(L):
        torch.testing.assert_close(clt.encode(i, xs[i]).to_dense(), fs[i], atol=1e-5, rtol=1e-5)
    for y, y_hat in zip(ys, clt.predict(xs)):
        torch.testing.assert_close(y_hat, y, atol=1e-5, rtol=1e-5)
    assert (
        clt.in_hooks == [f"blocks.{i}.ln2.hook_normalized" for i in range(L)] and clt.meta["model"] == "tiny"
    )
    save_file(
        {"W_dec_2": torch.zeros(m, 2, d)}, str(tmp_path / "W_dec_2.safetensors")
    )  # layer 2 of 3 writes 1
    with pytest.raises(DictionaryError, match=r"W_dec_2 has shape \(10, 2, 6\), expected \(10, 1, 6\)"):
        sae.load(tmp_path)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_per_layer_transcoders_as_a_clt_of_reach_1_give_their_outputs(arch):
    from sae.config import DictionaryConfig
    from sae.crosslayer import from_per_layer

    config = DictionaryConfig(architecture=arch, d_in=6, n_latents=12, k=3, d_out=5)
    transcoders = [sae.create(config, seed=layer) for layer in range(3)]
    x = torch.randn(30, 6, generator=seeding.generator(0, "per-layer check"))
    for layer, d in enumerate(transcoders):
        with torch.no_grad():
            d.b_enc.normal_(0, 0.3, generator=seeding.generator(layer, "b_enc"))
            if arch in ("jumprelu", "batchtopk"):
                d.threshold.fill_(0.2)
        if arch == "batchtopk":
            d.threshold_updates.fill_(1)
        d.meta = {"hook": f"blocks.{layer}.ln2.hook_normalized", "out_hook": f"blocks.{layer}.hook_mlp_out"}
    clt = from_per_layer(transcoders)
    for layer, (d, y) in enumerate(zip(transcoders, clt.predict([x] * 3))):
        torch.testing.assert_close(y, d(x))
    assert all(float(clt.decoder(0, t).abs().sum()) == 0 for t in (1, 2))  # reach 1: nothing across layers
    assert clt.out_hooks[2] == "blocks.2.hook_mlp_out"


def test_replaced_eval_agrees_with_the_per_layer_transcoders_eval(tiny_model, tiny_model_dir, monkeypatch):
    """Two implementations of 'every MLP replaced at once' (sae.crosslayer_eval on a reach-1 CLT,
    sae.transcoder_evals on the per-layer transcoders) give the same CE and KL."""
    import workbench.activations
    from sae.config import DictionaryConfig
    from sae.crosslayer import from_per_layer
    from sae.crosslayer_eval import evaluate_replaced
    from sae.evals import EvalConfig
    from sae.transcoder_evals import evaluate_transcoders
    from workbench.activations import CacheConfig

    chosen = {}  # the windows, tokenized once (selecting them costs seconds) for both evals
    select = workbench.activations.select_windows
    monkeypatch.setattr(
        workbench.activations, "select_windows", lambda c, m: chosen.setdefault(c, select(c, m))
    )

    config = DictionaryConfig(architecture="topk", d_in=64, n_latents=32, k=4, d_out=64)
    transcoders = [sae.create(config, seed=layer) for layer in range(2)]
    for layer, d in enumerate(transcoders):
        d.meta = {"hook": f"blocks.{layer}.ln2.hook_normalized", "out_hook": f"blocks.{layer}.hook_mlp_out"}
        d.meta |= {"model": str(tiny_model_dir), "corpus": "tiny-shakespeare", "context_length": 32}
    eval_config = EvalConfig(tokens=256, batch_size=4, context_length=32)
    theirs = evaluate_transcoders(transcoders, eval_config, tiny_model, progress=False)
    text = CacheConfig(
        model=str(tiny_model_dir),
        corpus="tiny-shakespeare",
        split="validation",
        tokens=256,
        context_length=32,
    )
    windows = workbench.activations.select_windows(text, tiny_model)
    assert len(chosen) == 1  # the same windows as evaluate_transcoders chose
    ours = evaluate_replaced(from_per_layer(transcoders), tiny_model, windows, batch_size=4)
    for key in ("ce_clean", "ce_replaced", "ce_zero_ablation", "kl_replaced", "kl_zero_ablation"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
    assert ours["fvu_per_layer"] == pytest.approx([t["fvu"] for t in theirs["transcoders"]], rel=1e-5)


def test_a_cross_layer_transcoder_given_to_steer_or_splice_is_one_line():
    """sae.ablate / sae.splice on a CLT said 'does not record its hook; pass hook=' (it records
    them) and, with hook=, raised an AttributeError; now one line names what it is."""
    import sae
    from sae.base import DictionaryError
    from sae.crosslayer import CrossLayerConfig, CrossLayerTranscoder

    clt = CrossLayerTranscoder(CrossLayerConfig(n_layers=2, d_in=4, d_out=4, n_latents=8, k=2))
    clt.meta = {"in_hooks": ["blocks.0.ln2.hook_normalized"], "model": "demo"}
    for call in (lambda: sae.ablate(clt, 3), lambda: sae.ablate(clt, 3, hook="blocks.0.hook_mlp_out")):
        with pytest.raises(DictionaryError, match="a cross-layer transcoder; steering") as caught:
            call()
        assert "\n" not in str(caught.value)
