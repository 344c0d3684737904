"""Peers' transcoders load as ours and give the peers' outputs: SAELens transcoder folders
(sae_lens/saes/transcoder.py) and circuit-tracer's per-layer files and YAML sets
(circuit_tracer/transcoder/single_layer_transcoder.py, circuit_tracer/configs/). Fixtures are
written here from those documented layouts; the expected outputs are each library's formula
applied by hand."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sae
from sae.base import DictionaryError
from sae.peers import load_circuit_tracer, load_transcoder_set

D_IN, D_OUT, M = 6, 5, 12  # d_in != d_out, so a transposed matrix cannot pass unnoticed


def rand(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def inputs(seed: int = 3) -> torch.Tensor:
    return rand(seed, 40, D_IN)


def saelens_weights(label: str, seed: int = 0) -> dict:
    w = {
        "W_enc": rand(seed, D_IN, M),
        "b_enc": rand(seed + 1, M) * 0.5,
        "W_dec": rand(seed + 2, M, D_OUT),
        "b_dec": rand(seed + 3, D_OUT),
    }
    if "jumprelu" in label:  # some negative: SAELens's ReLU comes first, so they act as 0
        w["threshold"] = torch.linspace(-0.5, 1.0, M)
    if "skip" in label:
        w["W_skip"] = rand(seed + 4, D_OUT, D_IN)
    return w


def write_saelens(folder, cfg: dict, weights: dict):
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_cfg(label: str, **extra) -> dict:
    return {
        "architecture": label,
        "d_in": D_IN,
        "d_sae": M,
        "d_out": D_OUT,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {
            "sae_lens_version": "6.20.0",
            "hook_name": "blocks.1.ln2.hook_normalized",
            "hook_name_out": "blocks.1.hook_mlp_out",
            "model_name": "gpt2",
        },
        **extra,
    }


def saelens_reference(label: str, w: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Transcoder.encode / JumpReLUTranscoder.encode, decode, SkipTranscoder.forward."""
    z = x @ w["W_enc"] + w["b_enc"]
    f = torch.relu(z)
    if "threshold" in w:
        f = f * (z > w["threshold"])
    y = f @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        y = y + x @ w["W_skip"].T
    return f, y


@pytest.mark.parametrize(
    "label", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]
)
def test_saelens_transcoders_give_saelens_outputs(tmp_path, label):
    w = saelens_weights(label)
    folder = write_saelens(tmp_path / label, saelens_cfg(label), w)
    d = sae.load(folder)
    x = inputs()
    f, y = saelens_reference(label, w, x)
    assert f.count_nonzero() > 0 and (f == 0).any()  # the activation actually cuts something
    torch.testing.assert_close(d.encode(x).to_dense(), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d(x), y, atol=1e-5, rtol=1e-5)
    assert d.is_transcoder and d.d_out == D_OUT and (d.W_skip is not None) == ("skip" in label)
    assert d.meta["hook"] == "blocks.1.ln2.hook_normalized" and d.meta["out_hook"] == "blocks.1.hook_mlp_out"
    assert d.meta["format"] == "saelens" and d.meta["defaulted"] == {}


def test_saelens_transcoder_d_out_takes_its_documented_default(tmp_path):
    cfg = saelens_cfg("transcoder")
    del cfg["d_out"]
    folder = write_saelens(tmp_path / "t", cfg, saelens_weights("transcoder"))
    with pytest.raises(DictionaryError, match=r"d_out 768 \(d_out defaulted to 768\)"):
        sae.load(folder)


@pytest.mark.parametrize(
    "problem", ["apply_b_dec", "no apply_b_dec", "extra W_skip", "no threshold", "wide W_dec"]
)
def test_saelens_transcoders_that_do_not_fit_are_refused_in_one_line(tmp_path, problem):
    label = "jumprelu_transcoder" if problem == "no threshold" else "transcoder"
    cfg, w = saelens_cfg(label), saelens_weights(label)
    if problem == "apply_b_dec":
        cfg["apply_b_dec_to_input"] = True
    elif problem == "no apply_b_dec":
        del cfg["apply_b_dec_to_input"]
    elif problem == "extra W_skip":
        w["W_skip"] = rand(9, D_OUT, D_IN)
    elif problem == "no threshold":
        del w["threshold"]
    else:
        w["W_dec"] = rand(9, M, D_OUT + 1)
    folder = write_saelens(tmp_path / "t", cfg, w)
    with pytest.raises(DictionaryError) as error:
        sae.load(folder)
    text = str(error.value)
    assert "\n" not in text and str(folder) in text
    expected = {
        "apply_b_dec": "apply_b_dec_to_input",
        "no apply_b_dec": "apply_b_dec_to_input",
        "extra W_skip": "'W_skip'.*refusing to drop it",
        "no threshold": "lack threshold",
        "wide W_dec": "W_dec",
    }[problem]
    assert re.search(expected, text), text


def circuit_tracer_relu(seed: int, skip: bool) -> dict:
    """load_relu_transcoder's file layout: W_enc [d_sae, d_model], W_dec [d_model, d_sae]."""
    w = {
        "W_enc": rand(seed, M, D_IN),
        "W_dec": rand(seed + 1, D_IN, M),
        "b_enc": rand(seed + 2, M) * 0.5,
        "b_dec": rand(seed + 3, D_IN),
    }
    if skip:
        w["W_skip"] = rand(seed + 4, D_IN, D_IN)
    return w


def circuit_tracer_reference(w: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SingleLayerTranscoder after load_relu_transcoder's transposes: encode, decode, + compute_skip."""
    W_enc, W_dec = w["W_enc"].T, w["W_dec"].T  # the module's [d_model, d_sae], [d_sae, d_model]
    f = torch.relu(x @ W_enc + w["b_enc"])
    y = f @ W_dec + w["b_dec"]
    if "W_skip" in w:
        y = y + x @ w["W_skip"].T
    return f, y


@pytest.mark.parametrize("skip", [False, True])
def test_circuit_tracer_relu_file_gives_circuit_tracer_outputs(tmp_path, skip):
    w = circuit_tracer_relu(0, skip)
    path = tmp_path / "layer_3.safetensors"
    save_file(w, str(path))
    d = sae.load(path)
    x = inputs()
    f, y = circuit_tracer_reference(w, x)
    torch.testing.assert_close(d.encode(x).to_dense(), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d(x), y, atol=1e-5, rtol=1e-5)
    assert d.meta["layer"] == 3 and d.meta["hook"] is None and (d.W_skip is not None) == skip


def test_gemma_scope_npz_gives_circuit_tracer_jumprelu_outputs(tmp_path):
    w = {
        "W_enc": rand(0, D_IN, M).numpy(),
        "W_dec": rand(1, M, D_IN).numpy(),
        "b_enc": rand(2, M).numpy() * 0.5,
        "b_dec": rand(3, D_IN).numpy(),
        "threshold": np.linspace(0.0, 1.0, M, dtype=np.float32),
    }
    path = tmp_path / "params.npz"
    np.savez(path, **w)
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    x = inputs()
    z = x @ t["W_enc"] + t["b_enc"]
    f = z * (z > t["threshold"])  # circuit-tracer's jumprelu: no ReLU before the cut
    d = load_circuit_tracer(path, layer=0)
    torch.testing.assert_close(d.encode(x).to_dense(), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d(x), f @ t["W_dec"] + t["b_dec"], atol=1e-5, rtol=1e-5)
    w["threshold"][0] = -0.1
    np.savez(path, **w)
    with pytest.raises(DictionaryError, match="negative"):
        load_circuit_tracer(path)


def test_circuit_tracer_set_loads_ordered_by_layer_with_block_hooks(tmp_path):
    weights = {layer: circuit_tracer_relu(10 * layer, skip=True) for layer in range(3)}
    for layer, w in weights.items():
        save_file(w, str(tmp_path / f"tc_{layer}.safetensors"))
    entries = "".join(
        f'  - id: "tiny-{layer}"\n    layer: {layer}\n    filepath: "tc_{layer}.safetensors"\n'
        for layer in (2, 0, 1)
    )
    (tmp_path / "tiny.yaml").write_text(
        'model_name: "tiny"\nfeature_input_hook: "ln2.hook_normalized"\n'
        f"feature_output_hook: 'hook_mlp_out'\n\ntranscoders:\n{entries}"
    )
    loaded = load_transcoder_set(tmp_path)
    assert [d.meta["layer"] for d in loaded] == [0, 1, 2]
    assert [d.meta["hook"] for d in loaded] == [f"blocks.{i}.ln2.hook_normalized" for i in range(3)]
    assert [d.meta["out_hook"] for d in loaded] == [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    x = inputs()
    for layer, d in enumerate(loaded):
        torch.testing.assert_close(d(x), circuit_tracer_reference(weights[layer], x)[1], atol=1e-5, rtol=1e-5)
    single = sae.load(
        tmp_path / "tc_1.safetensors"
    )  # one file: its layer and hooks from the config beside it
    assert single.meta["layer"] == 1 and single.meta["out_hook"] == "blocks.1.hook_mlp_out"


@pytest.mark.parametrize("problem", ["hf path", "log_thresholds", "duplicate layer"])
def test_circuit_tracer_inputs_that_do_not_fit_are_refused(tmp_path, problem):
    w = circuit_tracer_relu(0, skip=False)
    if problem == "log_thresholds":
        w["log_thresholds"] = torch.zeros(M)
    save_file(w, str(tmp_path / "tc.safetensors"))
    paths = {"hf path": "hf://mntss/x/layer_0.safetensors"}.get(problem, "tc.safetensors")
    layers = (0, 0) if problem == "duplicate layer" else (0,)
    entries = "".join(f"  - layer: {layer}\n    filepath: {paths}\n" for layer in layers)
    (tmp_path / "set.yaml").write_text(
        f"feature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\ntranscoders:\n{entries}"
    )
    with pytest.raises(DictionaryError) as error:
        load_transcoder_set(tmp_path / "set.yaml")
    assert "\n" not in str(error.value)
    assert {"hf path": "hub", "log_thresholds": "log_thresholds", "duplicate layer": "more than one"}[
        problem
    ] in str(error.value)


def current_file(seed: int, d_sae: int = M, d_model: int = D_IN, **extra) -> dict:
    """SingleLayerTranscoder.to_safetensors's layout (the current circuit-tracer): W_enc and W_dec
    both [d_sae, d_model], nothing transposed on load (load_transcoder)."""
    return {
        "W_enc": rand(seed, d_sae, d_model),
        "W_dec": rand(seed + 1, d_sae, d_model),
        "b_enc": rand(seed + 2, d_sae) * 0.5,
        "b_dec": rand(seed + 3, d_model),
        **extra,
    }


def current_reference(w: dict, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SingleLayerTranscoder.encode (F.linear, then JumpReLU / TopK / ReLU) and decode (+ skip)."""
    z = torch.nn.functional.linear(x, w["W_enc"], w["b_enc"])
    if "activation_function.threshold" in w:
        f = z * (z > w["activation_function.threshold"])
    elif k is not None:
        f = z * torch.zeros_like(z).scatter_(-1, z.topk(k, dim=-1).indices, 1)
    else:
        f = torch.relu(z)
    y = f @ w["W_dec"] + w["b_dec"]
    return f, y + x @ w["W_skip"].T if "W_skip" in w else y


@pytest.mark.parametrize("kind", ["relu", "skip", "jumprelu", "topk key", "topk config"])
def test_circuit_tracer_current_layout_gives_circuit_tracer_outputs(tmp_path, kind):
    extra = {
        "skip": {"W_skip": rand(9, D_IN, D_IN)},
        "jumprelu": {"activation_function.threshold": torch.linspace(0.0, 1.0, M)},
        "topk key": {"k": torch.tensor(3)},
    }.get(kind, {})
    w = current_file(0, **extra)
    path = tmp_path / "layer_2.safetensors"
    save_file(w, str(path))
    if kind == "topk config":  # the hub's config.yaml names the activation (circuit_tracer/utils/hf_utils.py)
        (tmp_path / "config.yaml").write_text(
            "model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n"
            "feature_output_hook: hook_mlp_out\nactivation: topk\nk: 3\n"
        )
    d = sae.load(path)
    x = inputs() + 2.0  # the TopK rows' k largest pre-activations are positive here, as trained ones are
    f, y = current_reference(w, x, k=3 if "topk" in kind else None)
    torch.testing.assert_close(d.encode(x).to_dense(), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d(x), y, atol=1e-5, rtol=1e-5)
    assert d.meta["layout"] == "current" and d.meta["layer"] == 2
    assert d.architecture == {"jumprelu": "jumprelu", "topk key": "topk", "topk config": "topk"}.get(
        kind, "relu"
    )
    if kind == "topk config":
        assert d.meta["hook"] == "blocks.2.ln2.hook_normalized" and d.config.k == 3


def test_a_square_circuit_tracer_file_is_read_by_its_config_or_refused(tmp_path):
    w = current_file(0, d_sae=D_IN)  # d_sae == d_model: the shapes cannot tell the layouts apart
    save_file(w, str(tmp_path / "layer_0.safetensors"))
    with pytest.raises(DictionaryError, match="cannot be told apart") as error:
        sae.load(tmp_path / "layer_0.safetensors")
    assert "\n" not in str(error.value)
    assert load_circuit_tracer(tmp_path / "layer_0.safetensors", layout="current").meta["layout"] == "current"
    (tmp_path / "config.yaml").write_text(  # the current config format: a model_kind, files layer_{i}
        "model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n"
        "feature_output_hook: hook_mlp_out\n"
    )
    (loaded,) = load_transcoder_set(tmp_path)
    x = inputs()
    torch.testing.assert_close(loaded(x), current_reference(w, x)[1], atol=1e-5, rtol=1e-5)
    assert loaded.meta["out_hook"] == "blocks.0.hook_mlp_out"
