"""SAELens and sparsify folders, written here from their documented layouts, load into
dictionaries that give the outputs those libraries' formulas give."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sae import io
from sae.base import DictionaryError

D, M = 10, 24


def tensors(seed: int, **shapes) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=generator) * 0.5 for name, shape in shapes.items()}


def x(seed: int = 7) -> torch.Tensor:
    return torch.randn(16, D, generator=torch.Generator().manual_seed(seed))


def write_saelens(folder, cfg: dict, weights: dict):
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": M, "dtype": "float32", "device": "cpu", **cfg}))
    save_file(weights, folder / "sae_weights.safetensors")
    return folder


def topk_dense(z, k):
    top = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, top.indices, top.values.relu())


def check(folder, expected_f, w):
    d = io.load(folder)
    inputs = x()
    torch.testing.assert_close(d.encode(inputs).to_dense(), expected_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d(inputs), expected_f @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)
    return d


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard(tmp_path, apply_b_dec):
    w = tensors(1, W_enc=(D, M), b_enc=(M,), W_dec=(M, D), b_dec=(D,))
    folder = write_saelens(tmp_path / "s", {"architecture": "standard", "apply_b_dec_to_input": apply_b_dec,
                                            "normalize_activations": "none", "metadata": {"hook_name": "blocks.3.hook_resid_pre", "model_name": "gpt2"}}, w)
    inputs = (x() - w["b_dec"]) if apply_b_dec else x()
    d = check(folder, (inputs @ w["W_enc"] + w["b_enc"]).relu(), w)
    assert d.architecture == "relu" and d.meta == {"format": "saelens", "hook": "blocks.3.hook_resid_pre", "model": "gpt2"}


@pytest.mark.parametrize("style", ["v6", "v5"])
def test_saelens_topk(tmp_path, style):
    w = tensors(2, W_enc=(D, M), b_enc=(M,), W_dec=(M, D), b_dec=(D,))
    cfg = {"architecture": "topk", "k": 3} if style == "v6" else {
        "architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "hook_name": "blocks.0.hook_resid_post"}
    folder = write_saelens(tmp_path / style, cfg, w)
    check(folder, topk_dense((x() - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 3), w)


def test_saelens_jumprelu_with_negative_thresholds(tmp_path):
    w = tensors(3, W_enc=(D, M), b_enc=(M,), W_dec=(M, D), b_dec=(D,), threshold=(M,))
    folder = write_saelens(tmp_path / "j", {"architecture": "jumprelu"}, w)
    z = (x() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    check(folder, z.relu() * (z > w["threshold"]), w)
    assert bool((w["threshold"] < 0).any())


def test_saelens_gated(tmp_path):
    w = tensors(4, W_enc=(D, M), b_gate=(M,), r_mag=(M,), b_mag=(M,), W_dec=(M, D), b_dec=(D,))
    folder = write_saelens(tmp_path / "g", {"architecture": "gated", "apply_b_dec_to_input": False}, w)
    pi = x() @ w["W_enc"] + w["b_gate"]
    mag = x() @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]
    check(folder, (pi > 0).float() * mag.relu(), w)


def test_sparsify_topk(tmp_path):
    w = tensors(5, **{"encoder.weight": (M, D), "encoder.bias": (M,), "W_dec": (M, D), "b_dec": (D,)})
    folder = tmp_path / "layers.6"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 2, "normalize_decoder": True, "num_latents": M, "k": 4, "multi_topk": False, "skip_connection": False, "d_in": D}))
    save_file(w, folder / "sae.safetensors")
    pre = (torch.nn.functional.linear(x() - w["b_dec"], w["encoder.weight"], w["encoder.bias"])).relu()
    top = pre.topk(4, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    d = check(folder, expected, w)
    assert d.meta["format"] == "sparsify" and d.meta["hook"] == "layers.6"


@pytest.mark.parametrize("problem", ["layer_norm", "unknown_arch", "missing_tensor", "skip"])
def test_unsupported_peer_folders_are_one_line_errors(tmp_path, problem):
    w = tensors(6, W_enc=(D, M), b_enc=(M,), W_dec=(M, D), b_dec=(D,))
    if problem == "skip":
        folder = tmp_path / "t"
        folder.mkdir()
        (folder / "cfg.json").write_text(json.dumps({"k": 4, "skip_connection": True}))
        save_file({"encoder.weight": w["W_dec"].clone(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"], "W_skip": torch.eye(D)}, folder / "sae.safetensors")
        match = "skip connection"
    else:
        cfg = {"architecture": "standard"}
        if problem == "layer_norm":
            cfg["normalize_activations"] = "layer_norm"
        if problem == "unknown_arch":
            cfg["architecture"] = "temporal"
        if problem == "missing_tensor":
            w.pop("b_enc")
        folder = write_saelens(tmp_path / problem, cfg, w)
        match = {"layer_norm": "run time", "unknown_arch": "not supported", "missing_tensor": "lack b_enc"}[problem]
    with pytest.raises(DictionaryError, match=match) as error:
        io.load(folder)
    assert "\n" not in str(error.value)


def test_a_folder_of_nothing_is_refused(tmp_path):
    with pytest.raises(DictionaryError, match="neither config.json"):
        io.load(tmp_path)
    with pytest.raises(DictionaryError, match="no dictionary folder"):
        io.load(tmp_path / "absent")
