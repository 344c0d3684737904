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
