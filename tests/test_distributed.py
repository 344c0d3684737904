"""`workbench train --nproc 2` (torchrun, gloo): the same dictionaries as one process, no hang,
resumable with another number of ranks; unsupported architectures refused before launching."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_and_kill
from tests.test_cli import run_cli
from tests.test_cli_sae import cache, checkpoint_step  # noqa: F401 - the module's cache fixture

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_command(
    cache_dir,
    out,
    nproc: int,
    arch: str = "topk,relu,gated,jumprelu",
    tokens: int = 16384,  # noqa: F811
    *extra: str,
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app.cli",
        "train",
        "--cache",
        str(cache_dir),
        "--arch",
        arch,
        "--k",
        "8",
        "--expansion",
        "4",
        "--batch-size",
        "256",
        "--tokens",
        str(tokens),
        "--checkpoint-every",
        "8",
        "--out",
        str(out),
        "--quiet",
        "--nproc",
        str(nproc),
        *extra,
    ]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "weights.safetensors")


def max_relative_difference(a: dict, b: dict) -> float:
    assert all(
        torch.equal(a[k], b[k]) for k in a if a[k].dtype == torch.bool
    )  # e.g. which thresholds were seen
    return max(
        float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12))
        for k in a
        if a[k].dtype != torch.bool
    )


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains(cache, tmp_path):  # noqa: F811
    for nproc in (1, 2):
        subprocess.run(
            train_command(cache, tmp_path / f"ranks{nproc}", nproc), check=True, timeout=300, env=ENV
        )
    one, two = tmp_path / "ranks1", tmp_path / "ranks2"
    # TopK: the same selections, so the only difference is the order of float additions
    assert max_relative_difference(weights(one / "topk-k8-x4"), weights(two / "topk-k8-x4")) < 1e-5
    # ReLU / Gated / JumpReLU: activations near their threshold can flip with rounding; equal to 0.5%
    for name in ("relu-k8-x4", "gated-k8-x4", "jumprelu-k8-x4"):
        assert max_relative_difference(weights(one / name), weights(two / name)) < 5e-3, name
    assert not list(two.rglob("*.tmp")) and not list(two.glob("progress*"))
    logs = {
        n: [json.loads(line) for line in (run / "topk-k8-x4" / "log.jsonl").read_text().splitlines() if line]
        for n, run in ((1, one), (2, two))
    }
    assert len(logs[2]) == len(logs[1]) and logs[2][-1]["tokens"] == 16384  # rank 0 logs once, global tokens
    for key in ("loss", "fvu", "l0", "mse", "dead_fraction"):  # over the whole batch, not rank 0's half
        assert logs[2][-1][key] == pytest.approx(logs[1][-1][key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_batch_and_feature_choice_across_ranks_select_what_one_process_selects(cache, tmp_path):  # noqa: F811
    """BatchTopK, Matryoshka and Mutual Choice cut their candidates at the global (all ranks')
    N*k-th value, Feature Choice each latent at its global m-th; entries tied at a cut (the cache's
    identical BOS rows) go to lower ranks first. 64 steps agree to float rounding (keeping every
    tie instead made two ranks drift 2% from one process within 4 steps). Rounding can still flip
    a near-tie at the cut: at step 55 of Matryoshka two candidates 6e-8 apart swapped places and
    moved the weights 4e-4, so the bound is 2e-3, 10x below the drift of a wrong tie rule."""
    arch = "batchtopk,matryoshka,feature_choice,mutual_choice"
    for nproc in (1, 2):
        subprocess.run(
            train_command(cache, tmp_path / f"ranks{nproc}", nproc, arch), check=True, timeout=300, env=ENV
        )
    for name in arch.split(","):
        folder = f"{name}-k8-x4"
        assert (
            max_relative_difference(
                weights(tmp_path / "ranks1" / folder), weights(tmp_path / "ranks2" / folder)
            )
            < 2e-3
        ), name


def resampled(log_path) -> float:
    return sum(
        json.loads(line).get("latents", 0)
        for line in log_path.read_text().splitlines()
        if line and '"resample"' in line
    )


@pytest.mark.slow
def test_codebooks_and_resampling_across_ranks_draw_what_one_process_draws(cache, tmp_path):  # noqa: F811
    """Dead-code replacement and resampling count firings over every rank and draw their new rows
    from the whole batch (gathered), so two ranks replace the same codes with the same inputs."""
    for nproc in (1, 2):
        subprocess.run(
            train_command(
                cache,
                tmp_path / f"ranks{nproc}",
                nproc,
                "codebook,topk",
                12288,
                "--resample-every",
                "8",
                "--resample-until",
                "1",
            ),
            check=True,
            timeout=300,
            env=ENV,
        )
    one, two = tmp_path / "ranks1", tmp_path / "ranks2"
    for name in ("codebook-k8-x4", "topk-k8-x4"):
        assert max_relative_difference(weights(one / name), weights(two / name)) < 1e-5, name
    replaced = [
        json.loads(line)["replaced_codes"]
        for line in (two / "codebook-k8-x4" / "log.jsonl").read_text().splitlines()
        if line
    ]
    assert replaced[-1] > 0, "no code was replaced: the test would not see a wrong draw"
    assert resampled(two / "topk-k8-x4" / "log.jsonl") > 0, "nothing was resampled"


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_in_one_process(cache, tmp_path):  # noqa: F811
    subprocess.run(train_command(cache, tmp_path / "whole", 1, "topk"), check=True, timeout=300, env=ENV)
    out = tmp_path / "killed"
    run_and_kill(train_command(cache, out, 2, "topk"), lambda: checkpoint_step(out) >= 16, ENV)
    assert not (out / "topk-k8-x4" / "weights.safetensors").exists(), "killed too late: the run had finished"
    subprocess.run(train_command(cache, out, 1, "topk"), check=True, timeout=300, env=ENV)
    assert (
        max_relative_difference(weights(tmp_path / "whole" / "topk-k8-x4"), weights(out / "topk-k8-x4"))
        < 1e-5
    )


def test_bad_rank_counts_are_refused_before_launching(capsys, cache, tmp_path):  # noqa: F811
    code, _, err = run_cli(capsys, *train_command(cache, tmp_path / "o", 3, "topk")[3:])
    assert code == 2 and err.count("\n") == 1 and "must split evenly over 3 ranks" in err
    code, _, err = run_cli(capsys, *train_command(cache, tmp_path / "o", 0, "topk")[3:])
    assert code == 2 and err.count("\n") == 1 and "--nproc must be at least 1" in err
    assert not (tmp_path / "o").exists()
