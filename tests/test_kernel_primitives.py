"""The sparse primitives (torch and Triton backends) against dense formulas, over edge cases
and hypothesis-drawn shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import need
from tests.kernel_cases import csr_codes, fixed_codes
from workbench.kernels import SparseCodes, torch_ops
from workbench.kernels.pattern import pattern_of


def backends():
    yield torch_ops
    need("triton", "triton")
    from workbench.kernels import triton_ops

    yield triton_ops


def reference(codes: SparseCodes, table: torch.Tensor, dense: torch.Tensor):
    sparse = codes.to_dense()
    rows, cols = codes.row_ids(), codes.flat_indices()
    return sparse @ table, (dense @ table.T)[rows, cols], sparse.T @ dense


CASES = {
    "fixed": lambda: fixed_codes(6, 9, 3),
    "k=1": lambda: fixed_codes(5, 7, 1),
    "k=m": lambda: fixed_codes(4, 6, 6),
    "batch 1": lambda: fixed_codes(1, 8, 2),
    "csr with empty rows and repeats": lambda: csr_codes([0, 3, 0, 5, 1, 0], 4),
    "all rows empty": lambda: csr_codes([0, 0, 0], 5),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_primitives_match_dense_formulas(case, backend):
    ops = torch_ops if backend == "torch" else list(backends())[-1]
    codes = CASES[case]()
    pattern = pattern_of(codes)
    g = torch.Generator().manual_seed(1)
    table = torch.randn(codes.n_latents, 5, generator=g, dtype=torch.float64)
    dense = torch.randn(codes.n_rows, 5, generator=g, dtype=torch.float64)
    want_decode, want_dot, want_scatter = reference(codes, table, dense)
    torch.testing.assert_close(ops.decode(pattern, codes.flat_values(), table), want_decode)
    torch.testing.assert_close(ops.gather_dot(pattern, dense, table), want_dot)
    torch.testing.assert_close(ops.scatter_rows(pattern, codes.flat_values(), dense), want_scatter)


def test_primitives_accept_non_contiguous_tables():
    codes = fixed_codes(5, 8, 3)
    pattern = pattern_of(codes)
    table = torch.randn(5, 8, dtype=torch.float64).T  # [8, 5], transposed view
    dense = torch.randn(10, 5, dtype=torch.float64)[::2]
    for ops in backends():
        want_decode, want_dot, want_scatter = reference(codes, table, dense)
        torch.testing.assert_close(ops.decode(pattern, codes.flat_values(), table), want_decode)
        torch.testing.assert_close(ops.gather_dot(pattern, dense, table), want_dot)
        torch.testing.assert_close(ops.scatter_rows(pattern, codes.flat_values(), dense), want_scatter)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=7),
    m=st.integers(1, 9),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_torch_primitives_property(counts, m, d, seed):
    codes = csr_codes(counts, m, seed=seed)
    pattern = pattern_of(codes)
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(m, d, generator=g, dtype=torch.float64)
    dense = torch.randn(len(counts), d, generator=g, dtype=torch.float64)
    want_decode, want_dot, want_scatter = reference(codes, table, dense)
    torch.testing.assert_close(torch_ops.decode(pattern, codes.flat_values(), table), want_decode)
    torch.testing.assert_close(torch_ops.gather_dot(pattern, dense, table), want_dot)
    torch.testing.assert_close(torch_ops.scatter_rows(pattern, codes.flat_values(), dense), want_scatter)


@settings(max_examples=8, deadline=None)
@given(
    counts=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    m=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_triton_primitives_property(counts, m, seed):
    ops = list(backends())[-1]
    codes = csr_codes(counts, m, dtype=torch.float32, seed=seed)
    pattern = pattern_of(codes)
    g = torch.Generator().manual_seed(seed)
    table, dense = torch.randn(m, 3, generator=g), torch.randn(len(counts), 3, generator=g)
    for got, want in zip(
        (
            ops.decode(pattern, codes.flat_values(), table),
            ops.gather_dot(pattern, dense, table),
            ops.scatter_rows(pattern, codes.flat_values(), dense),
        ),
        reference(codes, table, dense),
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
