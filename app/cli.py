"""The `workbench` command: one subcommand per job, flags derived from the config dataclasses.

Bad input ends with `error: <one line>` on stderr and exit status 2; nothing is half-written
(every writer stages files and renames them). Heavy imports happen inside each command, so
`workbench --help` is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from app.flags import add_config_arguments, config_from_args
from workbench.errors import WorkbenchError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _build_parser() -> argparse.ArgumentParser:
    from sae.analyze import AnalyzeConfig
    from sae.bench_config import SaeBenchConfig
    from sae.codebook_finetune import FinetuneConfig
    from sae.evals import EvalConfig
    from sae.probes import ProbeConfig
    from sae.train_config import TrainConfig
    from workbench.activations import CacheConfig
    from workbench.demo_model import DemoModelConfig

    parser = _Parser(prog="workbench", description="Interpretability workbench: cache, train, analyze, explore.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    models = commands.add_parser("models", help="list the built-in models, or one model's hook names")
    models.add_argument("--model", help="load this model and list its hook names and widths")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(run=cmd_models)

    corpora = commands.add_parser("corpora", help="list the built-in corpora")
    corpora.set_defaults(run=cmd_corpora)

    cache = commands.add_parser("cache", help="run a model over a corpus and store activations at hooks")
    add_config_arguments(cache, CacheConfig)
    cache.add_argument("--nproc", type=int, default=1,
                       help="processes (ranks) that share the work, launched with torchrun; the cache is the same")
    _quiet_and_json(cache)
    cache.set_defaults(run=cmd_cache)

    demo = commands.add_parser("demo-model", help="the built-in demo model").add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION")
    train = demo.add_parser("train", help="train the demo model (tokenizer + GPT-2) from scratch, seeded")
    add_config_arguments(train, DemoModelConfig)
    _quiet_and_json(train)
    train.set_defaults(run=cmd_demo_train)
    info = demo.add_parser("info", help="print the demo model's card (size, corpus, validation loss, sample)")
    info.set_defaults(run=cmd_demo_info)

    train_cmd = commands.add_parser("train", help="train dictionaries (a grid of architectures, k, widths) in one read of a cache")
    add_config_arguments(train_cmd, TrainConfig)
    train_cmd.add_argument("--nproc", type=int, default=1,
                           help="data-parallel ranks, launched with torchrun")
    _quiet_and_json(train_cmd)
    train_cmd.set_defaults(run=cmd_train)

    _dictionary_command(commands, "eval", "FVU, L0, dead %%, CE-loss and KL scores of a trained dictionary",
                        EvalConfig, cmd_eval, "a dictionary folder (ours, SAELens or sparsify) or a training output folder")
    _dictionary_command(commands, "analyze", "build the feature store (examples, histograms, logit effects, ...) of a dictionary",
                        AnalyzeConfig, cmd_analyze, "a dictionary folder or a training output folder (one store per dictionary)")

    explore = commands.add_parser("explore", help="open the Streamlit explorer on feature stores (bound to 127.0.0.1)")
    explore.add_argument("stores", nargs="*", metavar="STORE", help="store files or folders to search for them; default: runs/")
    explore.add_argument("--port", type=int, default=8501, help="port to serve on")
    explore.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    explore.set_defaults(run=cmd_explore)

    circuits = commands.add_parser("circuits", help="discover a circuit (exact, EAP, EAP-IG, ACDC), score it, save its JSON")
    circuits.add_argument("--model", default="", help="a GPT-2-architecture model spec (default: demo; the ground-truth tasks bring their own)")
    circuits.add_argument("--task", default="induction",
                          help="induction, trained-induction, planted-induction, or-gate, and-gate, or-gate-saturated, "
                               "or a task .json file (see circuits/catalog.py)")
    circuits.add_argument("--dictionary", nargs="+", default=[], metavar="FOLDER",
                          help="dictionary folders (one per hook): a feature circuit of their latents and error terms")
    circuits.add_argument("--features-per-hook", type=int, default=10, help="latents per hook in a feature circuit")
    circuits.add_argument("--benchmark", nargs="*", metavar="TASK", default=None,
                          help="run every method on the ground-truth tasks (default: all of them; 'induction' adds the demo model)")
    circuits.add_argument("--method", default=None,
                          help="exact, eap, eap-ig (default), eap-ig-activations, acdc or codes; with --benchmark a comma list (default: all)")
    circuits.add_argument("--ablation", default="resample", help="what an ablated edge carries: resample, mean or zero")
    circuits.add_argument("--prompts", type=int, default=32, help="prompts in the task")
    circuits.add_argument("--length", type=int, default=33, help="tokens per prompt")
    circuits.add_argument("--steps", type=int, default=8, help="integration steps of EAP-IG")
    circuits.add_argument("--edges", type=int, default=0, help="edges kept in the circuit (default: 5%% of the graph)")
    circuits.add_argument("--top", type=int, default=10, help="edges printed")
    circuits.add_argument("--seed", type=int, default=0)
    circuits.add_argument("--out", default="", help="circuit JSON (default: runs/circuits/<model>-<task>-<method>.circuit.json)")
    circuits.add_argument("--json", action="store_true", help="print the summary as JSON")
    circuits.set_defaults(run=cmd_circuits)

    finetune = commands.add_parser("codebook-finetune", help="insert a codebook at a hook and train it with the model's LM loss")
    add_config_arguments(finetune, FinetuneConfig)
    _quiet_and_json(finetune)
    finetune.set_defaults(run=cmd_codebook_finetune)

    probe = commands.add_parser("probe", help="k-sparse probes on neurons or dictionary latents: accuracy per k")
    add_config_arguments(probe, ProbeConfig)
    probe.add_argument("--json", action="store_true", help="one JSON object per row")
    probe.set_defaults(run=cmd_probe)

    bench = commands.add_parser("bench", help="benchmarks (ratios measured in one process)").add_subparsers(
        dest="suite", required=True, parser_class=_Parser, metavar="SUITE")
    bench_cache = bench.add_parser("cache", help="caching vs forward-only throughput; reader GB/s")
    bench_cache.add_argument("--model", default="demo")
    bench_cache.add_argument("--tokens", type=int, default=262_144, help="tokens per timed pass (4 shards)")
    bench_cache.add_argument("--reps", type=int, default=5, help="interleaved repetitions (medians reported)")
    bench_cache.add_argument("--json", action="store_true", help="one JSON object per row")
    bench_cache.set_defaults(run=cmd_bench_cache)
    bench_kernels = bench.add_parser("kernels", help="SAE training step: fused vs dense vs the limit (matmul + top-k)")
    bench_kernels.add_argument("--batch", type=int, default=4096, help="tokens per step")
    bench_kernels.add_argument("--d-in", type=int, default=768, help="activation width")
    bench_kernels.add_argument("--k", type=int, default=32, help="active latents per token")
    bench_kernels.add_argument("--latents", type=int, nargs="+", help="dictionary widths (default: 16384 for all, 65536 for topk too)")
    bench_kernels.add_argument("--arch", nargs="+", help="architectures (default: topk batchtopk jumprelu matryoshka codebook)")
    bench_kernels.add_argument("--reps", type=int, default=5, help="interleaved repetitions (medians reported)")
    bench_kernels.add_argument("--threads", type=int, default=2, help="torch threads")
    bench_kernels.add_argument("--approx-topk", action="store_true",
                               help="also time TopK with int8 top-k candidates re-ranked exactly, and report its recall")
    bench_kernels.add_argument("--no-trainer", action="store_true",
                               help="skip the trainer's real TopK step (no dead latents, and with AuxK on 1/8 dead)")
    bench_kernels.add_argument("--json", action="store_true", help="one JSON object per row")
    bench_kernels.set_defaults(run=cmd_bench_kernels)
    bench_sae = bench.add_parser("sae", help="planted-feature recovery (MCC, recovered@0.9, dead, absorption) per architecture, scenario and seed")
    add_config_arguments(bench_sae, SaeBenchConfig)
    bench_sae.add_argument("--json", action="store_true", help="one JSON object per row")
    bench_sae.set_defaults(run=cmd_bench_sae)
    bench_analyze = bench.add_parser("analyze", help="feature-store build throughput (x the encode alone) and feature-page read latency")
    bench_analyze.add_argument("--latents", type=int, default=16_384, help="dictionary width")
    bench_analyze.add_argument("--d", type=int, default=768, help="activation width")
    bench_analyze.add_argument("--k", type=int, default=32, help="active latents per token (TopK)")
    bench_analyze.add_argument("--tokens", type=int, default=131_072, help="tokens in the timed pass")
    bench_analyze.add_argument("--reads", type=int, default=50, help="random feature pages read back")
    bench_analyze.add_argument("--threads", type=int, default=2, help="torch threads")
    bench_analyze.add_argument("--json", action="store_true", help="one JSON object per row")
    bench_analyze.set_defaults(run=cmd_bench_analyze)
    bench_codebook = bench.add_parser("codebook", help="codebook features vs TokFSM ground truth: per-state precision/recall")
    bench_codebook.add_argument("--states", type=int, default=12, help="FSM states")
    bench_codebook.add_argument("--codes", type=int, default=96)
    bench_codebook.add_argument("--model-steps", type=int, default=1200, help="training steps of the FSM model")
    bench_codebook.add_argument("--json", action="store_true", help="one JSON object (with per-state rows)")
    bench_codebook.set_defaults(run=cmd_bench_codebook)
    return parser


def _dictionary_command(commands, name: str, help_text: str, config_cls: type, run_command, run_help: str) -> None:
    """A command on RUN (a dictionary folder or a run of several) configured by `config_cls`."""
    command = commands.add_parser(name, help=help_text)
    command.add_argument("run", nargs="?", default="", metavar="RUN", help=f"{run_help}; default: the default training run")
    add_config_arguments(command, config_cls)
    _quiet_and_json(command)
    command.set_defaults(run_command=run_command)


def _quiet_and_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


# --- commands -------------------------------------------------------------------------------


def cmd_models(args) -> None:
    from workbench.model_sources import BUILTIN_MODELS

    if not args.model:
        if args.json:
            print(json.dumps(BUILTIN_MODELS, indent=2))
            return
        for name, text in BUILTIN_MODELS.items():
            print(f"{name:14s} {text}")
        print("also: a local HuggingFace folder, or a hub name such as gpt2 (needs the hub); "
              "`workbench models --model NAME` lists hooks")
        return
    from workbench.models import load_model

    model = load_model(args.model)
    hooks = dict(sorted(model.hook_widths().items()))
    if args.json:
        print(json.dumps({"model": args.model, "default_hook": model.default_hook, "hooks": hooks}, indent=2))
        return
    print(f"{args.model}: {model.n_layers} layers, d_model {model.d_resid}, vocab {model.d_vocab}, n_ctx {model.n_ctx}")
    if model.source.note:
        print(f"note: {model.source.note}")
    print(f"default hook: {model.default_hook}")
    for hook, d in hooks.items():
        print(f"  {hook:44s} d={d}")


def cmd_corpora(args) -> None:
    from workbench.corpus import BUILTIN_CORPORA

    for name, text in BUILTIN_CORPORA.items():
        print(f"{name:17s} {text}")
    print("also: --corpus PATH (.txt files, .jsonl with a 'text' field, or a folder of them), --corpus hf:NAME[:SPLIT]")


def cmd_cache(args) -> None:
    from workbench.activations import CacheConfig, build_cache
    from workbench.cache_reader import ActivationCache

    from workbench.distributed import ranks

    if _wants_torchrun(args):
        if getattr(args, "from_activations", ""):
            raise WorkbenchError("--from copies rows and runs no model: it takes one process (drop --nproc)")
        return _relaunch_under_torchrun(args)
    config = config_from_args(CacheConfig, args)
    started = time.time()
    out = build_cache(config, progress=not args.quiet)
    if not ranks().is_main:  # under torchrun, rank 0 reports for everyone
        return
    cache = ActivationCache(out)
    summary = {
        "cache": str(out),
        "model": cache.model,
        "hooks": {h: cache.d(h) for h in cache.hooks},
        **({"tokens": cache.n_rows, "windows": cache.manifest.n_windows, "context_length": cache.context_length}
           if cache.has_tokens else {"rows": cache.n_rows, "training_rows": cache.training_rows}),
        "dtype": cache.manifest.dtype,
        "shards_per_hook": cache.n_shards(cache.hooks[0]),
        "size_mb": round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20, 1),
        "seconds": round(time.time() - started, 1),
    }
    _print_summary(summary, args.json)


def _wants_torchrun(args) -> bool:
    """--nproc N > 1 outside torchrun: this process launches the ranks instead of working."""
    if args.nproc < 1:
        raise WorkbenchError(f"--nproc must be at least 1, got {args.nproc}")
    return args.nproc > 1 and "WORLD_SIZE" not in os.environ


def _relaunch_under_torchrun(args) -> None:
    """`workbench cache|train --nproc N ...` = `torchrun --standalone --nproc_per_node N -m app.cli cache|train ...`.
    SIGTERM/SIGINT reach torchrun, which stops the ranks; this process then exits with its status."""
    from workbench.processes import run_child

    argv, skip = [], False
    for item in args.argv:
        if skip or item == "--nproc" or item.startswith("--nproc="):
            skip = item == "--nproc"
            continue
        argv.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "app.cli", *argv]
    result = run_child(command)
    if result.signal is not None:  # stopped from outside, not failed: the runs resume when rerun
        print(f"stopped by {signal.Signals(result.signal).name} (`workbench cache` and `workbench train` resume when rerun with the same flags)", file=sys.stderr)
        raise SystemExit(result.status)
    if result.status:
        raise WorkbenchError(f"torchrun exited with status {result.status} (the ranks' own errors are printed above)")


def cmd_train(args) -> None:
    from sae.train import train
    from sae.train_config import TrainConfig
    from workbench.distributed import ranks
    from workbench.files import read_json

    config = config_from_args(TrainConfig, args)
    if _wants_torchrun(args):
        from sae.train import check_data_parallel
        from workbench.distributed import Ranks

        check_data_parallel(config.batch_size or args.nproc, Ranks(0, args.nproc))  # refuse here, in one line, before launching ranks
        return _relaunch_under_torchrun(args)
    folders = train(config, progress=not args.quiet)
    if not ranks().is_main:
        return
    rows = []
    for folder in folders:
        meta = read_json(folder / "config.json", "dictionary config")
        metrics = meta.get("metrics", {})
        rows.append({"dictionary": folder.name, "latents": meta["dictionary"]["n_latents"], "k": meta["dictionary"]["k"],
                     "fvu": round(metrics.get("fvu", float("nan")), 4), "l0": round(metrics.get("l0", float("nan")), 2),
                     "l0_inference": round(metrics.get("inference_l0", float("nan")), 2),
                     "dead_%": round(100 * metrics.get("dead_fraction", float("nan")), 2),
                     **({"resampled": f"{metrics['resampled_total']} in {metrics['resamplings']}"} if metrics.get("resamplings") else {}),
                     "tokens": meta.get("tokens_trained"), "folder": str(folder)})
    _print_rows(rows, args.json)


def cmd_eval(args) -> None:
    from sae.evals import EvalConfig, evaluate
    from workbench.files import write_json_atomic

    config = config_from_args(EvalConfig, args)
    folders = _dictionary_folders(Path(args.run) if args.run else None)
    for folder, dictionary, model in _with_models(folders, config.model, load=not config.cache):
        metrics = evaluate(dictionary, config, model=model, progress=not args.quiet)
        if (folder / "config.json").exists():
            write_json_atomic(folder / "eval.json", metrics)
        shown = {"dictionary": str(folder), **{k: v for k, v in metrics.items() if k != "log_density_histogram"}}
        if args.json:
            print(json.dumps({"dictionary": str(folder), **metrics}))
        else:
            _print_summary({k: round(v, 4) if isinstance(v, float) else v for k, v in shown.items()}, False)


def cmd_analyze(args) -> None:
    from sae.analyze import AnalyzeConfig, analyze
    from workbench.store import FeatureStore

    config = config_from_args(AnalyzeConfig, args)
    folders = _dictionary_folders(Path(args.run) if args.run else None)
    if config.out and len(folders) > 1:
        raise WorkbenchError(f"--out names one store, but {args.run} holds {len(folders)} dictionaries")
    for folder, dictionary, model in _with_models(folders):
        path = analyze(dictionary, config, folder=folder, model=model, progress=not args.quiet)
        store = FeatureStore(path)
        alive = store.features(min_density=1e-12, limit=store.n_features)
        _print_summary({"store": str(path), "features": store.n_features, "alive": len(alive),
                        "tokens": store.meta["tokens_analyzed"], "median_density": float(alive.density.median()) if len(alive) else 0.0,
                        "seconds": store.meta["seconds"]}, args.json)
        store.close()


def cmd_circuits(args) -> None:
    if args.benchmark is not None:
        return _circuits_benchmark(args)
    if args.dictionary:
        return _feature_circuit(args)
    from circuits.catalog import GROUND_TRUTH_TASKS, load_task
    from circuits.discover import discover, to_circuit
    from circuits.evaluate import faithfulness_all

    args.method = args.method or "eap-ig"
    graph, task = load_task(args.task, args.model, args.prompts, args.length, args.seed)
    found = discover(graph, task, args.method, ablation=args.ablation, steps=args.steps, n_edges=args.edges)
    faithful = faithfulness_all(graph, task, found.mask(graph))
    planted = args.task in GROUND_TRUTH_TASKS
    model_name = "built-in" if planted else args.model or "demo"
    circuit = to_circuit(graph, task, found, metrics={"faithfulness": faithful, "model": model_name,
                                                      "ablation": args.ablation, "seconds": round(found.seconds, 2)})
    out = _save_circuit(circuit, args.out, "" if planted else model_name, task.name, args.method)
    top = sorted(circuit.edges, key=lambda e: -abs(e.score))[: args.top]
    if args.json:
        print(json.dumps({"circuit": str(out), "method": args.method, "edges_kept": int(found.kept.sum()),
                          "faithfulness": faithful, "seconds": round(found.seconds, 2),
                          "top_edges": [e.__dict__ for e in top]}))
        return
    _print_rows([{"source": e.source, "target": e.target, "input": e.input, "score": round(e.score, 5)} for e in top], False)
    _print_summary({"circuit": str(out), "edges_kept": int(found.kept.sum()), "of_edges": len(circuit.edges),
                    **{f"faithfulness_{k}": round(v, 4) for k, v in faithful.items()}, "seconds": round(found.seconds, 2)}, False)


def _feature_circuit(args) -> None:
    from circuits.catalog import model_task
    from circuits.features import feature_circuit
    from sae.io import load
    from workbench.models import load_model
    from workbench.store import STORE_FILE

    dictionaries, stores = {}, {}
    for folder in map(Path, args.dictionary):
        dictionary = load(folder)
        hook = dictionary.meta.get("hook")
        if not hook or hook in dictionaries:
            raise WorkbenchError(f"{folder}: " + ("records no hook" if not hook else f"a second dictionary for hook {hook}"))
        dictionaries[hook] = dictionary
        if (folder / STORE_FILE).exists():
            stores[hook] = str(folder / STORE_FILE)
    spec = args.model or next(iter(dictionaries.values())).meta.get("model") or "demo"
    model = load_model(spec)
    for hook, dictionary in dictionaries.items():
        if model.d_model(hook) != dictionary.d_in:
            raise WorkbenchError(f"dictionary for {hook} reads {dictionary.d_in} dims; {spec} has {model.d_model(hook)} there")
    task = model_task(args.task, model, args.prompts, args.length, args.seed)
    started = time.perf_counter()
    circuit = feature_circuit(model, task, dictionaries, steps=args.steps, per_hook=args.features_per_hook, stores=stores)
    circuit.metrics.update(model=spec, seconds=round(time.perf_counter() - started, 2))
    out = _save_circuit(circuit, args.out, spec, task.name, "features")
    top = sorted((n for n in circuit.nodes if n.kind != "logits"), key=lambda n: -abs(n.score))[: args.top]
    rows = [{"node": n.id, "kind": n.kind, "effect": round(n.score, 5)} for n in top]
    if args.json:
        print(json.dumps({"circuit": str(out), "method": circuit.method, "nodes": rows, **circuit.metrics}))
        return
    _print_rows(rows, False)
    _print_summary({"circuit": str(out), "seconds": circuit.metrics["seconds"]}, False)


def _save_circuit(circuit, out: str, model: str, task: str, method: str) -> Path:
    """Save to `out`, or runs/circuits/<model>-<task>-<method>.circuit.json (no model part for built-in models)."""
    name = (Path(model).name if Path(model).exists() else model) + "-" if model else ""
    path = Path(out or f"runs/circuits/{name}{task}-{method}.circuit.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    circuit.save(path)
    return path


def _circuits_benchmark(args) -> None:
    from circuits.benchmark import run_benchmark
    from circuits.discover import METHODS

    methods = tuple(args.method.split(",")) if args.method else METHODS
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise WorkbenchError(f"unknown method {', '.join(unknown)} (one of {', '.join(METHODS)})")
    table = []
    for row in run_benchmark(args.benchmark or None, methods, prompts=args.prompts):
        if args.json:
            print(json.dumps(_nan_to_none(row)), flush=True)
            continue
        flat = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k != "faithfulness"}
        flat.update({f"faithful_{k}": round(v, 3) for k, v in row["faithfulness"].items()})
        table.append(flat)
    if table:
        _print_rows(table, False)


def _nan_to_none(value):
    """Strict JSON has no NaN: undefined scores (an AUC with one class, a constant ranking) become null."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and value != value else value


def cmd_explore(args) -> None:
    from app.explorer.launch import launch

    sys.exit(launch(args.stores or ["runs"], port=args.port, host=args.host))


def _with_models(folders: list[Path], model_spec: str = "", load: bool = True):
    """(folder, dictionary, model) per folder; each model (`model_spec`, else the dictionary's own)
    is loaded once for consecutive dictionaries of it; None when neither names one (or not `load`)."""
    from sae.io import load
    from workbench.models import load_model

    model = None
    for folder in folders:
        dictionary = load(folder)
        spec = (model_spec or dictionary.meta.get("model")) if load else ""
        if spec and (model is None or model.spec != spec):
            model = load_model(spec)
        yield folder, dictionary, (model if spec else None)


def _dictionary_folders(run: Path | None) -> list[Path]:
    """RUN itself if it holds a dictionary, else the dictionaries directly inside it."""
    from sae.io import CONFIG, is_dictionary_folder
    from sae.train_config import TrainConfig
    from sae.train import default_output_dir

    if run is None:  # the default `workbench train` run: on the default cache's first hook
        from workbench.activations import CacheConfig
        from workbench.cache_reader import ActivationCache

        cache_dir = CacheConfig().output_dir()
        hook = ActivationCache(cache_dir).hooks[0] if (cache_dir / "manifest.json").exists() else ""
        run = default_output_dir(TrainConfig(), hook)
    if is_dictionary_folder(run):
        return [run]
    found = sorted(p for p in run.iterdir() if p.is_dir() and (p / CONFIG).exists()) if run.is_dir() else []
    if not found:
        raise WorkbenchError(f"{run}: no trained dictionary here (run `workbench train` first)")
    return found


def cmd_codebook_finetune(args) -> None:
    from sae.codebook_finetune import FinetuneConfig, run_finetune

    out, metrics = run_finetune(config_from_args(FinetuneConfig, args), progress=not args.quiet)
    _print_summary({"codebook": str(out), **{k: round(v, 4) for k, v in metrics.items()}}, args.json)


def cmd_bench_codebook(args) -> None:
    from sae.tokfsm import FSMConfig, run_tokfsm_benchmark

    if min(args.states, args.codes, args.model_steps) <= 0:
        raise WorkbenchError("--states, --codes and --model-steps must be positive")
    config = FSMConfig(states=args.states, out_degree=3, digits=len(str(args.states - 1)), steps_per_sequence=15)
    result = run_tokfsm_benchmark(config, codes=args.codes, model_steps=args.model_steps)
    if args.json:
        print(json.dumps(result))
        return
    _print_summary({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items() if k != "per_state"}, False)


def cmd_probe(args) -> None:
    from sae.probes import ProbeConfig, default_output, run_probes

    config = config_from_args(ProbeConfig, args)
    rows = run_probes(config)
    shown = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "features_chosen"} for r in rows]
    _print_rows(rows if args.json else shown, args.json)
    if not args.json:
        print(f"saved: {default_output(config)}")


def cmd_bench_sae(args) -> None:
    from sae.bench import run_sae_benchmark
    from sae.bench_config import SaeBenchConfig
    from sae.base import architectures

    config = config_from_args(SaeBenchConfig, args)
    archs = list(config.arch) or architectures()
    unknown = sorted(set(archs) - set(architectures()))
    if unknown:
        raise WorkbenchError(f"unknown architecture {unknown[0]!r}; choose from {', '.join(architectures())}")
    if not args.json:
        print(json.dumps({"config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}}))
    rows = run_sae_benchmark(config, archs, progress=not args.json)
    _print_rows([r for r in rows if r["seed"] != "all"], args.json)
    _print_rows([r for r in rows if r["seed"] == "all"], args.json)


def cmd_bench_analyze(args) -> None:
    from sae.bench_analyze import run_analyze_benchmark

    rows = run_analyze_benchmark(latents=args.latents, d=args.d, k=args.k, tokens=args.tokens, reads=args.reads,
                                 threads=args.threads, progress=not args.json)
    _print_rows(rows, args.json)


def cmd_demo_train(args) -> None:
    from workbench.demo_model import DemoModelConfig, train_demo_model

    summary = train_demo_model(config_from_args(DemoModelConfig, args), progress=not args.quiet)
    _print_summary({k: v for k, v in summary.items() if k != "validation_history"}, args.json)


def cmd_demo_info(args) -> None:
    from workbench.demo_model import read_training_summary

    summary = read_training_summary()
    _print_summary({k: v for k, v in summary.items() if k != "validation_history"}, False)


def cmd_bench_cache(args) -> None:
    from workbench.bench_cache import run_cache_benchmark

    rows = run_cache_benchmark(args.model, tokens=args.tokens, reps=args.reps)
    _print_rows(rows, args.json)


def cmd_bench_kernels(args) -> None:
    from workbench.bench_kernels import ARCHITECTURES, DEFAULT_CASES, KernelBenchCase, run_kernel_benchmark

    archs = args.arch or list(ARCHITECTURES)
    unknown = sorted(set(archs) - set(ARCHITECTURES))
    if unknown:
        raise WorkbenchError(f"unknown architecture {unknown[0]!r}; choose from {', '.join(ARCHITECTURES)}")
    if args.latents:
        cases = [KernelBenchCase(a, m) for a in archs for m in args.latents]
    else:
        cases = [c for c in DEFAULT_CASES if c.arch in archs]
    if min(args.batch, args.d_in, args.k, args.reps, args.threads, *(c.n_latents for c in cases)) < 1:
        raise WorkbenchError("--batch, --d-in, --k, --reps, --threads and --latents must be positive")
    if any(args.k > c.n_latents // 8 for c in cases):
        raise WorkbenchError("--k must be at most latents / 8 (Matryoshka's smallest prefix)")
    from sae.bench_step import trainer_paths

    rows = run_kernel_benchmark(cases, batch=args.batch, d_in=args.d_in, k=args.k, reps=args.reps, threads=args.threads,
                                approximate=args.approx_topk, extra_paths=None if args.no_trainer else trainer_paths)
    _print_rows(rows, args.json)


def _print_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    from workbench.bench import format_table

    print(format_table(rows))


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        print(f"{key:{width}s}  {text}")


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        (getattr(args, "run_command", None) or args.run)(args)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: leave the group together
            from workbench.distributed import finish

            finish()
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, missing folders, full disks: the user's to fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (`workbench cache` and `workbench train` resume when rerun with the same flags)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
