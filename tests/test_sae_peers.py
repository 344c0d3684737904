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
    (folder / "cfg.json").write_text(
        json.dumps({"d_in": D, "d_sae": M, "dtype": "float32", "device": "cpu", **cfg})
    )
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
    folder = write_saelens(
        tmp_path / "s",
        {
            "architecture": "standard",
            "apply_b_dec_to_input": apply_b_dec,
            "normalize_activations": "none",
            "metadata": {"hook_name": "blocks.3.hook_resid_pre", "model_name": "gpt2"},
        },
        w,
    )
    inputs = (x() - w["b_dec"]) if apply_b_dec else x()
    d = check(folder, (inputs @ w["W_enc"] + w["b_enc"]).relu(), w)
    assert d.architecture == "relu" and d.meta == {
        "format": "saelens",
        "hook": "blocks.3.hook_resid_pre",
        "model": "gpt2",
        "defaulted": {},
    }


@pytest.mark.parametrize("style", ["v6", "v5"])
def test_saelens_topk(tmp_path, style):
    w = tensors(2, W_enc=(D, M), b_enc=(M,), W_dec=(M, D), b_dec=(D,))
    cfg = (
        {"architecture": "topk", "k": 3}
        if style == "v6"
        else {
            "architecture": "standard",
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 3},
            "hook_name": "blocks.0.hook_resid_post",
        }
    )
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
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "expansion_factor": 2,
                "normalize_decoder": True,
                "num_latents": M,
                "k": 4,
                "multi_topk": False,
                "skip_connection": False,
                "d_in": D,
            }
        )
    )
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
        (folder / "cfg.json").write_text(
            json.dumps({"d_in": D, "num_latents": M, "k": 4, "skip_connection": True})
        )
        save_file(
            {
                "encoder.weight": w["W_dec"].clone(),
                "encoder.bias": w["b_enc"],
                "W_dec": w["W_dec"],
                "b_dec": w["b_dec"],
                "W_skip": torch.eye(D),
            },
            folder / "sae.safetensors",
        )
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
        match = {
            "layer_norm": "normalize_activations='layer_norm' is not supported",
            "unknown_arch": "not supported",
            "missing_tensor": "lack b_enc",
        }[problem]
    with pytest.raises(DictionaryError, match=match) as error:
        io.load(folder)
    assert "\n" not in str(error.value)


def test_a_folder_of_nothing_is_refused(tmp_path):
    with pytest.raises(DictionaryError, match="neither config.json"):
        io.load(tmp_path)
    with pytest.raises(DictionaryError, match="no dictionary folder"):
        io.load(tmp_path / "absent")


def write_sparsify(folder, cfg: dict, weights: dict):
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, folder / "sae.safetensors")
    return folder


def sparsify_tensors(seed: int, m: int = M) -> dict[str, torch.Tensor]:
    return tensors(seed, **{"encoder.weight": (m, D), "encoder.bias": (m,), "W_dec": (m, D), "b_dec": (D,)})


def sparsify_dense(w, k):
    pre = torch.nn.functional.linear(x() - w["b_dec"], w["encoder.weight"], w["encoder.bias"]).relu()
    return topk_dense(pre, k)


SAELENS_V6 = {"metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.0.hook_resid_post"}}


@pytest.mark.parametrize(
    "case",
    [
        "standard+threshold",
        "topk+b_gate",
        "jumprelu+W_skip",
        "gated+b_enc",
        "sparsify+W_skip",
        "sparsify+threshold",
    ],
)
def test_a_tensor_the_loader_would_drop_is_refused_naming_folder_and_tensor(tmp_path, case):
    arch, extra = case.split("+")
    if arch == "sparsify":
        w = {**sparsify_tensors(8), extra: torch.zeros(D, D) if extra == "W_skip" else torch.ones(M)}
        folder = write_sparsify(tmp_path / "layers.2", {"d_in": D, "num_latents": M, "k": 4}, w)
    else:
        names = {
            "standard": ["b_enc"],
            "topk": ["b_enc"],
            "jumprelu": ["b_enc", "threshold"],
            "gated": ["b_gate", "r_mag", "b_mag"],
        }[arch]
        w = tensors(9, W_enc=(D, M), W_dec=(M, D), b_dec=(D,), **{n: (M,) for n in names})
        w[extra] = torch.zeros(D, D) if extra == "W_skip" else torch.full((M,), 1.5)
        folder = write_saelens(tmp_path / arch, {"architecture": arch, "k": 3, **SAELENS_V6}, w)
    with pytest.raises(DictionaryError) as error:
        io.load(folder)
    message = str(error.value)
    assert str(folder) in message and repr(extra) in message and "\n" not in message


@pytest.mark.parametrize(
    "case",
    ["saelens d_in", "saelens d_sae", "saelens 6 architecture", "saelens 5 topk without k", "sparsify d_in"],
)
def test_a_config_field_without_a_documented_default_is_refused(tmp_path, case):
    peer, problem = case.split(" ", 1)
    if peer == "sparsify":
        cfg = {"num_latents": M, "k": 4}
        folder = write_sparsify(tmp_path / "layers.1", cfg, sparsify_tensors(10))
        field = "'d_in'"
    else:
        w = tensors(10, W_enc=(D, M), b_enc=(M,), W_dec=(M, D), b_dec=(D,))
        folder = write_saelens(tmp_path / "s", {"architecture": "standard", **SAELENS_V6}, w)
        cfg = json.loads((folder / "cfg.json").read_text())
        if problem in ("d_in", "d_sae"):
            del cfg[problem]
        if problem == "6 architecture":
            del cfg["architecture"]
        if problem == "5 topk without k":  # SAELens itself would load this as a ReLU SAE
            cfg = {"d_in": D, "d_sae": M, "activation_fn_str": "topk", "activation_fn_kwargs": {}}
        (folder / "cfg.json").write_text(json.dumps(cfg))
        field = {
            "d_in": "'d_in'",
            "d_sae": "'d_sae'",
            "6 architecture": "'architecture'",
            "5 topk without k": "activation_fn_kwargs.k",
        }[problem]
    with pytest.raises(DictionaryError) as error:
        io.load(folder)
    message = str(error.value)
    assert str(folder) in message and field in message and "no default" in message and "\n" not in message


def test_documented_defaults_are_applied_and_reported(tmp_path):
    m = 128  # SAELens's default k is 100
    w = tensors(11, W_enc=(D, m), b_enc=(m,), W_dec=(m, D), b_dec=(D,))
    folder = write_saelens(tmp_path / "topk", {"architecture": "topk", "d_sae": m, **SAELENS_V6}, w)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if k not in ("dtype", "device")})
    )
    d = check(folder, topk_dense((x() - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 100), w)
    assert d.config.k == 100
    assert d.meta["defaulted"] == {
        "k": 100,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "rescale_acts_by_decoder_norm": False,
    }

    w = sparsify_tensors(12, m=D * 32)  # no num_latents: d_in * expansion_factor (32)
    d = check(write_sparsify(tmp_path / "layers.3", {"d_in": D}, w), sparsify_dense(w, 32), w)
    assert (d.n_latents, d.config.k) == (D * 32, 32)
    assert d.meta["defaulted"] == {
        "activation": "topk",
        "skip_connection": False,
        "transcode": False,
        "num_latents": 0,
        "expansion_factor": 32,
        "k": 32,
    }


def test_saelens_topk_rescaled_by_decoder_norm_gives_saelens_outputs(tmp_path):
    w = tensors(13, W_enc=(D, M), b_enc=(M,), W_dec=(M, D), b_dec=(D,))
    folder = write_saelens(
        tmp_path / "r",
        {"architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": True, **SAELENS_V6},
        w,
    )
    n = w["W_dec"].norm(dim=1)
    f = topk_dense(((x() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * n, 3)  # SAELens's encode
    d = io.load(folder)
    torch.testing.assert_close(d.encode(x()).to_dense(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d(x()), (f / n) @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)
    assert "rescale_acts_by_decoder_norm" not in d.meta["defaulted"]


def test_saelens_finetuning_scaling_factor_scales_the_latents_before_decoding(tmp_path):
    w = tensors(14, W_enc=(D, M), b_enc=(M,), W_dec=(M, D), b_dec=(D,), scaling_factor=(M,))
    folder = write_saelens(tmp_path / "f", {"architecture": "standard", "finetuning_scaling_factor": True}, w)
    f = ((x() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    d = io.load(folder)
    torch.testing.assert_close(d.encode(x()).to_dense(), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        d(x()), (f * w["scaling_factor"]) @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5
    )
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": D, "d_sae": M}))
    with pytest.raises(DictionaryError, match="scaling_factor"):
        io.load(folder)
