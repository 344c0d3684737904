"""What every registered architecture promises: encode/decode/forward agree, the fused path
equals the eager twin, save/load is bit-exact, folding the input scale changes nothing."""

from __future__ import annotations

import pytest
import torch

from sae import io
from sae.base import DictionaryError, StepContext, architectures, create, register
from sae.config import DictionaryConfig
from tests.sae_cases import ARCHITECTURES, D, M, inputs, small
from workbench.errors import ConfigError
from workbench.kernels import use_kernels


def test_every_issue_architecture_is_registered():
    assert set(architectures()) >= {
        "relu",
        "topk",
        "batchtopk",
        "gated",
        "jumprelu",
        "matryoshka",
        "feature_choice",
        "mutual_choice",
    }


def test_package_exports_load_lazily():
    import sae

    assert sae.load is io.load and "topk" in sae.architectures()
    with pytest.raises(AttributeError):
        sae.no_such_thing


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register("topk")(type("Again", (), {}))
    with pytest.raises(ConfigError, match="unknown architecture 'topkk'"):
        create(DictionaryConfig(architecture="topkk", d_in=4, n_latents=8, k=2))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_equals_decode_of_encode(arch):
    d = small(arch)
    x = inputs()
    d.training_step(x, StepContext(None, 0.5))  # sets running thresholds where there are any
    codes = d.encode(x)
    assert codes.n_rows == x.shape[0] and codes.n_latents == M
    assert bool((codes.flat_values() >= 0).all())
    torch.testing.assert_close(d(x), d.decode(codes))
    torch.testing.assert_close(d.decode(codes.to_dense()), d.decode(codes))
    batched = d(x.view(2, -1, D))
    assert batched.shape == (2, x.shape[0] // 2, D)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_step_fused_equals_eager_twin(arch):
    results = []
    for mode in ("torch", "eager"):
        d = small(arch)
        dead = torch.arange(M) % 3 == 0
        with use_kernels(mode):
            out = d.training_step(inputs(), StepContext(dead, 0.5))
            out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in d.named_parameters()}))
    (loss, grads), (loss_eager, grads_eager) = results
    torch.testing.assert_close(loss, loss_eager)
    for name, grad in grads.items():
        assert grad is not None, f"{arch}: no gradient reaches {name}"
        torch.testing.assert_close(grad, grads_eager[name], msg=f"{arch}: {name}")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip_is_bit_exact(arch, tmp_path):
    d = small(arch)
    d.training_step(inputs(), StepContext(None, 0.5))
    io.save(d, tmp_path / arch, hook="blocks.0.hook_resid_post", model="demo")
    loaded = io.load(tmp_path / arch)
    assert type(loaded) is type(d) and loaded.config == d.config
    for name, tensor in d.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(loaded(inputs(2)), d(inputs(2)))
    assert loaded.meta["hook"] == "blocks.0.hook_resid_post" and loaded.meta["format_version"] == 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folded_input_scale_acts_on_raw_activations(arch, tmp_path):
    d = small(arch)
    d.training_step(inputs() * 3.0, StepContext(None, 0.5))
    x = inputs(seed=5)  # not the batch that set running thresholds (ties at a threshold flip)
    expected_codes = d.encode(x * 3.0)
    expected = d(x * 3.0) / 3.0
    io.save(d, tmp_path / "f", input_scale=3.0)
    folded = io.load(tmp_path / "f")
    got = folded.encode(x)
    torch.testing.assert_close(got.to_dense(), expected_codes.to_dense(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_one_line_errors():
    d = small("topk")
    with pytest.raises(DictionaryError, match=r"input has shape \(4, 5\), expected \[\.\.\., 12\]"):
        d.encode(torch.zeros(4, 5))
    with pytest.raises(DictionaryError, match="floating point"):
        d.encode(torch.zeros(4, D, dtype=torch.long))
    with pytest.raises(DictionaryError, match=r"dense codes must be \[N, 40\]"):
        d.decode(torch.zeros(3, 7))


@pytest.mark.parametrize("damage", ["missing", "garbage", "wrong_shape", "bad_version"])
def test_damaged_folders_are_refused_in_one_line(damage, tmp_path):
    d = small("jumprelu")
    folder = io.save(d, tmp_path / "d")
    if damage == "missing":
        (folder / io.WEIGHTS).unlink()
    elif damage == "garbage":
        (folder / io.WEIGHTS).write_bytes(b"\x00" * 40)
    elif damage == "wrong_shape":
        other = small("jumprelu", n_latents=8, k=2)
        io.save(other, tmp_path / "other")
        (folder / io.WEIGHTS).write_bytes((tmp_path / "other" / io.WEIGHTS).read_bytes())
    else:
        text = (folder / io.CONFIG).read_text().replace('"format_version": 1', '"format_version": 99')
        (folder / io.CONFIG).write_text(text)
    with pytest.raises(DictionaryError) as error:
        io.load(folder)
    assert "\n" not in str(error.value) and str(folder) in str(error.value)


def test_unit_norm_decoders_stay_unit_norm_with_orthogonal_gradients():
    d = small("topk")
    out = d.training_step(inputs(), StepContext(None, 0.5))
    out.loss.backward()
    d.before_optimizer_step()
    radial = (d.W_dec.grad * d.W_dec).sum(dim=1)
    assert float(radial.abs().max()) < 1e-5
    with torch.no_grad():
        d.W_dec.add_(0.3 * torch.randn_like(d.W_dec))
    d.after_optimizer_step()
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(M))
