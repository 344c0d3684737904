"""Fused encoders and decoders against their eager (dense) twins, finite differences and the
formulas they implement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import need
from tests.kernel_cases import csr_codes, encoder, fixed_codes
from workbench.errors import ConfigError
from workbench.kernels import (
    KernelInputError,
    codebook_lookup,
    decode,
    decode_prefixes,
    encode_at,
    encode_batch_topk,
    encode_feature_choice,
    encode_threshold,
    encode_topk,
    select,
    torch_ops,
)
from workbench.kernels import encode as encode_module
from workbench.kernels.autograd import PreactsAt, SparseDecode
from workbench.kernels.pattern import pattern_of

N, D, M = 6, 5, 12
ROW_SCALE = torch.tensor([1.0, 10.0, 1.0, 1.0, 1.0, 1.0])


def sae_loss(encode, x, w_enc, b_enc, w_dec, b_dec):
    """A TopK-style forward: encode, ReLU, decode, a loss that touches every output (also the
    `extra` selection, as AuxK's loss does)."""
    codes = encode(x - b_dec, w_enc, b_enc)
    active = codes.with_values(codes.values.relu())
    loss = (decode(active, w_dec, b_dec) - x).pow(2).sum()
    if codes.extra is not None:
        loss = loss + 0.5 * (decode(codes.extra, w_dec) - x).pow(2).sum()
    return loss


ENCODERS = {
    "topk": lambda x, w, b: encode_topk(x, w, b, 3),
    "topk k=1": lambda x, w, b: encode_topk(x, w, b, 1),
    "topk k=m": lambda x, w, b: encode_topk(x, w, b, M),
    "topk + aux": lambda x, w, b: encode_topk(x, w, b, 3, aux_k=2, aux_mask=torch.arange(M) % 3 == 0),
    "topk + aux on every 2nd row": lambda x, w, b: encode_topk(
        x, w, b, 3, aux_k=2, aux_mask=torch.arange(M) % 3 == 0, aux_stride=2
    ),
    "batch topk": lambda x, w, b: encode_batch_topk(x, w, b, 3),
    "batch topk + aux": lambda x, w, b: encode_batch_topk(
        x, w, b, 2, aux_k=2, aux_mask=torch.arange(M) % 2 == 1
    ),
    # row 1 owns more than its 2 candidates: the second round recomputes it in full
    "batch topk, one row owns most": lambda x, w, b: encode_batch_topk(
        x * ROW_SCALE.to(x.dtype)[:, None], w, b, 1
    ),
    "feature choice": lambda x, w, b: encode_feature_choice(x, w, b, 2),
    "threshold + window": lambda x, w, b: encode_threshold(
        x, w, b, torch.full((M,), 0.2, dtype=x.dtype), window=0.5
    ),
    "given indices": lambda x, w, b: encode_at(x, w, b, csr_codes([0, 3, 1, 4, 0, 2], M)),
}


def grads(mode, monkeypatch, encode, seed=0):
    monkeypatch.setenv("WORKBENCH_KERNELS", mode)
    tensors = encoder(N, D, M, seed=seed)
    loss = sae_loss(encode, *tensors)
    loss.backward()
    return loss.detach(), [t.grad for t in tensors]


def assert_matches_eager_twin(mode, name, monkeypatch):
    loss, gradients = grads(mode, monkeypatch, ENCODERS[name])
    loss_eager, gradients_eager = grads("eager", monkeypatch, ENCODERS[name])
    torch.testing.assert_close(loss, loss_eager)
    for fused, eager in zip(gradients, gradients_eager):
        torch.testing.assert_close(fused, eager)


@pytest.mark.parametrize("rows_per_pass", [None, 4])
@pytest.mark.parametrize("name", ENCODERS)
def test_fused_forward_and_gradients_equal_eager_twin(name, rows_per_pass, monkeypatch):
    """In one pass, and in passes of 4 rows (6 rows: blocks of 4 and 2) as large batches run."""
    if rows_per_pass:
        monkeypatch.setattr(encode_module, "ROWS_PER_PASS", rows_per_pass)
    assert_matches_eager_twin("torch", name, monkeypatch)


def test_a_saturated_row_is_recomputed_in_full():
    pre = torch.randn(N, M, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pre[1] += 10
    asked = []
    values, indices = select.batch_candidates(pre, 1)
    codes = select.batch_top_k_of(
        values, indices, 1, M, lambda rows: asked.append(rows.tolist()) or pre[rows]
    )
    assert len(asked) == 1 and 1 in asked[0]  # one second round, row 1 among the rows recomputed
    assert codes.l0()[1] > values.shape[1]  # row 1 owns more than its 2 candidates
    assert sorted((codes.row_ids() * M + codes.flat_indices()).tolist()) == sorted(
        pre.reshape(-1).topk(N).indices.tolist()
    )


def test_triton_backend_equals_eager_twin(monkeypatch):
    need("triton", "triton")
    for name in ("topk + aux", "batch topk", "threshold + window"):
        assert_matches_eager_twin("triton", name, monkeypatch)


@pytest.mark.parametrize("batch", [encode_topk, encode_batch_topk])
def test_strided_aux_selects_on_every_sth_row_what_the_full_selection_does(batch, monkeypatch):
    """AuxK on rows 0, s, 2s, ... (issue 16: 12x the main decode at aux_k 384) is the full
    selection's rows there, and nothing elsewhere."""
    monkeypatch.setenv("WORKBENCH_KERNELS", "torch")
    x, w_enc, b_enc, _, _ = encoder(N, D, M)
    dead = torch.arange(M) % 2 == 0
    full = batch(x, w_enc, b_enc, 2, aux_k=3, aux_mask=dead).extra.to_csr()
    strided = batch(x, w_enc, b_enc, 2, aux_k=3, aux_mask=dead, aux_stride=2).extra
    assert strided.n_rows == N and strided.l0().tolist() == [3, 0, 3, 0, 3, 0]
    for row in range(0, N, 2):
        take = (
            lambda c: sorted(
                zip(
                    c.indices[c.offsets[row] : c.offsets[row + 1]].tolist(),  # noqa: E731
                    c.values[c.offsets[row] : c.offsets[row + 1]].tolist(),
                )
            )
        )
        assert take(strided) == take(full)
    with pytest.raises(KernelInputError, match="aux_stride must divide"):
        encode_topk(x, w_enc, b_enc, 2, aux_k=3, aux_mask=dead, aux_stride=3)


def test_approximate_top_k_keeps_rows_whose_exact_values_are_zero(monkeypatch):
    """Re-ranking counted a row's candidates by its nonzero values, so an all-zero input row
    shifted every later row's entries (found in review)."""
    monkeypatch.setenv("WORKBENCH_KERNELS", "torch")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 32, generator=g), torch.randn(64, 32, generator=g)
    x[3] = 0
    codes = encode_topk(x, w, None, 4, approximate=True)
    assert codes.n_rows == 16 and codes.nnz == 64 and codes.row_offsets().diff().tolist() == [4] * 16
    exact = (x @ w.t()).topk(4, dim=1).indices
    for row in (4, 9, 15):  # rows after the zero row keep their own latents
        assert sorted(codes.to_csr().indices[4 * row : 4 * row + 4].tolist()) == sorted(exact[row].tolist())
    strided = encode_topk(
        x, w, None, 2, approximate=True, aux_k=3, aux_mask=torch.arange(64) % 2 == 0, aux_stride=2
    ).extra
    assert strided.row_offsets().diff().tolist() == [3, 0] * 8


def test_aux_selection_trains_the_encoder(monkeypatch):
    """sparsify's fused backward dropped AuxK's encoder gradient; ours must carry it."""
    monkeypatch.setenv("WORKBENCH_KERNELS", "torch")
    x, w_enc, b_enc, w_dec, _ = encoder(N, D, M)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    codes = encode_topk(x, w_enc, b_enc, 2, aux_k=2, aux_mask=dead)
    assert set(codes.extra.flat_indices().tolist()) <= {1, 4, 7}
    decode(codes.extra, w_dec).pow(2).sum().backward()
    touched = w_enc.grad.abs().sum(1) > 0
    assert touched[[1, 4, 7]].any() and not touched[~dead].any()
    assert b_enc.grad[~dead].abs().sum() == 0 and b_enc.grad[dead].abs().sum() > 0


def test_gradcheck_preacts_and_decode():
    codes = csr_codes([2, 0, 3, 1], 5, seed=3)
    pattern = pattern_of(codes)
    x, w, b, _, _ = encoder(4, 3, 5, seed=4)
    assert torch.autograd.gradcheck(
        lambda x, w, b: PreactsAt.apply(x, w, b, None, None, pattern, torch_ops), (x, w, b)
    )
    shift = (0.1 * torch.randn(3, dtype=torch.float64)).requires_grad_()  # PreactsAt takes x already centred
    assert torch.autograd.gradcheck(
        lambda x, w, b, s: PreactsAt.apply(x - s.detach(), w, b, s, None, pattern, torch_ops),
        (x, w, b, shift),
    )
    values = codes.flat_values().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v, w: SparseDecode.apply(v, w, pattern, torch_ops), (values, w))


@pytest.mark.parametrize("fused", ["torch", "triton"])
def test_gradcheck_whole_topk_sae(fused, monkeypatch):
    """Finite differences through encode_topk -> ReLU -> decode (selection fixed by a wide gap)."""
    if fused == "triton":
        need("triton", "triton")
    monkeypatch.setenv("WORKBENCH_KERNELS", fused)
    x, w_enc, b_enc, w_dec, b_dec = encoder(3, 4, 6, seed=5)
    with torch.no_grad():
        b_enc += torch.tensor([3.0, 0, 3.0, 0, 0, 3.0])  # latents 0, 2, 5 win by a margin

    def f(w_enc, b_enc, w_dec, b_dec):
        codes = encode_topk(x.detach(), w_enc, b_enc, 3, shift=b_dec)  # an SAE: encode x - b_dec
        return decode(codes.with_values(codes.values.relu()), w_dec, b_dec)

    assert torch.autograd.gradcheck(f, (w_enc, b_enc, w_dec, b_dec))


@pytest.mark.parametrize("needs_input_grad", [False, True])
def test_shift_gets_the_gradient_of_subtracting_it_first(needs_input_grad, monkeypatch):
    """encode(x, shift=s) equals encode(x - s) in values and in every gradient, x's included."""
    results = {}
    for how in ("shift", "subtract"):
        monkeypatch.setenv("WORKBENCH_KERNELS", "torch")
        x, w_enc, b_enc, w_dec, b_dec = encoder(N, D, M, seed=7)
        x.requires_grad_(needs_input_grad)
        dead = torch.zeros(M, dtype=torch.bool)
        dead[::3] = True
        kwargs = {"aux_k": 2, "aux_mask": dead}
        codes = (
            encode_topk(x, w_enc, b_enc, 4, shift=b_dec, **kwargs)
            if how == "shift"
            else encode_topk(x - b_dec, w_enc, b_enc, 4, **kwargs)
        )
        (
            decode(codes.with_values(codes.values.relu()), w_dec, b_dec).pow(2).sum()
            + codes.extra.values.pow(2).sum()
        ).backward()
        results[how] = [codes.values, w_enc.grad, b_enc.grad, w_dec.grad, b_dec.grad] + (
            [x.grad] if needs_input_grad else []
        )
    for shifted, subtracted in zip(results["shift"], results["subtract"]):
        torch.testing.assert_close(shifted, subtracted)


@pytest.mark.parametrize("prefixes", [[12], [3, 12], [1, 4, 8, 12]])
def test_matryoshka_prefixes_equal_dense_prefix_decodes(prefixes, monkeypatch):
    results = {}
    for mode in ("torch", "eager"):
        monkeypatch.setenv("WORKBENCH_KERNELS", mode)
        codes = fixed_codes(N, M, 4).with_values(fixed_codes(N, M, 4).values.clone().requires_grad_())
        _, _, _, w_dec, b_dec = encoder(N, D, M)
        out = decode_prefixes(codes, w_dec, b_dec, prefixes)
        weights = torch.linspace(1, 2, len(prefixes), dtype=out.dtype)[:, None, None]
        (out * weights).sum().backward()
        results[mode] = (out.detach(), codes.values.grad, w_dec.grad, b_dec.grad)
    for fused, eager in zip(results["torch"], results["eager"]):
        torch.testing.assert_close(fused, eager)
    # the formula: prefix p reconstructs from latents below prefixes[p] only
    codes = fixed_codes(N, M, 4)
    _, _, _, w_dec, b_dec = encoder(N, D, M)
    dense = codes.to_dense()
    for p, end in enumerate(prefixes):
        torch.testing.assert_close(
            results["torch"][0][p], dense[:, :end] @ w_dec[:end].detach() + b_dec.detach()
        )


def test_column_top_k_keeps_each_latents_largest_rows():
    pre = torch.randn(12, 5, generator=torch.Generator().manual_seed(2))
    codes = select.column_top_k(pre, 3)
    dense = codes.to_dense()
    expected = torch.zeros_like(pre).scatter(0, pre.topk(3, dim=0).indices, pre.topk(3, dim=0).values)
    torch.testing.assert_close(dense, expected)
    assert bool((codes.row_ids().diff() >= 0).all())  # CSR rows ascend


def test_batch_topk_is_the_exact_batch_top_k():
    pre = torch.randn(8, 50, dtype=torch.float64)
    pre[3] += 10  # one row owns most of the batch's top entries: forces the widening path
    codes = select.batch_top_k(pre, 4)
    want = pre.reshape(-1).topk(32).indices
    got = codes.row_ids() * 50 + codes.flat_indices()
    assert sorted(got.tolist()) == sorted(want.tolist())
    torch.testing.assert_close(codes.flat_values(), pre.reshape(-1)[got])
    assert codes.l0()[3] > 4 * 4


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(1, 10), k=st.integers(1, 10), seed=st.integers(0, 999))
def test_batch_topk_property(n, m, k, seed):
    k = min(k, m)
    pre = torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    codes = select.batch_top_k(pre, k)
    assert codes.nnz == n * k
    threshold = pre.reshape(-1).topk(n * k).values.min()
    assert bool((codes.flat_values() >= threshold).all())
    assert bool((codes.offsets.diff() >= 0).all()) and int(codes.offsets[-1]) == n * k


def test_threshold_selection_and_window():
    pre = torch.tensor([[0.1, 0.5, -1.0], [0.35, 0.0, 2.0]], dtype=torch.float64)
    codes = select.above_threshold(pre, torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64), window=0.2)
    assert codes.to_dense().ne(0).tolist() == [[False, True, False], [True, False, True]]
    window = codes.extra.to_dense()
    assert window.ne(0).tolist() == [[False, False, False], [True, False, False]]


def test_codebook_lookup(monkeypatch):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(10, 4, generator=g, dtype=torch.float64).requires_grad_()
    acts = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_()
    out, codes = codebook_lookup(acts, codebook, 2)
    cosine = F.normalize(acts, dim=1) @ F.normalize(codebook, dim=1).T
    want = cosine.topk(2, dim=1).indices
    assert [set(r) for r in codes.indices.tolist()] == [set(r) for r in want.tolist()]
    torch.testing.assert_close(out, codebook[codes.indices].sum(1))
    upstream = torch.randn(5, 4, dtype=torch.float64)
    (out * upstream).sum().backward()
    torch.testing.assert_close(acts.grad, upstream)  # straight through
    want_grad = torch.zeros_like(codebook).index_add_(
        0, codes.flat_indices(), upstream.repeat_interleave(2, 0)
    )
    torch.testing.assert_close(codebook.grad, want_grad)
    dot_out, dot_codes = codebook_lookup(acts, codebook, 1, metric="dot", straight_through=False)
    assert dot_codes.indices[:, 0].tolist() == (acts @ codebook.T).argmax(1).tolist()


def test_sparse_training_step_equals_dense_step(monkeypatch):
    """One Adam step of a TopK SAE with AuxK, fused vs eager: same parameters afterwards."""
    after = {}
    for mode in ("torch", "eager"):
        monkeypatch.setenv("WORKBENCH_KERNELS", mode)
        x, *params = encoder(32, 8, 24, seed=9)
        opt = torch.optim.Adam(params, lr=1e-2)
        encode = lambda x, w, b: encode_topk(x, w, b, 4, aux_k=3, aux_mask=torch.arange(24) >= 16)
        for _ in range(3):
            opt.zero_grad()
            sae_loss(encode, x.detach(), *params).backward()
            opt.step()
        after[mode] = [p.detach().clone() for p in params]
    for fused, eager in zip(after["torch"], after["eager"]):
        torch.testing.assert_close(fused, eager)


def test_bad_inputs_get_one_line_errors(monkeypatch):
    x, w_enc, b_enc, w_dec, b_dec = encoder(N, D, M)
    with pytest.raises(KernelInputError, match="x must be"):
        encode_topk(x[:, :3], w_enc, b_enc, 2)
    for approximate in (False, True):
        with pytest.raises(KernelInputError, match="k must be in"):
            encode_topk(x, w_enc, b_enc, M + 1, approximate=approximate)
    with pytest.raises(KernelInputError, match="shift must be"):
        encode_topk(x, w_enc, b_enc, 2, shift=b_dec[:3])
    with pytest.raises(KernelInputError, match="bias must be"):
        decode(fixed_codes(N, M, 2), w_dec, b_enc)
    with pytest.raises(KernelInputError, match="need weight"):
        decode(fixed_codes(N, M, 2), w_dec[:5])
    bad = fixed_codes(N, M, 2)
    with pytest.raises(KernelInputError, match="latent indices outside"):
        decode(type(bad)(bad.indices + M, bad.values, M), w_dec)
    with pytest.raises(KernelInputError, match="prefix_ends"):
        decode_prefixes(fixed_codes(N, M, 2), w_dec, b_dec, [6, 3, M])
    with pytest.raises(KernelInputError, match="offsets"):
        decode(
            csr_codes([1, 2], M).__class__(torch.tensor([1, 2]), torch.ones(2), M, torch.tensor([0, 1, 3])),
            w_dec,
        )
    monkeypatch.setenv("WORKBENCH_KERNELS", "fast")
    with pytest.raises(ConfigError, match="WORKBENCH_KERNELS"):
        encode_topk(x, w_enc, b_enc, 2)


def test_codes_conversions():
    codes = fixed_codes(4, 7, 3)
    csr = codes.to_csr()
    torch.testing.assert_close(csr.to_dense(), codes.to_dense())
    back = type(codes).from_dense(codes.to_dense())
    torch.testing.assert_close(back.to_dense(), codes.to_dense())
    assert codes.l0().tolist() == [3, 3, 3, 3]


def _stable_top(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest, ties to the earliest index (a stable descending sort)."""
    return values.sort(descending=True, stable=True).indices[:count]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 8), per=st.integers(1, 12), seed=st.integers(0, 999))
def test_column_top_k_gives_tied_entries_to_the_earliest_rows(n, m, per, seed):
    per = min(per, n)
    pre = torch.randint(-2, 3, (n, m), generator=torch.Generator().manual_seed(seed)).float()  # many ties
    got = select.column_top_k(pre, per).to_dense() != 0
    want = torch.zeros(n, m, dtype=torch.bool)
    for col in range(m):
        want[_stable_top(pre[:, col], per), col] = True
    # entries equal to 0 are "kept" with value 0 and vanish from to_dense: compare where pre != 0
    assert torch.equal(got, want & (pre != 0))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 10), k=st.integers(1, 6), seed=st.integers(0, 999))
def test_batch_top_k_gives_tied_entries_to_the_earliest_rows(n, k, seed):
    m = 8
    distinct = torch.randperm(m, generator=torch.Generator().manual_seed(seed)).float()[None] * torch.tensor(
        [[1.0], [0.5], [2.0]]
    )
    pre = (
        distinct[torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed + 1))] + 1
    )  # rows repeat
    k = min(k, m)
    codes = select.batch_top_k(pre, k)
    got = sorted((codes.row_ids() * m + codes.flat_indices()).tolist())
    assert got == sorted(_stable_top(pre.reshape(-1), n * k).tolist())  # values within a row are distinct


@pytest.mark.slow
def test_two_ranks_select_what_one_process_selects_on_tied_rows(tmp_path):
    """batch_top_k and column_top_k over two ranks' shares (gloo) keep exactly the one-process
    entries on a batch full of identical rows, where 'keep everything >= the cut' would keep more."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.distributed_selection import selections, tie_heavy_batch

    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tests.distributed_selection",
            str(tmp_path),
        ],
        check=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
    )
    one = selections(tie_heavy_batch(), 0)
    parts = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for name in ("batch", "column"):
        keys = lambda d: sorted(zip(d[f"{name}.rows"].tolist(), d[f"{name}.latents"].tolist()))  # noqa: E731
        assert keys({k: torch.cat([p[k] for p in parts]) for k in parts[0]}) == keys(one), name


def _random_encoder(n=64, d=48, m=512, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return (
        x,
        (torch.randn(m, d, generator=g, dtype=dtype) / d**0.5).requires_grad_(),
        (0.1 * torch.randn(m, generator=g, dtype=dtype)).requires_grad_(),
    )


def test_int8_scores_approximate_the_preactivations():
    from workbench.kernels.approx import Int8Encoder

    x, w, b = _random_encoder()
    exact = (x @ w.t() + b).detach()
    approx = Int8Encoder.of(w.detach()).scores(x, b.detach(), torch.empty_like(exact))
    assert float((approx - exact).abs().max()) < 0.03 * float(
        exact.abs().max()
    )  # int8 rounding of both sides
    assert float((approx - exact).abs().max()) > 0  # and it is an approximation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows_per_pass", [None, 16])
def test_approximate_top_k_keeps_exact_values_and_recalls_the_top_k(dtype, rows_per_pass, monkeypatch):
    if rows_per_pass:
        monkeypatch.setattr(encode_module, "ROWS_PER_PASS", rows_per_pass)
    x, w, b = _random_encoder(dtype=dtype)
    codes = encode_topk(x, w, b, 8, approximate=True)
    exact_pre = (x @ w.t() + b).detach()
    torch.testing.assert_close(codes.values.detach(), exact_pre.gather(1, codes.indices))  # exact fp values
    want = exact_pre.topk(8, dim=1).indices
    recall = (codes.indices[:, :, None] == want[:, None, :]).any(-1).float().mean()
    assert recall >= 0.99


def test_approximate_top_k_trains_like_the_exact_one_when_it_selects_the_same(monkeypatch):
    """Same selection -> same values and the same sparse gradients; the eager twin (dense
    pre-activations, the same int8 candidates) agrees too."""
    results = {}
    for name, mode, approximate in (
        ("exact", "torch", False),
        ("approx", "torch", True),
        ("approx eager", "eager", True),
    ):
        monkeypatch.setenv("WORKBENCH_KERNELS", mode)
        x, w, b = _random_encoder(dtype=torch.float64)
        codes = encode_topk(x, w, b, 8, approximate=approximate, aux_k=4, aux_mask=torch.arange(512) % 5 == 0)
        (codes.values.relu().pow(2).sum() + codes.extra.values.pow(2).sum()).backward()
        order = codes.indices.sort(dim=1)
        results[name] = [order.values, codes.values.gather(1, order.indices), w.grad, b.grad]
    for name in ("approx", "approx eager"):
        for got, want in zip(results[name], results["exact"]):
            torch.testing.assert_close(got, want)
