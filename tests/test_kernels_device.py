"""Every encoder and decoder, fused (the `auto` backend: Triton on CUDA, torch ops on the CPU)
against its eager twin on the same device, in float32 and bfloat16: forward values and the
gradients of every input (issue 19). On this machine they run on the CPU; the GPU check
(scripts/gpu-check.sh) runs the cuda cases."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_cases import encoder
from workbench.kernels import (
    SparseCodes,
    codebook_lookup,
    decode,
    decode_prefixes,
    encode_at,
    encode_batch_topk,
    encode_feature_choice,
    encode_threshold,
    encode_topk,
    use_kernels,
)

N, D, M = 64, 48, 96
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _given_codes(device) -> SparseCodes:
    g = torch.Generator().manual_seed(5)
    counts = torch.randint(0, 6, (N,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    indices = torch.randint(0, M, (int(counts.sum()),), generator=g)
    return SparseCodes(indices.to(device), torch.zeros(len(indices), device=device), M, offsets.to(device))


def _encoders(device):
    dead = (torch.arange(M) % 3 == 0).to(device)
    return {
        "topk": lambda x, w, b: encode_topk(x, w, b, 8),
        "topk + aux": lambda x, w, b: encode_topk(x, w, b, 8, aux_k=4, aux_mask=dead),
        "topk + aux every 2nd row": lambda x, w, b: encode_topk(
            x, w, b, 8, aux_k=4, aux_mask=dead, aux_stride=2
        ),
        "batch topk": lambda x, w, b: encode_batch_topk(x, w, b, 8),
        "batch topk + aux": lambda x, w, b: encode_batch_topk(x, w, b, 8, aux_k=4, aux_mask=dead),
        "feature choice": lambda x, w, b: encode_feature_choice(x, w, b, 4),
        "threshold + window": lambda x, w, b: encode_threshold(
            x, w, b, torch.full((M,), 0.3, dtype=x.dtype, device=device), window=0.2
        ),
        "given indices": lambda x, w, b: encode_at(x, w, b, _given_codes(device)),
    }


def _tensors(device, dtype):
    return [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in encoder(N, D, M, seed=3)]


def _run(mode, name, device, dtype):
    x, w_enc, b_enc, w_dec, b_dec = tensors = _tensors(device, dtype)
    with use_kernels(mode):
        codes = _encoders(device)[name](x - b_dec, w_enc, b_enc)
        active = codes.with_values(codes.values.relu())
        out = decode(active, w_dec, b_dec)
        loss = (out.float() - x.float()).pow(2).sum()
        if codes.extra is not None:
            loss = loss + 0.5 * (decode(codes.extra, w_dec).float() - x.float()).pow(2).sum()
        loss.backward()
    return codes, out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(_encoders("cpu")))
def test_fused_encoders_equal_the_eager_twin_on_the_device(name, dtype, device):
    fused_codes, fused_out, fused_grads = _run("auto", name, device, dtype)
    eager_codes, eager_out, eager_grads = _run("eager", name, device, dtype)
    assert fused_out.device.type == device
    torch.testing.assert_close(
        fused_codes.to_dense().float(), eager_codes.to_dense().float(), **TOLERANCE[dtype]
    )
    torch.testing.assert_close(fused_out.float(), eager_out.float(), **TOLERANCE[dtype])
    for fused, eager in zip(fused_grads, eager_grads):
        scale = max(1.0, float(eager.float().abs().max()))  # gradients sum many bf16 products
        torch.testing.assert_close(fused.float() / scale, eager.float() / scale, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_prefix_decode_equals_the_eager_twin_on_the_device(dtype, device):
    results = {}
    for mode in ("auto", "eager"):
        x, w_enc, b_enc, w_dec, b_dec = _tensors(device, dtype)
        with use_kernels(mode):
            codes = encode_topk(x, w_enc, b_enc, 8)
            out = decode_prefixes(codes.with_values(codes.values.relu()), w_dec, b_dec, [8, 32, M])
            (out.float() * torch.linspace(1, 2, 3, device=device)[:, None, None]).sum().backward()
        results[mode] = [out.detach(), w_enc.grad, b_enc.grad, w_dec.grad, b_dec.grad]
    for fused, eager in zip(results["auto"], results["eager"]):
        assert fused.device.type == device
        scale = max(1.0, float(eager.float().abs().max()))
        torch.testing.assert_close(fused.float() / scale, eager.float() / scale, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_codebook_lookup_on_the_device(dtype, device):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(40, 16, generator=g).to(device=device, dtype=dtype).requires_grad_()
    acts = torch.randn(24, 16, generator=g).to(device=device, dtype=dtype).requires_grad_()
    out, codes = codebook_lookup(acts, codebook, 3)
    assert out.device.type == device and codes.indices.device.type == device
    torch.testing.assert_close(out.float(), codebook[codes.indices].sum(1).float(), **TOLERANCE[dtype])
    (out.float() * torch.ones_like(out, dtype=torch.float32)).sum().backward()
    want = torch.zeros(40, 16, device=device).index_add_(
        0, codes.flat_indices(), torch.ones(72, 16, device=device)
    )
    torch.testing.assert_close(codebook.grad.float(), want, **TOLERANCE[dtype])
