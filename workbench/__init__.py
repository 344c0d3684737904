"""The foundation: models and hook names, corpora, the activation cache, kernels, stores, logging.

Importing this package is cheap: `load_model` pulls in transformer_lens only when called.
"""

from __future__ import annotations

__all__ = ["load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from workbench.models import load_model

        return load_model
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
