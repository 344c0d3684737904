"""Importing this module registers the built-in architectures (one file each)."""

from sae import batchtopk, choice, codebook, gated, jumprelu, matryoshka, relu, topk  # noqa: F401
