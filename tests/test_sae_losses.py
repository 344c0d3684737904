"""Every architecture's loss equals its formula, written here densely in plain torch, in value
and in every gradient (JumpReLU's threshold against its pseudo-gradient formula)."""

from __future__ import annotations

import pytest
import torch

from sae.base import StepContext
from sae.dictionaries.jumprelu import JumpReLUFunction, StepFunction
from tests.sae_cases import M, inputs, small

DEAD = torch.arange(M) % 4 == 1
PROGRESS = 0.02  # inside the L1 warm-up (5%): lambda is 0.4 of its value


def mse(x, x_hat):
    return (x - x_hat).pow(2).sum(-1).mean()


def pre(d, x, bias=None):
    return (x - d.b_dec) @ d.W_enc.t() + (d.b_enc if bias is None else bias)


def scatter_top(values, k, dim=-1):
    top = values.topk(k, dim=dim)
    return torch.zeros_like(values).scatter(dim, top.indices, top.values)


def aux_k(d, x, x_hat, z):
    residual = (x - x_hat).detach()
    k_aux = min(d.config.effective_aux_k, int(DEAD.sum()))
    chosen = scatter_top(z.masked_fill(~DEAD, float("-inf")), k_aux).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    chosen = torch.where(DEAD, chosen, torch.zeros_like(chosen))
    estimate = chosen @ d.W_dec
    return mse(residual, estimate) / (residual - residual.mean(0)).pow(2).sum(-1).mean()


def with_aux(d, x, f, z, recon):
    x_hat = f @ d.W_dec + d.b_dec
    return recon + d.config.aux_coef * aux_k(d, x, x_hat, z)


def ref_topk(d, x):
    z = pre(d, x)
    f = scatter_top(z, d.config.k).relu()
    return with_aux(d, x, f, z, mse(x, f @ d.W_dec + d.b_dec))


def batch_select(d, z):
    flat = z.reshape(-1)
    return scatter_top(flat, d.config.k * z.shape[0]).view_as(z).relu()


def ref_batchtopk(d, x):
    z = pre(d, x)
    f = batch_select(d, z)
    return with_aux(d, x, f, z, mse(x, f @ d.W_dec + d.b_dec))


def ref_matryoshka(d, x):
    z = pre(d, x)
    f = batch_select(d, z)
    recon = sum(mse(x, f[:, :e] @ d.W_dec[:e] + d.b_dec) for e in d.prefix_ends)
    return with_aux(d, x, f, z, recon)


def ref_feature_choice(d, x):
    z = pre(d, x)
    per_latent = max(1, round(d.config.k * x.shape[0] / M))
    f = scatter_top(z, per_latent, dim=0).relu()
    return mse(x, f @ d.W_dec + d.b_dec)


def ref_relu(d, x):
    f = pre(d, x).relu()
    l1 = (f * d.W_dec.norm(dim=1)).sum(-1).mean()
    return mse(x, f @ d.W_dec + d.b_dec) + d.config.l1_coef * 0.4 * l1


def ref_gated(d, x):
    pi = pre(d, x, d.b_gate)
    mag = (x - d.b_dec) @ (d.W_enc * d.r_mag.exp()[:, None]).t() + d.b_mag
    f = (pi > 0).float() * mag.relu()
    sparsity = (pi.relu() * d.W_dec.norm(dim=1)).sum(-1).mean()
    gate_only = pi.relu() @ d.W_dec.detach() + d.b_dec.detach()
    return mse(x, f @ d.W_dec + d.b_dec) + d.config.l1_coef * 0.4 * sparsity + mse(x, gate_only)


def ref_codebook(d, x):
    keys = torch.nn.functional.normalize(d.W_dec, dim=1).detach()
    chosen = (x @ keys.t()).topk(d.config.k, dim=1).indices
    return mse(x, d.W_dec[chosen].sum(dim=1))


REFERENCES = {
    "codebook": ref_codebook,
    "topk": ref_topk,
    "batchtopk": ref_batchtopk,
    "mutual_choice": ref_batchtopk,
    "matryoshka": ref_matryoshka,
    "feature_choice": ref_feature_choice,
    "relu": ref_relu,
    "gated": ref_gated,
}


def ours_and_reference(arch, reference):
    d, twin = small(arch), small(arch)
    x = inputs()
    out = d.training_step(x, StepContext(DEAD, PROGRESS))
    out.loss.backward()
    expected = reference(twin, x)
    expected.backward()
    return d, twin, out.loss.detach(), expected.detach()


@pytest.mark.parametrize("arch", sorted(REFERENCES))
def test_loss_and_gradients_equal_the_formula(arch):
    d, twin, loss, expected = ours_and_reference(arch, REFERENCES[arch])
    torch.testing.assert_close(loss, expected)
    for (name, param), (_, ref) in zip(d.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(
            param.grad, ref.grad, msg=f"{arch}: gradient of {name}", rtol=1e-4, atol=1e-5
        )


def test_gated_auxiliary_term_does_not_move_the_decoder():
    d, twin = small("gated"), small("gated")
    x = inputs()
    d.training_step(x, StepContext(None, PROGRESS)).loss.backward()
    pi = pre(twin, x, twin.b_gate)
    mag = (x - twin.b_dec) @ (twin.W_enc * twin.r_mag.exp()[:, None]).t() + twin.b_mag
    f = (pi > 0).float() * mag.relu()
    without_aux = (
        mse(x, f @ twin.W_dec + twin.b_dec)
        + twin.config.l1_coef * 0.4 * (pi.relu() * twin.W_dec.norm(dim=1)).sum(-1).mean()
    )
    without_aux.backward()
    torch.testing.assert_close(d.W_dec.grad, twin.W_dec.grad, rtol=1e-4, atol=1e-6)


def test_jumprelu_loss_and_threshold_pseudo_gradient_equal_the_formula():
    d, twin = small("jumprelu"), small("jumprelu")
    x = inputs()
    eps, multiplier = d.config.bandwidth, float(d.multiplier)
    out = d.training_step(x, StepContext(None, 0.5))
    out.loss.backward()
    z = pre(twin, x)
    theta = twin.threshold.detach()
    active = (z > theta).float()
    f = (z * active).detach().requires_grad_()
    recon = mse(x, f @ twin.W_dec + twin.b_dec)
    lam = multiplier * float(recon) / d.config.effective_target_l0
    l0 = active.sum(-1).mean()
    torch.testing.assert_close(out.loss.detach(), (recon + lam * l0).detach())
    (grad_f,) = torch.autograd.grad(recon, f)
    window = ((z - theta).abs() < eps / 2).float().detach()
    expected = (grad_f * -(theta / eps) * window).sum(0) + lam * (-window / eps).sum(0) / x.shape[0]
    torch.testing.assert_close(d.threshold.grad, expected, rtol=1e-4, atol=1e-5)
    assert float(d.threshold.grad.abs().sum()) > 0  # the threshold does receive a gradient
    # The other parameters: d f / d z = H(z - theta) (no straight-through leak into z), and the
    # L0 term sends nothing to the encoder.
    mse(x, (z * active) @ twin.W_dec + twin.b_dec).backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(
            getattr(d, name).grad, getattr(twin, name).grad, rtol=1e-4, atol=1e-5, msg=name
        )


def test_jumprelu_functions_have_the_documented_gradients():
    z = torch.tensor([0.10, 0.24, 0.26, 0.50, 0.90], dtype=torch.float64, requires_grad=True)
    theta = torch.full((5,), 0.25, dtype=torch.float64, requires_grad=True)
    JumpReLUFunction.apply(z, theta, 0.1).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([0, 0, 1, 1, 1], dtype=torch.float64))
    torch.testing.assert_close(theta.grad, torch.tensor([0, -2.5, -2.5, 0, 0], dtype=torch.float64))
    z.grad = theta.grad = None
    StepFunction.apply(z, theta, 0.1).sum().backward()
    assert z.grad is None or float(z.grad.abs().sum()) == 0
    torch.testing.assert_close(theta.grad, torch.tensor([0, -10, -10, 0, 0], dtype=torch.float64))
    away = torch.tensor(
        [0.1, 0.6, 0.9], dtype=torch.float64, requires_grad=True
    )  # true derivative off the jump
    assert torch.autograd.gradcheck(
        lambda v: JumpReLUFunction.apply(v, torch.full((3,), 0.3, dtype=torch.float64), 0.1), (away,)
    )


def test_auxk_gradient_reaches_the_encoder_rows_of_dead_latents():
    grads = {}
    for dead in (None, DEAD):
        d = small("topk")
        d.training_step(inputs(), StepContext(dead, 0.5)).loss.backward()
        grads[dead is None] = d.W_enc.grad.abs().sum(dim=1)
    selected_anyway = grads[True] > 0  # dead latents the main top-k picked get gradient either way
    gained = DEAD & ~selected_anyway
    assert bool(gained.any()) and bool((grads[False][gained] > 0).all())
    torch.testing.assert_close(grads[False][~DEAD], grads[True][~DEAD], rtol=1e-3, atol=1e-4)


def test_batchtopk_running_threshold_follows_its_formula():
    d = small("batchtopk", threshold_momentum=0.25)
    minima = []
    for seed in (1, 2, 3):
        out = d.training_step(inputs(seed), StepContext(None, 0.5))
        minima.append(float(out.codes.flat_values()[out.codes.flat_values() > 0].min()))
    expected = minima[0]
    for value in minima[1:]:
        expected = 0.75 * expected + 0.25 * value
    assert abs(float(d.threshold) - expected) < 1e-5
    codes = d.encode(inputs(9))
    assert bool((codes.flat_values() > float(d.threshold)).all())


@pytest.mark.parametrize("arch", ["relu", "gated", "jumprelu"])
def test_gradients_are_the_same_on_every_run_with_two_threads(arch):
    """A per-latent gather (decoder norms, gates, thresholds) must back-propagate with a
    deterministic sum: advanced indexing's backward (index_put_ with accumulate) changes with
    thread scheduling on CPU, and ReLU/Gated weights differed from run to run at 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(3))
        runs = []
        for _ in range(4):
            d = small(arch, d_in=64, n_latents=2048, k=16, target_l0=16)
            d.training_step(x, StepContext(dead_mask=None, progress=0.5)).loss.backward()
            runs.append([p.grad.clone() for p in d.parameters()])
        assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    finally:
        torch.set_num_threads(threads)
