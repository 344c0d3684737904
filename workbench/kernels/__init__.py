"""Fused sparse kernels: every dictionary's encode and decode, at O(N * k * d) after the encoder.

    codes = encode_topk(x, W_enc, b_enc, k)          # SparseCodes of pre-activations
    codes = codes.with_values(codes.values.relu())
    x_hat = decode(codes, W_dec, b_dec)              # sparse forward and backward

Weights are stored one row per latent: W_enc [m, d_in], W_dec [m, d_out]. Backends: stock torch
sparse ops (CPU, and any device), Triton (CUDA), and the dense eager twin; see `backend`.
"""

from workbench.kernels.backend import is_eager, kernel_mode, sparse_ops, use_kernels
from workbench.kernels.codebook import codebook_lookup
from workbench.kernels.codes import KernelInputError, SparseCodes
from workbench.kernels.decode import decode, decode_prefixes
from workbench.kernels.encode import (
    encode_at,
    encode_batch_topk,
    encode_feature_choice,
    encode_threshold,
    encode_topk,
    release_workspace,
)

__all__ = [
    "KernelInputError",
    "SparseCodes",
    "codebook_lookup",
    "decode",
    "decode_prefixes",
    "encode_at",
    "encode_batch_topk",
    "encode_feature_choice",
    "encode_threshold",
    "encode_topk",
    "is_eager",
    "kernel_mode",
    "release_workspace",
    "sparse_ops",
    "use_kernels",
]
