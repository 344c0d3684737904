"""Importing this module registers the built-in architectures (one file each)."""

from sae import batchtopk, choice, gated, jumprelu, matryoshka, relu, topk  # noqa: F401
