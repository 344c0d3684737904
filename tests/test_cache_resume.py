"""A `workbench cache` killed with SIGKILL and rerun gives the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_and_kill


def cache_command(model_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app.cli",
        "cache",
        "--model",
        str(model_dir),
        "--corpus",
        "tiny-shakespeare",
        "--tokens",
        "24000",
        "--context-length",
        "32",
        "--batch-size",
        "8",
        "--shard-tokens",
        "1024",
        "--hook",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_mlp_out",
        "--out",
        str(out),
        "--quiet",
    ]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def shards_done(out: Path) -> int:
    try:
        return len(json.loads((out / "progress.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1 if not (out / "tokens.safetensors").exists() else 0


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "cache"
    subprocess.run(cache_command(tiny_model_dir, out), check=True, timeout=300)
    return files_of(out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_cache_resumes_to_identical_bytes(tiny_model_dir, tmp_path, reference, seed):
    out = tmp_path / "cache"
    n_shards = len(json.loads(reference["manifest.json"])["hooks"]["blocks.0.hook_resid_post"]["shards"])
    target = random.Random(seed).randrange(0, n_shards - 1)  # kill once this many shards are recorded
    run_and_kill(cache_command(tiny_model_dir, out), lambda: shards_done(out) >= target)
    assert not (out / "manifest.json").exists(), "killed too late: the run had already finished"
    subprocess.run(cache_command(tiny_model_dir, out), check=True, timeout=300)
    assert files_of(out) == reference


def torchrun(args: list[str], nproc: int = 2) -> list[str]:
    """`args` (python -m app.cli ...) under torchrun with a local rendezvous on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        *args[2:],
    ]


def ranks_done(out: Path) -> int:
    total = 0
    for path in out.glob("progress*.json"):
        try:
            total += len(json.loads(path.read_text())["shards"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
    return total


@pytest.mark.slow
def test_torchrun_cache_is_the_single_process_cache_byte_for_byte(tiny_model_dir, tmp_path, reference):
    out = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        torchrun(cache_command(tiny_model_dir, out)), timeout=300, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert files_of(out) == reference
    assert not list(out.glob("progress*.json"))


@pytest.mark.slow
def test_a_killed_torchrun_cache_resumes_in_one_process(tiny_model_dir, tmp_path, reference):
    """Kill every rank mid-run; the same command without torchrun finishes the same cache."""
    out = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_and_kill(torchrun(cache_command(tiny_model_dir, out)), lambda: ranks_done(out) >= 4, env)
    assert not (out / "manifest.json").exists(), "killed too late: the run had already finished"
    assert len(list(out.glob("progress-rank*.json"))) == 2  # both ranks had recorded shards
    subprocess.run(cache_command(tiny_model_dir, out), check=True, timeout=300)
    assert files_of(out) == reference
