"""`workbench models`, `corpora`, `cache` and `demo-model`: what models and text there are, and
caching activations (one process, or ranks launched with torchrun)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from app.commands.output import print_summary
from app.flags import config_from_args
from workbench.errors import WorkbenchError


def cmd_models(args) -> None:
    from workbench.model_sources import BUILTIN_MODELS

    if not args.model:
        if args.json:
            print(json.dumps(BUILTIN_MODELS, indent=2))
            return
        for name, text in BUILTIN_MODELS.items():
            print(f"{name:14s} {text}")
        print(
            "also: a local HuggingFace folder, or a hub name such as gpt2 (needs the hub); "
            "`workbench models --model NAME` lists hooks"
        )
        return
    from workbench.models import load_model

    model = load_model(args.model)
    hooks = dict(sorted(model.hook_widths().items()))
    if args.json:
        print(json.dumps({"model": args.model, "default_hook": model.default_hook, "hooks": hooks}, indent=2))
        return
    print(
        f"{args.model}: {model.n_layers} layers, d_model {model.d_model}, "
        f"vocab {model.d_vocab}, n_ctx {model.n_ctx}"
    )
    if model.source.note:
        print(f"note: {model.source.note}")
    print(f"default hook: {model.default_hook}")
    for hook, d in hooks.items():
        print(f"  {hook:44s} d={d}")


def cmd_corpora(args) -> None:
    from workbench.corpus import BUILTIN_CORPORA

    for name, text in BUILTIN_CORPORA.items():
        print(f"{name:17s} {text}")
    print(
        "also: --corpus PATH (.txt files, .jsonl with a 'text' field, or a folder of them), "
        "--corpus hf:NAME[:SPLIT]"
    )


def cmd_cache(args) -> None:
    from workbench.activations import CacheConfig, build_cache
    from workbench.cache_reader import ActivationCache
    from workbench.distributed import check_rank_devices, ranks

    config = config_from_args(CacheConfig, args)
    model = None
    if getattr(args, "transcoder_layers", None):
        config, model = _with_mlp_hooks(config, args.transcoder_layers, load_here=args.nproc <= 1)
    if wants_torchrun(args):
        if config.from_activations:
            raise WorkbenchError("--from copies rows and runs no model: it takes one process (drop --nproc)")
        check_rank_devices(config.device, args.nproc)  # one GPU per rank, or one line before launching
        return relaunch_under_torchrun(args)
    started = time.time()
    out = build_cache(config, model=model, progress=not args.quiet)
    if not ranks().is_main:  # under torchrun, rank 0 reports for everyone
        return
    cache = ActivationCache(out)
    summary = {
        "cache": str(out),
        "model": cache.model,
        "hooks": {h: cache.width(h) for h in cache.hooks},
        **(
            {
                "tokens": cache.n_rows,
                "windows": cache.manifest.n_windows,
                "context_length": cache.context_length,
            }
            if cache.has_tokens
            else {"rows": cache.n_rows, "training_rows": cache.training_rows}
        ),
        "dtype": cache.manifest.dtype,
        "shards_per_hook": cache.n_shards(cache.hooks[0]),
        "size_mb": round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20, 1),
        "seconds": round(time.time() - started, 1),
    }
    print_summary(summary, args.json)


def _with_mlp_hooks(config, layers: list[str], load_here: bool):
    """(`config` with the MLP input and output hooks of `layers` (--transcoder-layer) added to its
    hooks, the model that names them). `load_here`: the model is loaded where the cache is
    computed and reused for it; else (ranks will each load their own) on the CPU, then dropped."""
    from dataclasses import replace

    from sae.transcoders import mlp_hook_pairs
    from workbench.devices import resolve_device
    from workbench.models import load_model

    if config.from_activations:
        raise WorkbenchError("--transcoder-layer names a model's MLP hooks; --from brings no model")
    device = resolve_device(config.device) if load_here else "cpu"
    model = load_model(config.model, device=device, dtype=config.model_dtype)
    pairs = mlp_hook_pairs(model, layers)
    hooks = [*config.hooks, *(h for _, in_hook, out_hook in pairs for h in (in_hook, out_hook))]
    return replace(config, hooks=tuple(dict.fromkeys(hooks))), (model if load_here else None)


def wants_torchrun(args) -> bool:
    """--nproc N > 1 outside torchrun: this process launches the ranks instead of working."""
    if args.nproc < 1:
        raise WorkbenchError(f"--nproc must be at least 1, got {args.nproc}")
    return args.nproc > 1 and "WORLD_SIZE" not in os.environ


def relaunch_under_torchrun(args) -> None:
    """`workbench cache|train --nproc N ...` =
    `torchrun --standalone --nproc_per_node N -m app.cli cache|train ...`.
    SIGTERM/SIGINT reach torchrun, which stops the ranks; this process then exits with its status."""
    from workbench.processes import run_child

    argv, skip = [], False
    for item in args.argv:
        if skip or item == "--nproc" or item.startswith("--nproc="):
            skip = item == "--nproc"
            continue
        argv.append(item)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "app.cli",
        *argv,
    ]
    result = run_child(command)
    if result.signal is not None:  # stopped from outside, not failed: the runs resume when rerun
        print(
            f"stopped by {signal.Signals(result.signal).name} "
            "(`workbench cache` and `workbench train` resume when rerun with the same flags)",
            file=sys.stderr,
        )
        raise SystemExit(result.status)
    if result.status:
        raise WorkbenchError(
            f"torchrun exited with status {result.status} (the ranks' own errors are printed above)"
        )


def cmd_demo_train(args) -> None:
    from workbench.demo_model import DemoModelConfig, train_demo_model

    summary = train_demo_model(config_from_args(DemoModelConfig, args), progress=not args.quiet)
    print_summary({k: v for k, v in summary.items() if k != "validation_history"}, args.json)


def cmd_demo_info(args) -> None:
    from workbench.demo_model import read_training_summary

    summary = read_training_summary()
    print_summary({k: v for k, v in summary.items() if k != "validation_history"}, False)
