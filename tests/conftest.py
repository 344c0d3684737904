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
        corpus="tiny-shakespeare",
        vocab_size=512,
        context_length=64,
        d_model=64,
        n_layers=2,
        n_heads=4,
        batch_size=16,
        steps=60,
        warmup_steps=10,
        eval_every=60,
        seed=1,
        out=str(folder),
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


STORE_HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="session")
def tiny_cache(tiny_model, tmp_path_factory):
    """A 6,144-token cache (windows of 32) of the tiny model at STORE_HOOK."""
    from workbench.activations import CacheConfig, build_cache

    config = CacheConfig(
        model="tiny",
        hooks=(STORE_HOOK,),
        corpus="tiny-shakespeare",
        tokens=6144,
        context_length=32,
        batch_size=8,
        shard_tokens=1024,
        out=str(tmp_path_factory.mktemp("store-cache") / "cache"),
    )
    return build_cache(config, model=tiny_model, progress=False)


def tiny_dictionary(arch: str, cache_folder, seed: int = 0):
    """A small dictionary (48 latents, k 4) for analysis tests whose latents point at centred
    activation rows of the cache, so that most of them fire on something."""
    import torch

    from tests.sae_cases import small
    from workbench.cache_reader import ActivationCache

    sample = ActivationCache(cache_folder).shard(STORE_HOOK, 0).float()[1::7]
    dictionary = small(
        arch, seed=seed, d_in=sample.shape[1], n_latents=48, k=4, aux_k=0, target_l0=4, bandwidth=0.3
    )
    picks = sample[
        torch.randperm(len(sample), generator=torch.Generator().manual_seed(seed))[:48]
    ] - sample.mean(0)
    with torch.no_grad():
        dictionary.W_enc.copy_(picks / picks.norm(dim=1, keepdim=True))
        dictionary.W_dec.copy_(dictionary.W_enc)
        dictionary.b_dec.copy_(sample.mean(0))
    dictionary.meta = {"hook": STORE_HOOK}
    return dictionary


@pytest.fixture(scope="session")
def tiny_run(tiny_model, tiny_model_dir, tiny_cache, tmp_path_factory):
    """A saved TopK dictionary folder with its feature store (features.duckdb) built."""
    from sae.analyze import AnalyzeConfig, analyze
    from sae.io import save

    folder = tmp_path_factory.mktemp("store-run") / "topk"
    dictionary = tiny_dictionary("topk", tiny_cache)
    save(
        dictionary,
        folder,
        hook=STORE_HOOK,
        model=str(tiny_model_dir),
        cache=str(tiny_cache),
        metrics={"fvu": 0.5, "l0": 4.0},
    )
    from sae.io import load

    analyze(
        load(folder),
        AnalyzeConfig(top=5, quantile_bins=4, per_bin=2, context_before=3, context_after=2),
        folder=folder,
        model=tiny_model,
        progress=False,
    )
    return folder


def run_and_kill(command: list[str], ready, env: dict | None = None, seconds: float = 240) -> None:
    """Start `command` in its own process group, wait until `ready()` (or the process ends, or
    `seconds` pass), then SIGKILL the whole group (torchrun's ranks included) and reap it."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + seconds
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _cuda_param():
    from workbench.devices import cuda_count

    reason = "no usable CUDA device on this machine (the GPU check, scripts/gpu-check.sh, runs these)"
    return pytest.param("cuda", marks=pytest.mark.skipif(cuda_count() == 0, reason=reason))


@pytest.fixture(params=["cpu", _cuda_param()])
def device(request) -> str:
    """Each device a test should pass on: the CPU always, CUDA where present (skipped, with the
    reason, elsewhere)."""
    return request.param
