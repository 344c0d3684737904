"""Shared fixtures: offline settings, and a tiny GPT-2 HuggingFace folder built from scratch."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub miss would otherwise cost ~27 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    # Triton kernels run on CPU tensors only in its interpreter, chosen when they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _user_cache_dir(tmp_path_factory):
    """Keep derived files (dequantized models) out of the developer's home, unless asked."""
    if "WORKBENCH_HOME" not in os.environ:
        os.environ["WORKBENCH_HOME"] = str(tmp_path_factory.mktemp("workbench-home"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer GPT-2 (d_model 64, vocab 512, n_ctx 64) briefly trained on tiny-shakespeare
    by the demo-model recipe (so its logits have clear winners), as a plain HF folder."""
    from workbench.demo_model import DemoModelConfig, train_demo_model

    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    config = DemoModelConfig(
        corpus="tiny-shakespeare", vocab_size=512, context_length=64, d_model=64, n_layers=2, n_heads=4,
        batch_size=16, steps=60, warmup_steps=10, eval_every=60, seed=1, out=str(folder),
    )
    train_demo_model(config, progress=False)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from workbench.models import load_model

    return load_model(str(tiny_model_dir))


def need(module: str, extra: str):
    """Import an optional dependency; skip without it, except in CI (CI installs every extra)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        message = f"needs {module} (pip install -e '.[{extra}]')"
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the '{extra}' extra: {message}")
        pytest.skip(message)
    return __import__(module)
