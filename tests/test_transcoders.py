"""Transcoders (issue 22): dictionaries that read one hook and predict another."""

from __future__ import annotations

import json

import pytest
import torch

from sae import io
from sae.base import DictionaryError, StepContext, create
from sae.config import DictionaryConfig
from sae.trainee import Trainee
from workbench.errors import ConfigError

D_IN, D_OUT, PLANTED, ACTIVE = 16, 24, 48, 3
TRANSCODER_ARCHITECTURES = (
    "topk",
    "batchtopk",
    "jumprelu",
    "matryoshka",
    "relu",
    "gated",
    "feature_choice",
    "mutual_choice",
)


def planted_map(n: int, seed: int = 0, linear: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (x [n, D_IN], y [n, D_OUT]). Sparse: x = sum_j s_j e_j over ACTIVE of PLANTED input
    directions, y = sum_j s_j g_j with the same codes and other output directions (a map no
    linear function of x gives: PLANTED > D_IN). `linear`: y = M x for Gaussian x."""
    g = torch.Generator().manual_seed(seed)
    if linear:
        m = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(99)) / D_IN**0.5
        x = torch.randn(n, D_IN, generator=g)
        return x, x @ m.t()
    maps = torch.Generator().manual_seed(99)  # the same features for every sample
    enc = torch.nn.functional.normalize(torch.randn(PLANTED, D_IN, generator=maps), dim=1)
    dec = torch.nn.functional.normalize(torch.randn(PLANTED, D_OUT, generator=maps), dim=1)
    chosen = torch.rand(n, PLANTED, generator=g).argsort(dim=1)[:, :ACTIVE]
    codes = torch.zeros(n, PLANTED).scatter_(1, chosen, 1 + torch.rand(n, ACTIVE, generator=g))
    return 1.5 * codes @ enc, 1.5 * codes @ dec  # E|x| about sqrt(D_IN), as the trainer scales rows


def train_transcoder(
    arch: str,
    x,
    y,
    steps: int,
    skip: bool = False,
    n_latents: int = 96,
    lr: float = 1e-2,
    l1_coef: float = 1.0,
):
    config = DictionaryConfig(
        architecture=arch,
        d_in=D_IN,
        n_latents=n_latents,
        k=ACTIVE,
        d_out=D_OUT,
        skip=skip,
        bandwidth=0.1,
        l1_coef=l1_coef,
    )
    dictionary = create(config, seed=0)
    dictionary.initialize_from(x[:2048], y[:2048])
    trainee = Trainee("t", dictionary, lr, clip_grad=1.0, dead_after_tokens=4096)
    batch = 256
    for step in range(steps):
        rows = slice((step * batch) % (len(x) - batch), (step * batch) % (len(x) - batch) + batch)
        trainee.step(x[rows], lr, step / steps, step, target=y[rows])
    dictionary.calibrate(x[:4096])
    return dictionary


def fvu(prediction, y) -> float:
    return float((y - prediction).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch", TRANSCODER_ARCHITECTURES)
def test_transcoder_learns_a_planted_sparse_map(arch):
    x, y = planted_map(16_384)
    dictionary = train_transcoder(arch, x, y, steps=250)
    test_x, test_y = planted_map(2048, seed=1)
    with torch.no_grad():
        predicted = dictionary(test_x)
        best_linear = test_x @ torch.linalg.lstsq(x, y).solution  # what no sparse code is needed for
    assert predicted.shape == (2048, D_OUT)
    assert fvu(predicted, test_y) < 0.7 * fvu(best_linear, test_y), arch  # linear: 0.72, chance: 1
    l0 = float((dictionary.encode(test_x).to_dense() > 0).sum(1).float().mean())
    assert 0 < l0 < 4 * ACTIVE, (arch, l0)


def test_skip_transcoder_learns_a_linear_map_nearly_exactly():
    x, y = planted_map(16_384, linear=True)
    dictionary = train_transcoder("topk", x, y, steps=300, skip=True, lr=1e-2)
    test_x, test_y = planted_map(2048, seed=1, linear=True)
    with torch.no_grad():
        assert fvu(dictionary(test_x), test_y) < 0.02


def test_transcoder_shapes_and_contract():
    d = create(DictionaryConfig(architecture="topk", d_in=8, n_latents=32, k=2, d_out=8, skip=True))
    assert d.is_transcoder and d.d_out == 8 and d.encoder_shift is None
    assert d.W_dec.shape == (32, 8) and d.b_dec.shape == (8,) and d.W_skip.shape == (8, 8)
    assert not torch.allclose(d.W_enc, d.W_dec)  # drawn apart: the spaces differ
    sae = create(DictionaryConfig(architecture="topk", d_in=8, n_latents=32, k=2))
    assert sae.encoder_shift is sae.b_dec and sae.W_skip is None and not sae.is_transcoder
    x = torch.randn(5, 8)
    with pytest.raises(DictionaryError, match="target rows"):
        d.training_step(x, StepContext(None, 0.0))
    # active latents' activations equal their pre-activations
    codes = d.encode(x).to_dense()
    z = d.pre_activations(x)
    assert torch.allclose(codes[codes > 0], z[codes > 0])
    for bad in (dict(d_out=-1), dict(skip=True), dict(architecture="codebook", d_out=8)):
        with pytest.raises(ConfigError):
            DictionaryConfig(**{"d_in": 8, "n_latents": 32, "k": 2, **bad})
    old = DictionaryConfig(d_in=8, n_latents=32, k=2).to_json()
    assert "d_out" not in old and "skip" not in old  # an SAE's config.json reads as before transcoders
    assert DictionaryConfig.from_json(old).effective_d_out == 8
    new = d.config.to_json()
    assert new["d_out"] == 8 and new["skip"] is True and DictionaryConfig.from_json(new) == d.config


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "gated"])
def test_transcoder_folder_round_trip_with_scales(tmp_path, arch):
    d = create(DictionaryConfig(architecture=arch, d_in=6, n_latents=20, k=2, d_out=10, skip=True), seed=3)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(30, 6)
    trained_on = d(x * 2.0) / 0.5  # trained on x * 2 predicting y * 0.5
    io.save(d, tmp_path / "t", input_scale=2.0, output_scale=0.5, hook="a", out_hook="b")
    loaded = io.load(tmp_path / "t")
    assert loaded.meta["out_hook"] == "b" and loaded.d_out == 10 and loaded.W_skip is not None
    assert json.loads((tmp_path / "t" / "config.json").read_text())["dictionary"]["skip"] is True
    assert torch.allclose(loaded(x), trained_on, atol=1e-5)
    # a W_skip of the wrong shape is one line
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "t" / "weights.safetensors")
    tensors["W_skip"] = torch.zeros(6, 10)
    save_file(tensors, tmp_path / "t" / "weights.safetensors")
    with pytest.raises(DictionaryError, match="W_skip has shape"):
        io.load(tmp_path / "t")


def test_mlp_hooks_are_the_mlps_exact_input_and_output(tiny_model):
    """On the (GPT-2) tiny model, the in-hook holds the MLP's input up to its LayerNorm's weight
    and bias (TransformerBridge's ln2.hook_normalized is taken before them), and the MLP module
    applied to that reproduces the out-hook exactly: the hooks bracket the MLP."""
    from workbench.errors import WorkbenchError

    tokens = tiny_model.tokenize(["To be, or not to be, that is the question"])
    for layer in range(tiny_model.n_layers):
        in_hook, out_hook = tiny_model.mlp_hooks(layer)
        assert (in_hook, out_hook) == (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out")
        acts = tiny_model.run_with_cache(tokens, [in_hook, out_hook, f"blocks.{layer}.ln2.hook_out"])
        block = tiny_model.bridge.blocks[layer]
        norm = block.ln2._original_component
        with torch.no_grad():
            mlp_input = acts[in_hook] * norm.weight + norm.bias
            assert torch.allclose(mlp_input, acts[f"blocks.{layer}.ln2.hook_out"], atol=1e-5)
            assert not torch.allclose(acts[in_hook], mlp_input, atol=1e-3)  # before the affine
            output = block.mlp._original_component(mlp_input)
        assert torch.allclose(output, acts[out_hook], atol=1e-5, rtol=1e-5)
    with pytest.raises(WorkbenchError, match="no MLP at layer"):
        tiny_model.mlp_hooks(tiny_model.n_layers)


# --- training from a cache of both hooks, the CLI, the evals (tiny GPT-2 of conftest) ---------


@pytest.fixture(scope="module")
def mlp_cache(tiny_model, tiny_model_dir, tmp_path_factory):
    """`workbench cache --transcoder-layer all` on the tiny model: both layers' MLP hooks."""
    from app.cli import main

    out = tmp_path_factory.mktemp("transcoders") / "cache"
    argv = [
        "cache",
        "--model",
        str(tiny_model_dir),
        "--transcoder-layer",
        "all",
        "--corpus",
        "tiny-shakespeare",
    ]
    argv += ["--tokens", "4096", "--context-length", "32", "--shard-tokens", "1024", "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--quiet", "--json"]) == 0
    return out


def test_cache_of_mlp_hooks_pairs_rows_of_the_same_token(mlp_cache, tiny_model):
    from sae.sources import PairedCacheSource
    from workbench.cache_reader import ActivationCache

    cache = ActivationCache(mlp_cache)
    in_hook, out_hook = tiny_model.mlp_hooks(1)
    assert {in_hook, out_hook} <= set(cache.hooks) and len(cache.hooks) == 4
    source = PairedCacheSource(cache, in_hook, out_hook, seed=3)
    assert (source.d_in, source.d_out) == (64, 64) and source.rows_per_epoch == 128 * 31
    xs = torch.cat([cache.shard(in_hook, i) for i in range(cache.n_shards(in_hook))]).float()
    ys = torch.cat([cache.shard(out_hook, i) for i in range(cache.n_shards(out_hook))]).float()
    where = {tuple(row.tolist()): index for index, row in enumerate(xs)}
    batch = next(iter(source.epoch(0, 256)))
    x, y = source.split(batch)
    rows = torch.tensor([where[tuple(row.tolist())] for row in x])
    assert torch.equal(y, ys[rows])  # the out-hook row of the very token the in-hook row is from
    assert bool((rows % 32 != 0).all())  # BOS rows skipped
    assert not torch.equal(rows, rows.sort().values)  # shuffled (identical contexts share a row here)
    with pytest.raises(Exception, match="no hook"):
        PairedCacheSource(cache, in_hook, "blocks.1.hook_resid_post")


def test_transcoder_training_resumes_bit_for_bit(mlp_cache, tmp_path):
    from sae.train_config import TrainConfig
    from sae.training import train

    def config(out):
        return TrainConfig(
            cache=str(mlp_cache),
            hook="blocks.0.ln2.hook_normalized",
            out_hook="blocks.0.hook_mlp_out",
            architectures=("topk",),
            k=(4,),
            n_latents=128,
            batch_size=256,
            tokens=256 * 40,
            checkpoint_every=10,
            out=str(out),
            device="cpu",
            dictionary=DictionaryConfig(skip=True),
        )

    assert train(config(tmp_path / "a"), progress=False, stop_after_step=25) == []
    resumed = train(config(tmp_path / "a"), progress=False)[0]
    straight = train(config(tmp_path / "b"), progress=False)[0]
    a, b = io.load(resumed), io.load(straight)
    assert a.is_transcoder and a.W_skip is not None and a.meta["out_hook"] == "blocks.0.hook_mlp_out"
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    saved = json.loads((resumed / "config.json").read_text())
    assert saved["dictionary"]["d_out"] == 64 and saved["output_scale_folded"] > 0
    assert saved["config"]["out_hook"] == "blocks.0.hook_mlp_out"
    from sae.train_config import TrainConfig as T

    assert {"out_hook", "transcoder_layers", "cross_layer"}.isdisjoint(T().to_json())  # SAE runs as before


def test_cli_trains_one_transcoder_per_layer_and_evaluates_them_together(mlp_cache, tmp_path, capsys):
    from tests.test_cli import run_cli

    out = tmp_path / "runs"
    code, stdout, err = run_cli(
        capsys,
        *("train", "--cache", str(mlp_cache), "--transcoder-layer", "all", "--arch", "topk,jumprelu"),
        *("--k", "8", "--n-latents", "256", "--batch-size", "256", "--tokens", str(256 * 100)),
        *("--out", str(out), "--device", "cpu", "--quiet", "--json"),
    )
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == 4 and all(r["fvu"] < 0.8 for r in rows), rows
    layer0 = out / "transcoder-blocks.0.ln2.hook_normalized" / "topk-k8-m256"
    layer1 = out / "transcoder-blocks.1.ln2.hook_normalized" / "topk-k8-m256"
    code, stdout, err = run_cli(
        capsys, "eval", str(layer0), str(layer1), "--tokens", "512", "--device", "cpu", "--quiet", "--json"
    )
    assert code == 0, err
    result = json.loads(stdout)
    assert result["replaced"] == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert [t["fvu"] < 0.8 for t in result["transcoders"]] == [True, True]
    assert result["ce_clean"] < result["ce_replaced"] < result["ce_zero_ablation"]
    assert 0 < result["ce_loss_score"] < 1 and 0 < result["kl_score"] < 1
    assert (
        json.loads((layer1 / "eval.json").read_text())["together"]["ce_loss_score"] == result["ce_loss_score"]
    )


def test_eval_replacing_every_mlp_by_zero_is_the_zero_ablation_baseline(tiny_model, tiny_model_dir):
    """Real forward passes: a transcoder that predicts 0 everywhere gives exactly the baseline's
    CE and KL, and its FVU is sum |y|^2 / sum |y - mean|^2 of the MLP outputs the model computes."""
    from sae.evals import EvalConfig
    from sae.transcoder_evals import evaluate_transcoders

    transcoders = []
    for layer in range(tiny_model.n_layers):
        t = create(DictionaryConfig(architecture="topk", d_in=64, n_latents=32, k=2, d_out=64), seed=layer)
        with torch.no_grad():
            t.W_dec.zero_()
        in_hook, out_hook = tiny_model.mlp_hooks(layer)
        t.meta = {
            "hook": in_hook,
            "out_hook": out_hook,
            "model": str(tiny_model_dir),
            "corpus": "tiny-shakespeare",
        }
        transcoders.append(t)
    from workbench.activations import CacheConfig, select_windows

    windows = select_windows(
        CacheConfig(
            model="tiny", corpus="tiny-shakespeare", split="validation", tokens=256, context_length=32
        ),
        tiny_model,
    )
    config = EvalConfig(batch_size=8)
    result = evaluate_transcoders(transcoders, config, tiny_model, progress=False, windows=windows)
    assert (
        result["ce_replaced"] == result["ce_zero_ablation"]
        and result["kl_replaced"] == result["kl_zero_ablation"]
    )
    assert result["ce_loss_score"] == 0 and result["kl_zero_ablation"] > 0.01
    assert result["tokens"] == windows.shape[0] * 31
    y = tiny_model.run_with_cache(windows, ["blocks.1.hook_mlp_out"])["blocks.1.hook_mlp_out"][:, 1:].reshape(
        -1, 64
    )
    y = y.double()
    expected = float(y.pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert result["transcoders"][1]["fvu"] == pytest.approx(expected, rel=1e-6)
    assert result["transcoders"][1]["dead_fraction"] < 1  # topk fires, its decoder writes 0


def test_resampled_transcoder_latents_fire_on_their_share_of_the_batch():
    """A transcoder's input is not centred: resampled latents get encoder biases at which they
    fire on k / n_latents of the batch (with zero biases they fired on most rows and a TopK
    transcoder's FVU jumped from 0.24 to 5 on the demo)."""
    from sae.resample import resample

    x, y = planted_map(4096)
    x = x + 3.0  # a large common component, as MLP inputs have
    for arch in ("topk", "gated", "jumprelu"):
        d = create(DictionaryConfig(architecture=arch, d_in=D_IN, n_latents=64, k=4, d_out=D_OUT), seed=0)
        d.initialize_from(x, y)
        optimizer = torch.optim.Adam(d.parameters())
        chosen = torch.zeros(64, dtype=torch.bool)
        chosen[:8] = True
        with torch.no_grad():
            predicted = d(x)
            assert resample(d, optimizer, chosen, x, predicted, torch.Generator().manual_seed(0), y) == 8
            fires = (d.encode(x).to_dense()[:, :8] > 0).float().mean(0)
        assert float(fires.max()) <= 3 * 4 / 64, (arch, fires)  # ~ k / n_latents = 0.0625 each


def test_eval_refuses_a_hook_that_would_move_a_transcoder(tiny_model, tiny_model_dir):
    """`workbench eval TRANSCODER --hook H` used to score the transcoder at its own hooks and
    ignore H silently; now H other than its in-hook is one line (its own in-hook is accepted)."""
    from sae.evals import EvalConfig, evaluate

    t = create(DictionaryConfig(architecture="topk", d_in=64, n_latents=32, k=2, d_out=64), seed=0)
    in_hook, out_hook = tiny_model.mlp_hooks(0)
    t.meta = {"hook": in_hook, "out_hook": out_hook, "model": str(tiny_model_dir)}
    with pytest.raises(DictionaryError, match="drop --hook") as caught:
        evaluate(t, EvalConfig(hook="blocks.1.hook_resid_post", tokens=64), model=tiny_model, progress=False)
    assert "\n" not in str(caught.value) and in_hook in str(caught.value)


def test_load_records_the_folder_it_read(tmp_path):
    """sae.load puts the folder in meta["path"], so a graph built from loaded transcoders links
    each feature to its folder's store; save does not write it back."""
    t = create(DictionaryConfig(architecture="topk", d_in=8, n_latents=16, k=2, d_out=8), seed=0)
    io.save(t, tmp_path / "tc", hook="blocks.0.ln2.hook_normalized", out_hook="blocks.0.hook_mlp_out")
    loaded = io.load(tmp_path / "tc")
    assert loaded.meta["path"] == str((tmp_path / "tc").absolute())
    io.save(loaded, tmp_path / "copy", hook=loaded.meta["hook"], out_hook=loaded.meta["out_hook"])
    assert "path" not in json.loads((tmp_path / "copy" / "config.json").read_text())


def test_a_transcoder_evaluated_together_shows_its_joint_scores_in_its_store(tmp_path):
    """The Runs page showed CE score / KL score / KL as None for transcoders evaluated together:
    their eval.json keeps the joint scores under "together" and names the KL kl_replaced."""
    from sae.analyze import _metrics_of

    t = create(DictionaryConfig(architecture="topk", d_in=8, n_latents=16, k=2, d_out=8), seed=0)
    (tmp_path / "eval.json").write_text(
        json.dumps({"fvu": 0.3, "together": {"ce_loss_score": 0.79, "kl_score": 0.78, "kl_replaced": 0.2}})
    )
    metrics = _metrics_of(t, tmp_path)
    assert (metrics["fvu"], metrics["ce_loss_score"], metrics["kl_score"], metrics["kl_sae"]) == (
        0.3,
        0.79,
        0.78,
        0.2,
    )


def test_eval_and_analyze_find_the_per_layer_runs_of_a_transcoder_training(tmp_path):
    """`workbench eval OUT` said 'no trained dictionary here' for the folder `workbench train
    --transcoder-layer all --out OUT` wrote (OUT/transcoder-<hook>/<arch>), which circuits takes."""
    from app.commands.dictionaries import _dictionary_folders

    for layer in (0, 1):
        t = create(DictionaryConfig(architecture="topk", d_in=8, n_latents=16, k=2, d_out=8), seed=layer)
        io.save(t, tmp_path / f"transcoder-blocks.{layer}.ln2.hook_normalized" / "topk-k2-m16")
    found = _dictionary_folders(tmp_path)
    assert [f.parent.name for f in found] == [
        "transcoder-blocks.0.ln2.hook_normalized",
        "transcoder-blocks.1.ln2.hook_normalized",
    ]
