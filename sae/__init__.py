"""Sparse dictionaries learned on cached activations (SAEs, codebooks, probes). Imports `workbench` only.

import sae
d = sae.load("runs/sae-blocks.1.hook_resid_post/topk-k32-x8")   # ours, SAELens or sparsify
sae.architectures()                                             # registered names
"""

from typing import TYPE_CHECKING

# What `__getattr__` returns, for type checkers and editors; tests/test_static.py keeps these
# imports, _EXPORTS and __all__ equal.
if TYPE_CHECKING:
    from sae.base import architectures, create
    from sae.config import DictionaryConfig
    from sae.dose_response import sweep
    from sae.evals import evaluate
    from sae.io import load, save
    from sae.splicing import splice
    from sae.steering import ablate, add, add_direction, clamp, code_off, code_on, steer
    from sae.train_config import TrainConfig
    from sae.training import train

_EXPORTS = {
    "load": "sae.io",
    "save": "sae.io",
    "architectures": "sae.base",
    "create": "sae.base",
    "DictionaryConfig": "sae.config",
    "TrainConfig": "sae.train_config",
    "train": "sae.training",
    "evaluate": "sae.evals",
    "splice": "sae.splicing",
    "steer": "sae.steering",
    "add": "sae.steering",
    "clamp": "sae.steering",
    "ablate": "sae.steering",
    "add_direction": "sae.steering",
    "code_on": "sae.steering",
    "code_off": "sae.steering",
    "sweep": "sae.dose_response",
}
__all__ = [
    "DictionaryConfig",
    "TrainConfig",
    "ablate",
    "add",
    "add_direction",
    "architectures",
    "clamp",
    "code_off",
    "code_on",
    "create",
    "evaluate",
    "load",
    "save",
    "splice",
    "steer",
    "sweep",
    "train",
]


def __getattr__(name: str):
    """Lazy exports: `import sae` stays cheap, and nothing runs at import time."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sae' has no attribute {name!r}")
