"""`workbench bench graphs`: attribution-graph speed and graph-vs-reality on the demo model.

Speed: one graph for a `prompt_tokens`-token prompt (tiny-shakespeare text) on the demo model with
one TopK transcoder per layer of `n_latents` latents and `k` active, untrained (seeded random
weights: a TopK encoder fires exactly k latents per token whatever its weights, so the active
counts, hence the work, are those of trained ones), timed `reps` times after one warm-up
(wall seconds, and the process's CPU seconds, which other jobs on a shared machine inflate less).
Reality: for every prompt and transcoder set (the demo transcoders trained with each seed, skip
transcoders unless `skip` is off, and the model's own MLP neurons as TopK transcoders), the
graph's 10 most influential features are ablated in the unfrozen model
(`circuits.graph_checks.feature_ablation`) and the change of the top logit is rank-correlated
(Spearman) with the graph's predictions: the direct edge, the total effect through the graph, that
plus the final LayerNorm's first-order response, and the frozen replacement model's ablation with
the real final LayerNorm ("replacement").
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.errors import ConfigError

PROMPTS = (
    "The king said unto the people, and the",
    "ROMEO: I will not go to the",
    "And God said, Let there be light: and there was",
    "JULIET: O Romeo, Romeo! wherefore art thou",
    "In the beginning God created the heaven and the",
)


@dataclass(frozen=True)
class GraphBenchConfig:
    """What `workbench bench graphs` measures (its flags derive from it)."""

    prompt_tokens: int = 64
    """Tokens of the timed prompt (BOS included)."""
    n_latents: int = 4096
    """Latents per transcoder in the timed graph."""
    k: int = 32
    """TopK's active latents per token in the timed graph."""
    reps: int = 3
    """Timed graphs (after one warm-up)."""
    threads: int = 1
    """torch threads."""
    seeds: tuple[int, ...] = (0, 1)
    """Seeds of the trained demo transcoders for the graph-vs-reality part (none: skip it)."""
    skip: bool = True
    """Train those transcoders with a linear skip connection (skip transcoders, Paulo et al. 2025;
    `DemoTranscoderSettings.skip`): it carries the MLP's linear response, which the graph's
    constant error node misses (Spearman "total + norm" 0.53 -> 0.80 over seeds 0-4; README)."""
    transcoders: str = ""
    """Folder to keep the trained demo transcoders in (one subfolder per seed); empty: the user
    cache ($WORKBENCH_HOME or ~/.cache/workbench)/bench-graphs."""

    def __post_init__(self):
        if (
            min(self.prompt_tokens, self.n_latents, self.k, self.reps, self.threads) < 1
            or self.k > self.n_latents
        ):
            raise ConfigError(
                "prompt_tokens, n_latents, k, reps and threads must be positive, k <= n_latents"
            )


def run_graph_benchmark(config: GraphBenchConfig, say=lambda line: None) -> list[dict]:
    """Rows: one "speed" row, then one "reality" row per transcoder set and prompt, then means."""
    from workbench.models import load_model

    torch.set_num_threads(config.threads)
    model = load_model("demo")
    rows = [_speed(model, config)]
    say(f"speed: {rows[0]}")
    if config.seeds:
        rows += _reality(model, config, say)
    return rows


def _speed(model, config: GraphBenchConfig) -> dict:
    from circuits.graphs import attribution_graph
    from sae.base import create
    from sae.config import DictionaryConfig
    from workbench.corpus import iter_documents

    text = next(iter(iter_documents("tiny-shakespeare"))).text
    tokens = model.tokenize(text)[0][: config.prompt_tokens]
    transcoders = []
    for layer in range(model.n_layers):
        dictionary_config = DictionaryConfig(
            architecture="topk",
            d_in=model.d_model,
            n_latents=config.n_latents,
            k=config.k,
            d_out=model.d_model,
        )
        d = create(dictionary_config, seed=layer, salt="bench-graphs")
        d.meta = {"hook": f"blocks.{layer}.ln2.hook_normalized", "out_hook": f"blocks.{layer}.hook_mlp_out"}
        transcoders.append(d.eval())
    attribution_graph(model, transcoders, tokens)  # warm-up
    seconds, cpu, graph = [], [], None
    for _ in range(config.reps):
        started, started_cpu = time.perf_counter(), time.process_time()
        graph = attribution_graph(model, transcoders, tokens)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    data = graph.to_json()
    return {
        "part": "speed",
        "prompt_tokens": int(len(tokens)),
        "transcoders": f"{model.n_layers} x topk {config.n_latents} k {config.k} (untrained)",
        "features": int(graph.attribution.nodes.n_features),
        "edges_stored": data["pruning"]["edges_before"],
        "nodes_kept": len(data["nodes"]),
        "edges_kept": len(data["edges"]),
        "seconds_median": round(statistics.median(seconds), 2),
        "seconds_min": round(min(seconds), 2),
        "cpu_seconds_median": round(statistics.median(cpu), 2),
        "threads": config.threads,
        "load_1min": round(os.getloadavg()[0], 2),
        "completeness_gap": data["metrics"]["completeness_gap"],
    }


def _reality(model, config: GraphBenchConfig, say) -> list[dict]:
    from circuits.demo_transcoders import demo_transcoders, neuron_transcoders
    from circuits.transformer import from_gpt2
    from workbench.paths import user_cache_dir

    root = Path(config.transcoders) if config.transcoders else user_cache_dir() / "bench-graphs"
    kind = " skip" if config.skip else ""
    sets = {
        f"trained{kind} seed {seed}": demo_transcoders(
            root / f"seed{seed}{kind.replace(' ', '-')}", model=model, seed=seed, skip=config.skip
        )
        for seed in config.seeds
    }
    neurons = neuron_transcoders(from_gpt2(model), k=32)
    sets["mlp neurons k 32"] = [neurons[layer] for layer in sorted(neurons)]
    rows = []
    for name, transcoders in sets.items():
        per_set = []
        for prompt in PROMPTS:
            row = {"part": "reality", "transcoders": name, **_one_prompt(model, transcoders, prompt)}
            say(str(row))
            per_set.append(row)
        keys = [k for k in per_set[0] if k.startswith("spearman") or k.startswith("sign")]
        mean = {k: round(statistics.mean(r[k] for r in per_set), 3) for k in keys}
        rows += per_set + [{"part": "reality", "transcoders": name, "prompt": "mean", **mean}]
    return rows


def _one_prompt(model, transcoders, prompt: str) -> dict:
    from circuits.graph_checks import feature_ablation, predicted_effects, replacement_ablation, spearman
    from circuits.graphs import attribution_graph

    graph = attribution_graph(model, transcoders, prompt)
    att, system = graph.attribution, graph.system
    nodes, row = att.nodes, att.nodes.logit_start
    top = graph.pruned.influence[: nodes.n_features].topk(min(10, nodes.n_features)).indices
    token = int(nodes.targets[0])
    actual = torch.tensor([feature_ablation(system, *nodes.features[i].tolist(), token) for i in top])
    out = {"prompt": prompt, "target": graph.to_json()["targets"][0]["token_string"]}
    for kind in ("direct", "total", "total+norm"):
        predicted = predicted_effects(att, row, kind, system)[top].to(actual.dtype)
        out[f"spearman_{kind}"] = round(spearman(predicted, actual), 3)
        out[f"sign_{kind}"] = round(float((predicted.sign() == actual.sign()).float().mean()), 2)
    predicted = torch.tensor([replacement_ablation(system, *nodes.features[i].tolist(), token) for i in top])
    out["spearman_replacement"] = round(spearman(predicted.to(actual.dtype), actual), 3)
    out["sign_replacement"] = round(float((predicted.sign() == actual.sign()).float().mean()), 2)
    out["replacement_score"] = round(graph.to_json()["metrics"]["replacement_score"], 3)
    return out
