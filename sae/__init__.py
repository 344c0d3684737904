"""Sparse dictionaries learned on cached activations (SAEs, codebooks, probes). Imports `workbench` only.

    import sae
    d = sae.load("runs/sae-blocks.1.hook_resid_post/topk-k32-x8")   # ours, SAELens or sparsify
    sae.architectures()                                             # registered names
"""

_EXPORTS = {"load": "sae.io", "save": "sae.io", "architectures": "sae.base", "create": "sae.base",
            "DictionaryConfig": "sae.config", "TrainConfig": "sae.train_config", "train": "sae.train",
            "evaluate": "sae.evals", "splice": "sae.splicing", "steer": "sae.steering", "add": "sae.steering",
            "clamp": "sae.steering", "ablate": "sae.steering", "add_direction": "sae.steering",
            "code_on": "sae.steering", "code_off": "sae.steering", "sweep": "sae.dose_response"}


def __getattr__(name: str):
    """Lazy exports: `import sae` stays cheap, and nothing runs at import time."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sae' has no attribute {name!r}")
