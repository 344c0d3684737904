"""The benchmarks on a device (issue 19): `--device` on `bench kernels|cache|sae`, a header naming
the device and the kernel backend, timings that wait for the device, and `--device cuda` without
one as a one-line error."""

from __future__ import annotations

import json

import pytest
import torch

from app.cli import main
from workbench import bench

KERNELS_TINY = ["--batch-size", "64", "--d-in", "16", "--n-latents", "256", "--k", "4", "--reps", "1"]


@pytest.mark.parametrize(
    "argv",
    [
        ["cache", "--tokens", "64"],
        ["bench", "kernels", *KERNELS_TINY],
        ["bench", "cache", "--tokens", "64", "--reps", "1"],
        ["bench", "sae", "--samples", "1000", "--n-planted", "32", "--d-in", "16", "--seeds", "0"],
    ],
)
def test_device_cuda_without_one_is_a_one_line_error(argv, capsys, tmp_path):
    if torch.version.cuda is not None:
        pytest.skip("this torch build has CUDA")
    out = ["--out", str(tmp_path / "c")] if argv[0] == "cache" else []
    assert main([*argv, *out, "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --device cuda: no usable CUDA device here"), captured.err
    assert captured.err.count("\n") == 1 and "{" not in captured.out  # refused before any work


def test_bench_kernels_on_the_cpu_names_its_device_and_memory_column(capsys):
    assert main(["bench", "kernels", "--arch", "topk", *KERNELS_TINY, "--device", "cpu"]) == 0
    header, columns, *table = capsys.readouterr().out.splitlines()
    assert header == "device cpu, kernels torch (auto), matmul float32, peak_mb from the process RSS"
    assert columns.split()[:7] == [
        "name",
        "ms",
        "tokens_per_s",
        "x_limit",
        "x_dense",
        "peak_mb",
        "mem_budget_mb",
    ]
    trainer = next(line for line in table if line.lstrip().startswith("topk-256/trainer "))
    assert len(trainer.split()) == 6  # the trainer's peak is not measured on the CPU: a blank cell


def test_kernel_rows_on_the_device(device):
    from sae.bench_step import trainer_paths
    from workbench.bench_kernels import KernelBenchCase, run_kernel_benchmark

    rows = run_kernel_benchmark(
        [KernelBenchCase("topk", 256)],
        batch_size=64,
        d_in=16,
        k=4,
        reps=1,
        extra_paths=trainer_paths,
        device=torch.device(device),
    )
    rows = {row["name"].split("/")[1]: row for row in rows}
    assert list(rows) == ["limit", "dense", "fused", "trainer", "trainer+auxk"]
    assert rows["limit"]["x_limit"] == 1.0 and rows["dense"]["x_dense"] == 1.0
    for path in ("limit", "dense", "fused"):
        assert rows[path]["peak_mb"] >= 0
    for path in ("trainer", "trainer+auxk"):  # measured by the CUDA allocator, not from the RSS
        assert (rows[path]["peak_mb"] is None) == (device == "cpu")


def test_bench_kernels_with_a_bfloat16_selection_matmul(capsys):
    argv = ["bench", "kernels", "--arch", "topk", "jumprelu", *KERNELS_TINY, "--matmul-dtype", "bfloat16"]
    assert main([*argv, "--device", "cpu", "--json"]) == 0
    rows = {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert {"topk-256/fused", "topk-256/trainer", "jumprelu-256/fused"} <= set(rows)
    assert all(row["ms"] > 0 for row in rows.values())
    assert main(["bench", "kernels", "--matmul-dtype", "float16"]) == 2
    assert "matmul_dtype 'float16' is not one of float32, bfloat16" in capsys.readouterr().err


def test_timings_wait_for_the_device(monkeypatch):
    """The clock starts and stops after the device's queued work: synchronize around each call."""
    calls = []
    monkeypatch.setattr(bench, "synchronize", lambda device: calls.append(str(device)))
    times = bench.interleaved({"a": lambda: calls.append("a")}, reps=2, warmup=1, device="cuda:0")
    assert len(times["a"]) == 2
    assert calls == ["cuda:0", "a", "cuda:0"] * 3


def test_bench_cache_on_the_device(tiny_model_dir, device, capsys):
    argv = ["bench", "cache", "--model", str(tiny_model_dir), "--tokens", "512", "--reps", "1"]
    assert main([*argv, "--device", device, "--model-dtype", "float32"]) == 0
    header, *table = capsys.readouterr().out.splitlines()
    assert header.startswith(f"device {device}") and header.endswith(f"model {tiny_model_dir} in float32")
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == {"forward_only", "forward_to_hook", "cache_write", "read_sequential", "read_shuffled"}
    assert rows["forward_only"][3] == "1"  # vs_forward


def test_bench_sae_trains_on_the_device(device, capsys):
    argv = ["bench", "sae", "--arch", "topk", "--scenario", "zipf", "--seeds", "0", "--samples", "4096"]
    assert main([*argv, "--n-planted", "32", "--d-in", "16", "--device", device, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["arch"] == "topk" and rows[0]["latents"] == 32 and 0 <= rows[0]["mcc"] <= 1
