"""The `workbench` command: one subcommand per job, flags derived from the config dataclasses.

The commands are a table (`COMMANDS`): each names its config dataclass, its few hand-written
flags and its function, both as "module:name", imported when the parser is built or the command
runs (the functions live in `app.commands`), so `workbench --help` loads no command's code.
Bad input ends with `error: <one line>` on stderr and exit status 2; nothing is half-written
(every writer stages files and renames them).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NamedTuple

from app.flags import add_config_arguments
from workbench.errors import WorkbenchError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message: str):
        renamed = [f"{old} is now {new}" for old, new in RENAMED_FLAGS.items() if old in message.split()]
        hint = f"; {', '.join(renamed)}" if message.startswith("unrecognized arguments") and renamed else ""
        self.exit(2, f"error: {message}{hint} (see `{self.prog} --help`)\n")


# Flags renamed to one word per concept (issue 18; README, Glossary): a user's old command is
# told the new name instead of only "unrecognized".
RENAMED_FLAGS = {"--latents": "--n-latents", "--features": "--n-planted", "--learning-rate": "--lr"}


class Command(NamedTuple):
    name: str
    """The subcommand, e.g. "bench kernels" (a word before the last names its group)."""
    help: str
    run: str
    """"module:function" called with the parsed arguments."""
    config: str = ""
    """"module:Class" whose fields become flags (plus --config), or empty."""
    flags: tuple = ()
    """Hand-written flags: (names, argparse options) for what no config records (output, processes)."""


def _flag(*names: str, **options) -> tuple:
    return names, options


_QUIET = _flag("--quiet", action="store_true", help="no progress bar")
_SUMMARY_JSON = _flag("--json", action="store_true", help="print the summary as JSON")
_ROWS_JSON = _flag("--json", action="store_true", help="one JSON object per row")


def _run_folder(what: str) -> tuple:
    return _flag(
        "run", nargs="?", default="", metavar="RUN", help=f"{what}; default: the default training run"
    )


_GROUPS = {
    "demo-model": ("the built-in demo model", "action", "ACTION"),
    "bench": ("benchmarks (ratios measured in one process)", "suite", "SUITE"),
}
COMMANDS = (
    Command(
        "models",
        "list the built-in models, or one model's hook names",
        "app.commands.data:cmd_models",
        "",
        (
            _flag("--model", help="load this model and list its hook names and widths"),
            _flag("--json", action="store_true", help="print JSON"),
        ),
    ),
    Command("corpora", "list the built-in corpora", "app.commands.data:cmd_corpora"),
    Command(
        "cache",
        "run a model over a corpus and store activations at hooks",
        "app.commands.data:cmd_cache",
        "workbench.activations:CacheConfig",
        (
            _flag(
                "--transcoder-layer",
                "--transcoder-layers",
                dest="transcoder_layers",
                nargs="+",
                action="extend",
                default=[],
                metavar="LAYER",
                help="also cache the MLP input and output hooks (Model.mlp_hooks) of these layers "
                "(numbers, comma lists, or all), for `workbench train --transcoder-layer`",
            ),
            _flag(
                "--nproc",
                type=int,
                default=1,
                help="processes (ranks) that share the work, launched with torchrun; the cache is the same",
            ),
            _QUIET,
            _SUMMARY_JSON,
        ),
    ),
    Command(
        "demo-model train",
        "train the demo model (tokenizer + GPT-2) from scratch, seeded",
        "app.commands.data:cmd_demo_train",
        "workbench.demo_model:DemoModelConfig",
        (_QUIET, _SUMMARY_JSON),
    ),
    Command(
        "demo-model info",
        "print the demo model's card (size, corpus, validation loss, sample)",
        "app.commands.data:cmd_demo_info",
    ),
    Command(
        "train",
        "train dictionaries (a grid of architectures, k, widths) in one read of a cache",
        "app.commands.dictionaries:cmd_train",
        "sae.train_config:TrainConfig",
        (
            _flag("--nproc", type=int, default=1, help="data-parallel ranks, launched with torchrun"),
            _QUIET,
            _SUMMARY_JSON,
        ),
    ),
    Command(
        "eval",
        "FVU, L0, dead %%, CE-loss and KL scores of a trained dictionary",
        "app.commands.dictionaries:cmd_eval",
        "sae.evals:EvalConfig",
        (
            _flag(
                "run",
                nargs="*",
                default=[],
                metavar="RUN",
                help="dictionary folders (ours, SAELens or sparsify) or training output folders; "
                "default: the default training run",
            ),
            _QUIET,
            _SUMMARY_JSON,
        ),
    ),
    Command(
        "analyze",
        "build the feature store (examples, histograms, logit effects, ...) of a dictionary",
        "app.commands.dictionaries:cmd_analyze",
        "sae.analyze:AnalyzeConfig",
        (
            _run_folder("a dictionary folder or a training output folder (one store per dictionary)"),
            _QUIET,
            _SUMMARY_JSON,
        ),
    ),
    Command(
        "explore",
        "open the Streamlit explorer on feature stores (bound to 127.0.0.1)",
        "app.commands.dictionaries:cmd_explore",
        "",
        (
            _flag(
                "stores",
                nargs="*",
                metavar="STORE",
                help="store files or folders to search for them; default: runs/",
            ),
            _flag("--port", type=int, default=8501, help="port to serve on"),
            _flag("--host", default="127.0.0.1", help="address to bind (default: this machine only)"),
            _flag(
                "--device",
                default="auto",
                help="where the live model runs: auto (the first usable CUDA device, else the CPU), "
                "cpu, cuda or cuda:N (default: auto)",
            ),
            _flag(
                "--circuits",
                action="append",
                default=[],
                metavar="DIR",
                help="a folder (or file) of *.circuit.json for the Circuits page, besides ./runs and "
                "the stores' folders (repeatable)",
            ),
        ),
    ),
    Command(
        "explain",
        "explain features in words (any OpenAI-compatible chat endpoint; offline: the store's "
        "summaries) and score each explanation by detection",
        "app.commands.explain:cmd_explain",
        "sae.explain_config:ExplainConfig",
        (
            _flag(
                "store", metavar="STORE", help="a feature store file, or the dictionary folder holding one"
            ),
            _QUIET,
            _ROWS_JSON,
        ),
    ),
    Command(
        "circuits",
        "discover a circuit (exact, EAP, EAP-IG, ACDC), score it, save its JSON",
        "app.commands.circuits:cmd_circuits",
        "circuits.config:CircuitConfig",
        (
            # not a config field: a benchmark is no circuit (it writes no circuit JSON to rerun), and its
            # three states (absent, every task, these tasks) are what nargs="*" with default None gives
            _flag(
                "--benchmark",
                nargs="*",
                metavar="TASK",
                default=None,
                help="run every method on the ground-truth tasks (default: all of them; "
                "'induction' adds the demo model)",
            ),
            _flag("--top", type=int, default=10, help="edges printed"),
            _flag(
                "--out",
                default="",
                help="circuit JSON (default: runs/circuits/<model>-<task>-<method>.circuit.json)",
            ),
            _SUMMARY_JSON,
        ),
    ),
    Command(
        "codebook-finetune",
        "insert a codebook at a hook and train it with the model's LM loss",
        "app.commands.dictionaries:cmd_codebook_finetune",
        "sae.codebook_finetune:FinetuneConfig",
        (_QUIET, _SUMMARY_JSON),
    ),
    Command(
        "probe",
        "k-sparse probes on neurons or dictionary latents: accuracy per k",
        "app.commands.dictionaries:cmd_probe",
        "sae.probes:ProbeConfig",
        (_ROWS_JSON,),
    ),
    Command(
        "bench cache",
        "caching vs forward-only throughput; reader GB/s",
        "app.commands.bench:cmd_bench_cache",
        "workbench.bench_cache:CacheBenchConfig",
        (_ROWS_JSON,),
    ),
    Command(
        "bench kernels",
        "SAE training step: fused vs dense vs the limit (matmul + top-k)",
        "app.commands.bench:cmd_bench_kernels",
        "workbench.bench_kernels:KernelBenchConfig",
        (_ROWS_JSON,),
    ),
    Command(
        "bench sae",
        "planted-feature recovery (MCC, recovered@0.9, dead, absorption) per architecture, scenario and seed",
        "app.commands.bench:cmd_bench_sae",
        "sae.bench_config:SaeBenchConfig",
        (_ROWS_JSON,),
    ),
    Command(
        "bench analyze",
        "feature-store build throughput (x the encode alone) and feature-page read latency",
        "app.commands.bench:cmd_bench_analyze",
        "sae.bench_analyze:AnalyzeBenchConfig",
        (_ROWS_JSON,),
    ),
    Command(
        "bench codebook",
        "codebook features vs TokFSM ground truth: per-state precision/recall",
        "app.commands.bench:cmd_bench_codebook",
        "sae.tokfsm:CodebookBenchConfig",
        (_flag("--json", action="store_true", help="one JSON object (with per-state rows)"),),
    ),
    Command(
        "bench explore",
        "explorer speed: page loads in headless Chromium, store queries at 16k features, steering",
        "app.commands.bench:cmd_bench_explore",
        "app.bench_explore:ExploreBenchConfig",
        (_ROWS_JSON,),
    ),
    Command(
        "bench graphs",
        "attribution graphs (demo model): seconds per 64-token graph, graph-vs-ablation rank correlation",
        "app.commands.bench:cmd_bench_graphs",
        "circuits.bench_graphs:GraphBenchConfig",
        (_ROWS_JSON,),
    ),
)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="workbench", description="Interpretability workbench: cache, train, analyze, explore."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    groups = {}
    for spec in COMMANDS:
        group, _, name = spec.name.rpartition(" ")
        if group and group not in groups:
            text, dest, metavar = _GROUPS[group]
            groups[group] = commands.add_parser(group, help=text).add_subparsers(
                dest=dest, required=True, parser_class=_Parser, metavar=metavar
            )
        command = (groups[group] if group else commands).add_parser(name, help=spec.help)
        if spec.config:
            add_config_arguments(command, _named(spec.config))
        for names, options in spec.flags:
            command.add_argument(*names, **options)
        command.set_defaults(handler=spec.run)
    return parser


def _named(path: str):
    """The object a "module:name" string names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _named(args.handler)(args)
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
        print(
            "interrupted (`workbench cache` and `workbench train` resume when rerun with the same flags)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
