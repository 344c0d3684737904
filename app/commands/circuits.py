"""`workbench circuits`: discover a circuit (or a feature circuit of dictionaries), score it, save
its JSON with the `CircuitConfig` that made it; or, with `--benchmark`, every method on the
ground-truth tasks; or, with `--transcoders`, the attribution graph of a prompt (`circuits.graphs`)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from app.commands.output import nan_to_none, print_rows, print_summary
from app.flags import config_from_args
from workbench.errors import WorkbenchError
from workbench.files import write_json_atomic


def cmd_circuits(args) -> None:
    from circuits.config import CircuitConfig
    from workbench.devices import resolve_device

    config = config_from_args(CircuitConfig, args)
    device = resolve_device(config.device)  # before any model loads: `--device cuda` fails here
    if args.benchmark is not None:
        return _benchmark(config, args, device)
    if config.transcoders:
        return _attribution_graph(config, args, device)
    from circuits.real_tasks import REAL_TASKS

    if config.task in REAL_TASKS and not config.dictionary:
        return _head_circuit(config, args, device)
    if config.dictionary:
        return _feature_circuit(config, args, device)
    from circuits.catalog import GROUND_TRUTH_TASKS
    from circuits.discover import discover, to_circuit
    from circuits.evaluate import faithfulness_all

    if "," in config.method:
        raise WorkbenchError(f"--method {config.method}: one method per circuit (a list is for --benchmark)")
    config = dataclasses.replace(config, method=config.method or "eap-ig")
    graph, task, language_model = _graph_and_task(config, device)
    if graph is None:  # not a GPT-2-architecture model: its heads and MLPs, through its hooks
        return _head_circuit(config, args, device, loaded=(language_model, task))
    found = discover(
        graph,
        task,
        config.method,
        ablation=config.ablation,
        steps=config.steps,
        n_edges=config.edges,
        faithfulness_target=config.faithfulness,
    )
    faithful = faithfulness_all(graph, task, found.mask(graph))
    planted = config.task in GROUND_TRUTH_TASKS
    model_name = "built-in" if planted else config.model or "demo"
    metrics = {
        "faithfulness": faithful,
        **_ground_truth_scores(graph, task, found),
        "edges_kept": int(found.kept.sum()),
        "edges": len(found.scores),
        "model": model_name,
        "ablation": config.ablation,
        "seconds": round(found.seconds, 2),
        **_size_search(config, found),
    }
    circuit = to_circuit(graph, task, found, metrics=metrics)
    circuit.prompts = prompts_json(task, language_model)
    out = _save_circuit(circuit, config, args.out, "" if planted else model_name, task.name, config.method)
    top = sorted(circuit.edges, key=lambda e: -abs(e.score))[: args.top]
    if args.json:
        print(
            json.dumps(
                {
                    "circuit": str(out),
                    "method": config.method,
                    "edges_kept": int(found.kept.sum()),
                    "faithfulness": faithful,
                    **_size_search(config, found),
                    "seconds": round(found.seconds, 2),
                    "top_edges": [e.__dict__ for e in top],
                }
            )
        )
        return
    print_rows(
        [{"source": e.source, "target": e.target, "input": e.input, "score": round(e.score, 5)} for e in top],
        False,
    )
    print_summary(
        {
            "circuit": str(out),
            "edges_kept": int(found.kept.sum()),
            "of_edges": len(circuit.edges),
            "chosen_by": _chosen_by(config, found, config.ablation),
            **{f"faithfulness_{k}": round(v, 4) for k, v in faithful.items()},
            **{k: round(metrics[k], 4) for k in ("roc_auc", "head_roc_auc") if k in metrics},
            "seconds": round(found.seconds, 2),
        },
        False,
    )


def _size_search(config, found) -> dict:
    """How the circuit's size was chosen, for its metrics: the faithfulness target and the curve
    of (edges kept, faithfulness under the config's ablation) the search evaluated; {} for --edges."""
    if config.edges:
        return {}
    return {
        "faithfulness_target": config.faithfulness,
        "faithfulness_curve": [[int(k), round(float(f), 6)] for k, f in found.curve],
    }


def _chosen_by(config, found, ablation: str, unit: str = "") -> str:
    """How the circuit's size was chosen, for the printout: `--edges N` (with what N counts when
    `unit` is given), or the faithfulness target under `ablation` and how many sizes were tried."""
    if config.edges:
        return f"--edges {config.edges}" + (f" ({unit})" if unit else "")
    return (
        f"smallest reaching faithfulness {config.faithfulness} ({ablation}), {len(found.curve)} sizes tried"
    )


def _graph_and_task(config, device):
    """(graph model, task, the language model or None) of `config` on `device`: what
    `circuits.catalog.load_task` builds, with the loaded model kept (its tokenizer shows the
    prompts); the ground-truth tasks (hand-set models, no tokenizer) and unknown task names
    (its one-line refusal) go through load_task itself. The graph is None for a model that is
    not GPT-2-architecture (the edge graph cannot be built; the caller goes to head level)."""
    from circuits.catalog import GROUND_TRUTH_TASKS, is_gpt2, load_task, model_task
    from circuits.transformer import from_gpt2
    from workbench.models import load_model

    task = config.task
    if task in GROUND_TRUTH_TASKS or not (task == "induction" or task.endswith(".json")):
        graph, built = load_task(
            task, config.model, config.prompts, config.length, config.seed, device, config.model_dtype
        )
        return graph, built, None
    model = load_model(config.model or "demo", device=device, dtype=config.model_dtype)
    built = model_task(task, model, config.prompts, config.length, config.seed)
    return (from_gpt2(model) if is_gpt2(model) else None), built, model


def _ground_truth_scores(graph, task, found) -> dict:
    """ROC AUC of the edge (and head) scores against a task's planted circuit, as the benchmark
    scores them; {} for tasks without ground truth."""
    from circuits.attribution import node_scores
    from circuits.evaluate import roc_auc

    truth, scores = task.ground_truth, {}
    if truth.get("edges"):
        edges = dict(zip(graph.graph.edge_names, found.scores.tolist()))
        scores["roc_auc"] = roc_auc(edges, set(truth["edges"]))
    if truth.get("heads"):
        heads = found.heads or {
            k: v for k, v in node_scores(graph, found.scores).items() if k.startswith("a")
        }
        scores["head_roc_auc"] = roc_auc(heads, set(truth["heads"]))
    return scores


SHOWN_PROMPTS = 8
"""Prompts (clean and corrupted) written into a circuit JSON for the reader; the task may hold more."""


def prompts_json(task, model=None) -> dict:
    """The first SHOWN_PROMPTS clean and corrupted prompts of `task` as text (decoded by
    `model`'s tokenizer, special tokens kept; token ids joined by spaces without a model, as for
    the hand-set ground-truth models), and the task's prompt count."""

    def text(row) -> str:
        ids = [int(t) for t in row.tolist()]
        return model.tokenizer.decode(ids) if model is not None else " ".join(map(str, ids))

    shown = slice(0, SHOWN_PROMPTS)
    return {
        "clean": [text(row) for row in task.clean[shown]],
        "corrupted": [text(row) for row in task.corrupted[shown]],
        "total": int(task.clean.shape[0]),
    }


def _feature_circuit(config, args, device) -> None:
    from circuits.catalog import model_task
    from circuits.features import feature_circuit
    from sae.io import load
    from workbench.models import load_model
    from workbench.store import STORE_FILE

    dictionaries, stores = {}, {}
    for folder in map(Path, config.dictionary):
        dictionary = load(folder)
        hook = dictionary.meta.get("hook")
        if not hook or hook in dictionaries:
            problem = "records no hook" if not hook else f"a second dictionary for hook {hook}"
            raise WorkbenchError(f"{folder}: {problem}")
        dictionaries[hook] = dictionary
        if (folder / STORE_FILE).exists():
            stores[hook] = str((folder / STORE_FILE).absolute())  # the JSON reads from anywhere
    spec = config.model or next(iter(dictionaries.values())).meta.get("model") or "demo"
    model = load_model(spec, device=device, dtype=config.model_dtype)
    for hook, dictionary in dictionaries.items():
        if model.width(hook) != dictionary.d_in:
            raise WorkbenchError(
                f"dictionary for {hook} reads {dictionary.d_in} dims; {spec} has {model.width(hook)} there"
            )
        dictionary.to(model.device)  # in place (a Module): the latents are computed where the model runs
    task = model_task(config.task, model, config.prompts, config.length, config.seed)
    started = time.perf_counter()
    circuit = feature_circuit(
        model, task, dictionaries, steps=config.steps, per_hook=config.features_per_hook, stores=stores
    )
    circuit.metrics.update(model=spec, seconds=round(time.perf_counter() - started, 2))
    circuit.prompts = prompts_json(task, model)
    out = _save_circuit(circuit, config, args.out, spec, task.name, "features")
    top = sorted((n for n in circuit.nodes if n.kind != "logits"), key=lambda n: -abs(n.score))[: args.top]
    rows = [{"node": n.id, "kind": n.kind, "effect": round(n.score, 5)} for n in top]
    if args.json:
        print(json.dumps({"circuit": str(out), "method": circuit.method, "nodes": rows, **circuit.metrics}))
        return
    print_rows(rows, False)
    print_summary({"circuit": str(out), "seconds": circuit.metrics["seconds"]}, False)


def _save_circuit(circuit, config, out: str, model: str, task: str, method: str) -> Path:
    """Save with `config` to `out`, or runs/circuits/<model>-<task>-<method>.circuit.json (no model
    part for built-in models)."""
    from circuits.config import config_json

    name = (Path(model).name if Path(model).exists() else model) + "-" if model else ""
    path = Path(out or f"runs/circuits/{name}{task}-{method}.circuit.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    circuit.config = config_json(config)
    circuit.save(path)
    return path


def _benchmark(config, args, device) -> None:
    """Every method (or `--method a,b`) on `--benchmark` tasks (names apart or comma-joined),
    `config.prompts` prompts each, on `device` (the ground-truth models are built on the CPU,
    then moved); real-model tasks on `--model` at head level."""
    from circuits.benchmark import run_benchmark
    from circuits.config import METHODS

    methods = tuple(config.method.split(",")) if config.method else METHODS
    names = [name for arg in args.benchmark for name in arg.split(",") if name]
    table = []
    rows = run_benchmark(
        names or None,
        methods,
        prompts=config.prompts,
        device=device,
        dtype=config.model_dtype,
        model_spec=config.model,
        length=config.length,
    )
    for row in rows:
        if args.json:
            print(json.dumps(nan_to_none(row)), flush=True)
            continue
        flat = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k != "faithfulness"}
        flat.update({f"faithful_{k}": round(v, 3) for k, v in row.get("faithfulness", {}).items()})
        table.append(flat)
    if table:
        print_rows(table, False)


def _head_circuit(config, args, device, loaded=None) -> None:
    """A real-model task at head level (circuits.heads): nodes are heads and MLPs, the circuit
    the smallest prefix of the method's ranking reaching --faithfulness (--edges N: the N best
    nodes); saved as a circuit JSON with the task's check (clean metric, accuracy). `loaded`:
    the (model, task) already built (induction or a task file on a non-GPT-2 model)."""
    from circuits.catalog import load_head_task
    from circuits.heads import Patcher, discover_heads, head_circuit, label
    from circuits.real_tasks import check_task

    method = config.method or "eap-ig"
    if "," in method:
        raise WorkbenchError(f"--method {method}: one method per circuit (a list is for --benchmark)")
    if config.ablation != "resample":
        raise WorkbenchError(
            f"--ablation {config.ablation}: head-level circuits (this task or model) "
            "use resample ablation only"
        )
    model_name = config.model or "demo"
    model, task = loaded or load_head_task(
        config.task, config.model, config.prompts, config.length, config.seed, device, config.model_dtype
    )
    check = check_task(model, task)
    if not check.does_task:  # the benchmark drops such a task; one circuit is still written, flagged
        print(
            f"warning: {model_name} does not do {task.name} ({check.why_not()}); its circuit explains little",
            file=sys.stderr,
        )
    patcher = Patcher(model, task)
    found = discover_heads(
        patcher,
        method,
        steps=config.steps,
        target=config.faithfulness,
        seed=config.seed,
        n_nodes=config.edges,
    )
    metrics = {
        "faithfulness": {"resample": found.faithfulness},
        "nodes_kept": len(found.kept),
        "nodes": len(found.scores),
        "clean_metric": check.metric,
        "corrupted_metric": check.corrupted,
        "accuracy": check.accuracy,
        "model": model_name,
        "ablation": "resample",
        "level": "head",
        "seconds": round(found.seconds, 2),
        "does_task": check.does_task,
        **_size_search(config, found),
    }
    circuit = head_circuit(patcher, found, metrics)
    circuit.prompts = prompts_json(task, model)
    out = _save_circuit(
        circuit, dataclasses.replace(config, method=method), args.out, model_name, task.name, method
    )
    top = sorted(found.scores.items(), key=lambda kv: -abs(kv[1]))[: args.top]
    rows = [{"node": label(n), "id": n, "score": round(v, 5), "in_circuit": n in found.kept} for n, v in top]
    summary = {
        "circuit": str(out),
        "nodes_kept": len(found.kept),
        "of_nodes": len(found.scores),
        "chosen_by": _chosen_by(
            config, found, "resample", "nodes; codes: heads, every MLP kept" if method == "codes" else "nodes"
        ),
        "faithfulness_resample": round(found.faithfulness, 4),
        "clean_metric": round(check.metric, 4),
        "corrupted_metric": round(check.corrupted, 4),
        "accuracy": round(check.accuracy, 3),
        "seconds": round(found.seconds, 2),
    }
    if args.json:
        print(
            json.dumps(
                nan_to_none({**summary, **_size_search(config, found), "method": method, "top_nodes": rows})
            )
        )
        return
    print_rows(rows, False)
    print_summary(summary, False)


# --- attribution graphs (--transcoders) ----------------------------------------------------------


def _attribution_graph(config, args, device) -> None:
    """The attribution graph of --prompt through --transcoders (`circuits.graphs`), saved as a
    circuit JSON (kind "attribution-graph") with its config; prints its strongest nodes,
    completeness and seconds."""
    from circuits.catalog import is_gpt2
    from circuits.config import config_json
    from workbench.models import load_model

    if not config.prompt:
        raise WorkbenchError("--transcoders draws the attribution graph of a --prompt TEXT; none given")
    if config.dictionary:
        raise WorkbenchError("--transcoders and --dictionary make different circuits: give one of them")
    loaded = _graphs().load_transcoders(config.transcoders)
    spec = config.model or loaded[0][1].meta.get("model") or "demo"
    model = load_model(spec, device=device, dtype=config.model_dtype)
    if not is_gpt2(model):
        raise WorkbenchError(
            f"attribution graphs need a GPT-2-architecture model; {spec} is "
            f"{getattr(model.bridge.original_model.config, 'model_type', '?')}"
        )
    info = check_transcoders(model, loaded)
    target = _graphs().parse_target(model, config.target, "--target") if config.target else None
    transcoders = [
        d.to(model.device) for _, d in sorted(loaded, key=lambda fd: _graphs().transcoder_layer(fd[1]))
    ]
    graph = _graphs().attribution_graph(
        model,
        transcoders,
        config.prompt,
        targets=None if target is None else [target],
        node_threshold=config.node_threshold,
        edge_threshold=config.edge_threshold,
        transcoder_info=info,
    )
    data = dict(graph.to_json())
    data["config"] = config_json(config)
    out = Path(args.out or default_graph_path(spec, config.prompt, config.target, config.transcoders))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, data)
    _print_graph(data, out, args)


def _graphs():
    """`circuits.graphs` (a function, so tests can stand a fake in)."""
    import circuits.graphs

    return circuits.graphs


def check_transcoders(model, loaded) -> list[dict]:
    """The graph JSON's "transcoders" entries (layer, path, hooks, feature store when built) of
    [(folder, transcoder)], after one-line errors for a transcoder that does not read an MLP input
    of `model` and write that MLP's output, reads another width, or shares its layer."""
    from circuits.graphs import mlp_hooks, transcoder_layer
    from workbench.store import STORE_FILE

    info, seen = [], {}
    for folder, dictionary in loaded:
        hook, out_hook, layer = (
            dictionary.meta.get("hook"),
            dictionary.meta.get("out_hook"),
            transcoder_layer(dictionary),
        )
        if not 0 <= layer < model.n_layers or hook != mlp_hooks(model, layer)[0]:
            wanted = ", ".join(mlp_hooks(model, i)[0] for i in range(min(model.n_layers, 2)))
            raise WorkbenchError(
                f"{folder}: reads {hook!r}, which is no MLP input of {model.spec} (those are {wanted}, ...)"
            )
        if out_hook != mlp_hooks(model, layer)[1]:
            raise WorkbenchError(
                f"{folder}: writes {out_hook!r}; layer {layer}'s MLP writes {mlp_hooks(model, layer)[1]}"
            )
        if dictionary.d_in != model.width(hook):
            raise WorkbenchError(f"{folder}: reads {dictionary.d_in} dims; {hook} has {model.width(hook)}")
        if layer in seen:
            raise WorkbenchError(f"two transcoders for layer {layer}: {seen[layer]} and {folder}")
        seen[layer] = folder
        store = folder / STORE_FILE
        info.append(
            {
                "layer": layer,
                "path": str(folder.absolute()),
                "hook": hook,
                "out_hook": out_hook,
                "store": str(store.absolute()) if store.exists() else None,
            }
        )
    return sorted(info, key=lambda entry: entry["layer"])


def default_graph_path(model: str, prompt: str, target: str, transcoders: Sequence[str] = ()) -> Path:
    """runs/circuits/<model>-graph-<the prompt's first words>-<hash>.circuit.json, the hash of the
    prompt, the target and the transcoders' absolute paths (the same prompt traced through other
    transcoders is another file, not an overwrite)."""
    import hashlib

    name = Path(model).name if Path(model).exists() else model
    words = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:32].strip("-") or "prompt"
    used = "\0".join(str(Path(t).expanduser().absolute()) for t in transcoders)
    digest = hashlib.sha1(f"{prompt}\0{target}\0{used}".encode()).hexdigest()[:8]
    return Path(f"runs/circuits/{name}-graph-{words}-{digest}.circuit.json")


def _print_graph(data: dict, out: Path, args) -> None:
    strings = data.get("token_strings") or []
    ranked = sorted(
        (n for n in data["nodes"] if n["type"] in ("feature", "error")), key=lambda n: n["influence"]
    )
    rows = [
        {
            "node": n["id"],
            "type": n["type"],
            "layer": n["layer"],
            "token": repr(strings[n["position"]]) if n["position"] < len(strings) else n["position"],
            "activation": round(n.get("activation") or 0.0, 4),
            "influence": round(n["influence"], 4),
        }
        for n in ranked[: args.top]
    ]
    metrics, targets = data.get("metrics", {}), data.get("targets", [])
    shown = ", ".join(f"{t['token_string']!r} p={t['probability']:.3f}" for t in targets[:3])
    summary = {
        "graph": str(out),
        "targets": shown + (f" and {len(targets) - 3} more" if len(targets) > 3 else ""),
        "nodes": len(data["nodes"]),
        "edges": len(data["edges"]),
        **{k: round(metrics[k], 4) for k in ("completeness", "replacement_score") if k in metrics},
        "seconds": metrics.get("seconds"),
    }
    if args.json:
        print(json.dumps(nan_to_none({**summary, "top_nodes": rows})))
        return
    print_rows(rows, False)
    print_summary(summary, False)
