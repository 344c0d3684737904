"""`workbench bench cache|kernels|sae|analyze|codebook|explore`: each benchmark's flags derive from its
config dataclass (in the module that runs it); ratios are measured within one process."""

from __future__ import annotations

import dataclasses
import json

from app.commands.output import print_rows, print_summary
from app.flags import config_from_args
from workbench.devices import describe, matmul_dtype, resolve_device
from workbench.errors import WorkbenchError


def cmd_bench_cache(args) -> None:
    from workbench.bench_cache import CacheBenchConfig, run_cache_benchmark

    config = config_from_args(CacheBenchConfig, args)
    device = resolve_device(config.device)
    if not args.json:
        print(f"device {describe(device)}, model {config.model} in {config.model_dtype}")
    rows = run_cache_benchmark(
        config.model, tokens=config.tokens, reps=config.reps, device=device, model_dtype=config.model_dtype
    )
    print_rows(rows, args.json)


def cmd_bench_kernels(args) -> None:
    from sae.bench_step import trainer_paths
    from workbench.bench_kernels import KernelBenchConfig, describe_run, kernel_cases, run_kernel_benchmark

    config = config_from_args(KernelBenchConfig, args)
    device = resolve_device(config.device)
    if not args.json:
        print(describe_run(device, config.matmul_dtype))
    rows = run_kernel_benchmark(
        kernel_cases(config),
        batch_size=config.batch_size,
        d_in=config.d_in,
        k=config.k,
        reps=config.reps,
        threads=config.threads,
        approximate=config.approx_topk,
        extra_paths=trainer_paths if config.trainer else None,
        device=device,
        matmul_dtype=matmul_dtype(config.matmul_dtype),
    )
    print_rows(rows, args.json)


def cmd_bench_sae(args) -> None:
    from sae.base import architectures
    from sae.bench import run_sae_benchmark
    from sae.bench_config import SaeBenchConfig

    config = config_from_args(SaeBenchConfig, args)
    chosen = list(config.architectures) or architectures()
    unknown = sorted(set(chosen) - set(architectures()))
    if unknown:
        raise WorkbenchError(f"unknown architecture {unknown[0]!r}; choose from {', '.join(architectures())}")
    resolve_device(config.device)  # a device this machine lacks is refused before any data is made
    if not args.json:
        shown = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}
        print(json.dumps({"config": shown}))
    rows = run_sae_benchmark(config, chosen, progress=not args.json)
    print_rows([r for r in rows if r["seed"] != "all"], args.json)
    print_rows([r for r in rows if r["seed"] == "all"], args.json)


def cmd_bench_analyze(args) -> None:
    from sae.bench_analyze import AnalyzeBenchConfig, run_analyze_benchmark

    config = config_from_args(AnalyzeBenchConfig, args)
    print_rows(run_analyze_benchmark(**dataclasses.asdict(config), progress=not args.json), args.json)


def cmd_bench_codebook(args) -> None:
    from sae.tokfsm import CodebookBenchConfig, bench_fsm, run_tokfsm_benchmark

    config = config_from_args(CodebookBenchConfig, args)
    result = run_tokfsm_benchmark(
        bench_fsm(config),
        codes=config.codes,
        model_steps=config.model_steps,
        device=config.device,
        model_dtype=config.model_dtype,
    )
    if args.json:
        print(json.dumps(result))
        return
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items() if k != "per_state"}
    print_summary(summary, False)


def cmd_bench_explore(args) -> None:
    from app.bench_explore import ExploreBenchConfig, run_explore_benchmark

    config = config_from_args(ExploreBenchConfig, args)
    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    for part, rows in run_explore_benchmark(config, say):
        if args.json:
            print_rows([{"part": part, **row} for row in rows], True)
        else:
            print_rows(rows, False)
            print(flush=True)


def cmd_bench_graphs(args) -> None:
    from circuits.bench_graphs import GraphBenchConfig, run_graph_benchmark

    config = config_from_args(GraphBenchConfig, args)
    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    rows = run_graph_benchmark(config, say)
    print_rows([r for r in rows if r["part"] == "speed"], args.json)
    print_rows([r for r in rows if r["part"] == "reality"], args.json)
