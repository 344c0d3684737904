"""`workbench bench cache` runs end to end and reports what it promises (speed is not asserted)."""

from __future__ import annotations

import json

from app.cli import main


def test_bench_cache_reports_ratios_and_reader_throughput(capsys, tiny_model_dir):
    code = main(
        ["bench", "cache", "--model", str(tiny_model_dir), "--tokens", "4096", "--reps", "2", "--json"]
    )
    assert code == 0
    rows = {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"forward_only", "forward_to_hook", "cache_write", "read_sequential", "read_shuffled"}
    assert rows["forward_only"]["vs_forward"] == 1.0
    for name in ("forward_to_hook", "cache_write"):
        assert rows[name]["vs_forward"] > 0 and rows[name]["tokens_per_s"] > 0
    for name in ("read_sequential", "read_shuffled"):
        assert rows[name]["gb_per_s"] > 0 and rows[name]["vs_forward"] is None


def test_bench_kernels_reports_every_architecture(capsys):
    args = [
        "bench",
        "kernels",
        "--batch-size",
        "64",
        "--d-in",
        "16",
        "--n-latents",
        "256",
        "--k",
        "4",
        "--reps",
        "1",
        "--json",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [row["name"] for row in rows]
    for architecture in ("topk", "batchtopk", "jumprelu", "matryoshka", "codebook"):
        assert [f"{architecture}-256/{path}" in names for path in ("limit", "dense", "fused")] == [True] * 3
    # the trainer's real TopK step (issue 16), interleaved with TopK's limit, with and without AuxK
    assert {"topk-256/trainer", "topk-256/trainer+auxk"} <= set(names) and not any(
        "jumprelu-256/trainer" in n for n in names
    )
    for row in rows:
        assert set(row) == {"name", "ms", "tokens_per_s", "x_limit", "x_dense", "peak_mb", "mem_budget_mb"}
        assert row["ms"] > 0 and row["tokens_per_s"] > 0
        assert row["peak_mb"] >= 0 if "trainer" not in row["name"] else row["peak_mb"] is None
        if row["name"].endswith("/limit"):
            assert row["x_limit"] == 1.0
        if row["name"].endswith("/dense"):
            assert row["x_dense"] == 1.0


def test_bench_kernels_approx_topk_adds_a_row_with_its_recall(capsys):
    args = [
        "bench",
        "kernels",
        "--arch",
        "topk",
        "jumprelu",
        "--batch-size",
        "64",
        "--d-in",
        "16",
        "--n-latents",
        "256",
        "--k",
        "4",
        "--reps",
        "1",
        "--approx-topk",
        "--no-trainer",
        "--json",
    ]
    assert main(args) == 0
    rows = {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {f"topk-256/{p}" for p in ("limit", "dense", "fused", "approx")} | {
        f"jumprelu-256/{p}" for p in ("limit", "dense", "fused")
    }
    assert 0.9 <= rows["topk-256/approx"]["recall"] <= 1 and rows["topk-256/fused"]["recall"] is None
    assert rows["topk-256/approx"]["ms"] > 0 and "recall" not in rows["jumprelu-256/fused"]


def test_bench_kernels_rejects_unknown_architecture(capsys):
    assert main(["bench", "kernels", "--arch", "topkk"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown architecture 'topkk'")


def test_bench_analyze_reports_throughput_and_page_latency(capsys):
    args = [
        "bench",
        "analyze",
        "--n-latents",
        "128",
        "--d-in",
        "16",
        "--k",
        "4",
        "--tokens",
        "8192",
        "--reads",
        "5",
        "--json",
    ]
    assert main(args) == 0
    rows = {row["name"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert list(rows) == ["encode only (floor)", "analysis pass", "tables + write store", "feature page read"]
    assert rows["encode only (floor)"]["x_encode"] == 1.0 and rows["analysis pass"]["x_encode"] > 1.0
    assert rows["analysis pass"]["tokens"] == 8192 and rows["analysis pass"]["tokens_per_s"] > 0
    page = rows["feature page read"]
    assert 0 < page["median_ms"] <= page["p95_ms"] and page["peak_rss_mb"] > 0


def test_bench_flags_come_from_one_config_each(tmp_path):
    from app.cli import _build_parser
    from app.flags import config_from_args
    from sae.bench_analyze import AnalyzeBenchConfig
    from sae.tokfsm import CodebookBenchConfig, bench_fsm
    from workbench.bench_cache import CacheBenchConfig
    from workbench.bench_kernels import DEFAULT_CASES, KernelBenchConfig, kernel_cases

    parser = _build_parser()
    kernels = config_from_args(
        KernelBenchConfig,
        parser.parse_args(
            [
                "bench",
                "kernels",
                "--batch-size",
                "64",
                "--d-in",
                "16",
                "--n-latents",
                "256",
                "--arch",
                "topk",
                "jumprelu",
                "--approx-topk",
                "--no-trainer",
            ]
        ),
    )
    assert (kernels.batch_size, kernels.d_in, kernels.n_latents) == (64, 16, (256,))
    assert kernels.approx_topk and not kernels.trainer
    assert [(c.architecture, c.n_latents) for c in kernel_cases(kernels)] == [
        ("topk", 256),
        ("jumprelu", 256),
    ]
    assert kernel_cases(KernelBenchConfig()) == list(DEFAULT_CASES)
    cache = config_from_args(CacheBenchConfig, parser.parse_args(["bench", "cache", "--tokens", "4096"]))
    assert (cache.model, cache.tokens, cache.reps) == ("demo", 4096, 5)
    analyze = config_from_args(AnalyzeBenchConfig, parser.parse_args(["bench", "analyze", "--d-in", "16"]))
    assert (analyze.n_latents, analyze.d_in, analyze.reads) == (16_384, 16, 50)
    argv = ["bench", "codebook", "--model-steps", "9"]
    codebook = config_from_args(CodebookBenchConfig, parser.parse_args(argv))
    assert codebook.model_steps == 9 and bench_fsm(codebook).digits == 2  # 12 states: "0".."11"
    saved = tmp_path / "kernels.json"
    saved.write_text(json.dumps({"batch_size": 32, "architectures": ["codebook"]}))
    again = config_from_args(
        KernelBenchConfig, parser.parse_args(["bench", "kernels", "--config", str(saved), "--k", "2"])
    )
    assert (again.batch_size, again.architectures, again.k) == (32, ("codebook",), 2)


def test_bench_configs_saved_before_the_renames_still_load(tmp_path):
    """Issue 18 renamed bench fields (batch -> batch_size, latents -> n_latents, arch -> architectures,
    d -> d_in, features -> n_planted); a config saved under the old names reruns the same bench."""
    from app.cli import _build_parser
    from app.flags import config_from_args
    from sae.bench_analyze import AnalyzeBenchConfig
    from sae.bench_config import SaeBenchConfig
    from workbench.bench_kernels import KernelBenchConfig

    cases = [
        (
            "kernels",
            KernelBenchConfig,
            {"batch": 32, "latents": [512], "arch": ["codebook"], "d_in": 16},
            KernelBenchConfig(batch_size=32, n_latents=(512,), architectures=("codebook",), d_in=16),
        ),
        (
            "analyze",
            AnalyzeBenchConfig,
            {"latents": 128, "d": 16, "k": 4},
            AnalyzeBenchConfig(n_latents=128, d_in=16, k=4),
        ),
        (
            "sae",
            SaeBenchConfig,
            {
                "config": {
                    "arch": ["topk"],
                    "scenario": ["zipf"],
                    "seeds": [0],
                    "samples": 40000,
                    "features": 32,
                    "d": 16,
                    "threads": 2,
                }
            },  # as printed above a table
            SaeBenchConfig(
                architectures=("topk",), scenario=("zipf",), seeds=(0,), samples=40000, n_planted=32, d_in=16
            ),
        ),
    ]
    parser = _build_parser()
    for command, cls, saved, expected in cases:
        (tmp_path / f"{command}.json").write_text(json.dumps(saved))
        args = parser.parse_args(["bench", command, "--config", str(tmp_path / f"{command}.json")])
        assert config_from_args(cls, args) == expected, command


def test_bad_bench_flags_are_one_line_errors(capsys):
    for argv, message in [
        (["bench", "codebook", "--states", "0"], "must be positive"),
        (["bench", "kernels", "--n-latents", "64", "--k", "32"], "at most n_latents / 8"),
        (["bench", "analyze", "--reads", "0"], "must be positive"),
        (["bench", "cache", "--reps", "0"], "must be positive"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
