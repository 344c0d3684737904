"""A `workbench cache` killed with SIGKILL and rerun gives the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def cache_command(model_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "app.cli", "cache", "--model", str(model_dir), "--corpus", "tiny-shakespeare",
            "--tokens", "24000", "--context-length", "32", "--batch-size", "8", "--shard-tokens", "1024",
            "--hook", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "--out", str(out), "--quiet"]


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
    process = subprocess.Popen(cache_command(tiny_model_dir, out))
    deadline = time.time() + 240
    while shards_done(out) < target and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "killed too late: the run had already finished"
    subprocess.run(cache_command(tiny_model_dir, out), check=True, timeout=300)
    assert files_of(out) == reference
