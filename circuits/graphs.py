"""Attribution graphs: a prompt's computation traced through transcoder features, locally.

`attribution_graph(model, transcoders, prompt)` builds the prompt's local replacement model
(`circuits.replacement`: MLPs -> transcoder features + error nodes; attention patterns and
LayerNorm scales frozen, so it reproduces the logits exactly), computes every direct-effect edge
between active features, error nodes, token embeddings and the target logits by batched
back-propagation through that frozen linear system (`circuits.graph_edges`), prunes it as
circuit-tracer does (`circuits.graph_prune`) and returns an `AttributionGraph` whose `to_json()`
is the "attribution-graph" circuit file (format below). Method: Ameisen et al. 2025, "Circuit
Tracing: Revealing Computational Graphs in Language Models" (transformer-circuits.pub);
Dunefsky et al. 2024, "Transcoders find interpretable LLM feature circuits" (arXiv:2406.11944).

JSON (format_version 1): model, prompt, tokens, token_strings, transcoders [{layer, path, hook,
out_hook, store}], targets [{token, token_string, probability, logit}], nodes [{id, type, layer,
position, feature, activation, influence, share, label}], edges [{source, target, weight}], pruning, metrics.
Node ids: "f.L.P.I" feature, "e.L.P" error, "t.P" embedding, "l.TOKEN" logit. A node's
"influence" is its cumulative influence share (circuit-tracer's convention): nodes sorted by
influence on the targets, the running sum over the total; a threshold τ keeps the nodes whose
share is at most the first share ≥ τ (embeddings and logits are always kept); "share" is the
node's own influence over the total (0 for logits). "activation" is
a for a feature, ‖err‖ for an error, ‖embedding‖ for a token, the logit for a logit.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from circuits.graph_checks import ablate_feature_effect  # noqa: F401  (part of this module's API)
from circuits.graph_edges import Attribution, attribute
from circuits.graph_prune import Pruned, graph_scores, prune
from circuits.replacement import FrozenSystem
from circuits.transformer import GraphTransformer, from_gpt2
from workbench.errors import WorkbenchError
from workbench.files import write_json_atomic

FORMAT_VERSION = 1


@dataclass
class AttributionGraph:
    """A graph's JSON (`data`) and, when just computed, the unpruned attribution behind it."""

    data: dict
    attribution: Attribution | None = field(default=None, repr=False)
    system: FrozenSystem | None = field(default=None, repr=False)
    pruned: Pruned | None = field(default=None, repr=False)
    _model: object | None = field(default=None, repr=False)  # the caller's model (its tokenizer)

    def to_json(self) -> dict:
        return self.data

    def predicted_effect(self, node_id: str, kind: str = "total+norm", target=None) -> float:
        """The graph's predicted change of a target logit when feature `node_id` ("f.L.P.I") is
        ablated (its write a W_dec removed): `graph_checks.predicted_effects` of that feature.
        kind: "direct" (−edge), "total" (through the graph's (I − A)^-1) or "total+norm" (plus
        the final LayerNorm's first-order response); target: a token id or token string among
        the graph's targets (None: the first). Compare with `ablate_feature_effect`. One-line
        WorkbenchError for a graph read from a file (no attribution), a node that is not an
        active feature of this graph, a token that is not a target, another kind."""
        from circuits.graph_checks import predicted_effects

        if self.attribution is None or self.system is None:
            raise WorkbenchError(
                "predicted_effect needs a graph just computed by attribution_graph, not a loaded file"
            )
        if kind not in ("direct", "total", "total+norm"):
            raise WorkbenchError(f"kind must be 'direct', 'total' or 'total+norm', got {kind!r}")
        nodes = self.attribution.nodes
        match = re.fullmatch(r"f\.(\d+)\.(\d+)\.(\d+)", str(node_id))
        hits = (
            (nodes.features == torch.tensor([int(g) for g in match.groups()])).all(1).nonzero().flatten()
            if match
            else []
        )
        if len(hits) == 0:
            raise WorkbenchError(
                f"{node_id!r} is no active feature node of this graph (ids are f.LAYER.POSITION.FEATURE)"
            )
        targets = [int(t) for t in nodes.targets]
        token = targets[0] if target is None else target
        if isinstance(token, str):
            token = parse_target(self._model, token)
        if int(token) not in targets:
            raise WorkbenchError(f"token {token} is not among this graph's targets {targets}")
        row = nodes.logit_start + targets.index(int(token))
        effects = predicted_effects(self.attribution, row, kind, self.system)
        return float(effects[int(hits[0])])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.data)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttributionGraph":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise WorkbenchError(f"cannot read attribution graph {path}: {error}") from None
        if data.get("kind") != "attribution-graph":
            raise WorkbenchError(f"{path} is not an attribution graph (kind {data.get('kind')!r})")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise WorkbenchError(
                f"{path}: format_version {data['format_version']} is newer than this workbench's"
            )
        return cls(data)


# --- inputs ------------------------------------------------------------------------------
def graph_model(model) -> GraphTransformer:
    """The GraphTransformer of a workbench Model (GPT-2 architecture) or the model itself."""
    if isinstance(model, GraphTransformer):
        return model
    if not hasattr(model, "bridge"):
        raise WorkbenchError(
            f"attribution graphs need a workbench Model or a GraphTransformer, not {type(model).__name__}"
        )
    return from_gpt2(model)


def transcoder_layers(model, transcoders) -> dict[int, object]:
    """{layer: Dictionary}: a dict as given (GraphTransformer), else read off each `meta["hook"]`,
    which must be the layer's MLP input hook."""
    if isinstance(transcoders, dict):
        return dict(transcoders)
    layers: dict[int, object] = {}
    for d in transcoders:
        hook = (getattr(d, "meta", None) or {}).get("hook", "")
        layer = transcoder_layer(d)
        if layer < 0:
            raise WorkbenchError(f"a transcoder must name its input hook (meta['hook']), got {hook!r}")
        wanted = mlp_hooks(model, layer)[0]
        if hook != wanted:
            raise WorkbenchError(f"transcoder reads {hook!r}; layer {layer}'s MLP input is {wanted!r}")
        out_hook, wanted_out = d.meta.get("out_hook"), mlp_hooks(model, layer)[1]
        if out_hook is not None and out_hook != wanted_out:
            raise WorkbenchError(
                f"transcoder writes {out_hook!r}; layer {layer}'s MLP output is {wanted_out!r}"
            )
        if layer in layers:
            raise WorkbenchError(f"two transcoders for layer {layer}")
        trained = d.meta.get("model")
        if trained and hasattr(model, "names_this_model") and not model.names_this_model(str(trained)):
            raise WorkbenchError(f"{_named(d, layer)} was trained on model {trained!r}, not {model.spec!r}")
        layers[layer] = d
    return layers


def _named(d, layer: int) -> str:
    """How an error names a transcoder: its layer and, when known, its folder."""
    path = (getattr(d, "meta", None) or {}).get("path") or (getattr(d, "meta", None) or {}).get("folder")
    return f"the transcoder of layer {layer}" + (f" ({path})" if path else "")


def check_finite(graph: GraphTransformer, layers: dict[int, object]) -> None:
    """One-line WorkbenchError naming the first transcoder tensor (parameter or buffer: W_enc,
    threshold, ...) or model weight holding NaN or Inf: those would otherwise surface as a
    cycle in the influence solve or a NaN graph."""
    named = [(_named(d, layer), d) for layer, d in sorted(layers.items())] + [("the model", graph)]
    for owner, module in named:
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        tensors += [(k, v) for k, v in vars(module).items() if isinstance(v, Tensor)]
        for name, tensor in tensors:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise WorkbenchError(
                    f"{owner}: {name} {tuple(tensor.shape)} has {bad} non-finite (NaN/Inf) entries"
                )


def mlp_hooks(model, layer: int) -> tuple[str, str]:
    """(in, out) hooks of a layer's MLP: the model adapter's, else GPT-2's."""
    if hasattr(model, "mlp_hooks"):
        return tuple(model.mlp_hooks(layer))
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


_GPT2_DEFAULTS = {  # GPT-2 config fields GraphTransformer (circuits.transformer.from_gpt2) assumes
    "activation_function": "gelu_new",
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
}


def check_reproduces(model, system: FrozenSystem) -> None:
    """For a workbench Model: one real forward of the prompt, whose logits the graph's
    GraphTransformer copy must reproduce (to 1e-3 of the largest logit; 5e-2 in half precision),
    else a one-line WorkbenchError naming the config fields from_gpt2 does not model: a GPT-2
    variant (another activation, scaled attention) would otherwise get the graph of another model."""
    if not hasattr(model, "bridge"):
        return
    clean = system.clean.logits
    with torch.no_grad():
        real = model(system.clean.tokens[None])[0].to(clean.device, clean.dtype)
    gap, scale = float((clean - real).abs().max()), max(1.0, float(real.abs().max()))
    tol = 1e-3 if getattr(model, "dtype", torch.float32) in (torch.float32, torch.float64) else 5e-2
    if gap <= tol * scale:
        return
    config = getattr(getattr(model.bridge, "original_model", None), "config", None)
    odd = [
        f"{k}={getattr(config, k)!r}"
        for k, v in _GPT2_DEFAULTS.items()
        if config is not None and hasattr(config, k) and getattr(config, k) != v
    ]
    raise WorkbenchError(
        f"the graph's copy of {getattr(model, 'spec', 'the model')} does not reproduce its logits "
        f"(max |difference| {gap:.3g} of {scale:.3g}): "
        + (f"this GPT-2 variant ({', '.join(odd)}) is not supported" if odd else "unsupported weights")
    )


def prompt_tokens(model, prompt) -> tuple[Tensor, list[str], str]:
    """(ids [P], token strings, prompt text) of a str (tokenized with BOS) or 1-D id tensor.
    WorkbenchError (one line) for a prompt longer than the model's n_ctx (`Model.tokenize`
    truncates silently: the graph would explain another position), an empty or batched tensor."""
    if isinstance(prompt, str):
        if not hasattr(model, "tokenize"):
            raise WorkbenchError("a GraphTransformer takes the prompt as a 1-D tensor of token ids")
        tokens = model.tokenize(prompt)[0].cpu()
        n_ctx = getattr(model, "n_ctx", None)
        if n_ctx is not None and len(tokens) >= n_ctx and hasattr(model, "bridge"):
            full = model.bridge.to_tokens(prompt, prepend_bos=True, truncate=False).shape[-1]
            if full > n_ctx:
                raise WorkbenchError(
                    f"the prompt is {full} tokens (BOS included); the model's n_ctx is {n_ctx}: shorten it"
                )
        return tokens, model.to_str_tokens(tokens), prompt
    tokens = torch.as_tensor(prompt)
    if tokens.dim() != 1 or len(tokens) == 0 or tokens.is_floating_point():
        raise WorkbenchError(
            f"a prompt tensor must be a non-empty 1-D tensor of token ids, got {tokens.dtype} "
            f"of shape {tuple(tokens.shape)}"
        )
    tokens = tokens.long().cpu()
    strings = (
        model.to_str_tokens(tokens) if hasattr(model, "to_str_tokens") else [str(int(t)) for t in tokens]
    )
    text = "".join(strings) if hasattr(model, "to_str_tokens") else " ".join(strings)
    return tokens, strings, text


def choose_targets(logits: Tensor, targets=None, coverage: float = 0.95, most: int = 10) -> Tensor:
    """Token ids at the last position: the given ones, else the top logits covering `coverage`
    of the probability (at most `most`)."""
    if targets is not None:
        ids = torch.as_tensor(targets).long().flatten()
        if len(ids) == 0 or ids.min() < 0 or ids.max() >= logits.shape[-1]:
            raise WorkbenchError(f"targets must be token ids in [0, {logits.shape[-1]}), got {ids.tolist()}")
        if len(set(ids.tolist())) != len(ids):  # one logit node per token id ("l.TOKEN")
            raise WorkbenchError(f"targets repeat a token id: {ids.tolist()}")
        return ids
    probs = logits[-1].float().softmax(-1)
    ordered, ids = probs.sort(descending=True)
    count = int((ordered.cumsum(0) < coverage).sum()) + 1
    return ids[: min(count, most)].cpu()


def bos_position(model, tokens: Tensor) -> bool:
    """Whether position 0 holds the model's BOS token (`Model.bos_token_id`; a GraphTransformer
    only when it carries a `bos_token_id` attribute), as circuit-tracer checks the first token
    against the tokenizer's special tokens before zeroing it."""
    try:
        bos = getattr(model, "bos_token_id", None)
    except WorkbenchError:  # a tokenizer without BOS/EOS
        return False
    return bos is not None and len(tokens) > 0 and int(tokens[0]) == int(bos)


def parse_target(model, text: str, what: str = "target") -> int:
    """The token id a target string names: a string that is one token of `model`'s tokenizer,
    else a whole number below the vocabulary size; else a one-line WorkbenchError naming `what`
    (the CLI passes "--target") and the pieces the string splits into."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise WorkbenchError(f"{what} {text!r}: a GraphTransformer takes targets as token ids")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    vocab = getattr(model, "d_vocab", None) or len(tokenizer)
    if text.strip().isdigit() and int(text) < vocab:
        return int(text)
    pieces = " + ".join(repr(tokenizer.decode([i])) for i in ids[:6])
    raise WorkbenchError(
        f"{what} {text!r} is {len(ids)} tokens of {getattr(model, 'spec', 'the model')}'s tokenizer "
        f"({pieces}): give one token or a token id below {vocab}"
    )


def target_token_ids(model, targets):
    """`targets` with every token string replaced by its id (`parse_target`); None stays None;
    one string or id is a list of one."""
    if targets is None or isinstance(targets, Tensor):
        return targets
    if isinstance(targets, (str, int)):
        targets = [targets]
    return [parse_target(model, t) if isinstance(t, str) else t for t in targets]


def _is_paths(transcoders) -> bool:
    if isinstance(transcoders, (str, Path)):
        return True
    return (
        isinstance(transcoders, (list, tuple))
        and len(transcoders) > 0
        and all(isinstance(t, (str, Path)) for t in transcoders)
    )


def transcoder_layer(dictionary) -> int:
    """The block its input hook (`meta["hook"]`) is in, -1 when it names none."""
    from sae.transcoders import layer_of

    layer = layer_of((getattr(dictionary, "meta", None) or {}).get("hook") or "")
    return -1 if layer is None else layer


def transcoder_folders(runs) -> list[Path]:
    """Each RUN that is a dictionary folder; for a RUN that is not, the dictionary folders inside
    it, or inside its subfolders (a training run per layer, as `workbench train
    --transcoder-layers` writes them); a one-line WorkbenchError for a RUN that holds none."""
    from sae.io import is_dictionary_folder

    def inside(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    folders = []
    for run in map(Path, runs):
        found = [run] if is_dictionary_folder(run) else [p for p in inside(run) if is_dictionary_folder(p)]
        found = found or [p for sub in inside(run) for p in inside(sub) if is_dictionary_folder(p)]
        if not found:
            raise WorkbenchError(f"{run}: {'no such folder' if not run.exists() else 'no transcoder here'}")
        folders += found
    return folders


def load_transcoder(path: str | Path):
    """One transcoder folder of ours (or a circuit-tracer layer file) via `sae.io.load`; one-line
    WorkbenchError for a cross-layer transcoder or an SAE. meta["path"] names where it came from."""
    from sae.crosslayer import refuse_cross_layer
    from sae.io import load

    dictionary = load(path)
    refuse_cross_layer(dictionary, path, "an attribution graph")
    if not getattr(dictionary, "is_transcoder", False):
        hook = dictionary.meta.get("hook") or "?"
        raise WorkbenchError(
            f"{path}: not a transcoder (an SAE of {hook}; train one with --in-hook and --out-hook)"
        )
    dictionary.meta.setdefault("path", str(Path(path).absolute()))
    return dictionary


def load_transcoders(runs) -> list[tuple[Path, object]]:
    """[(path, transcoder)] of RUNS (one path or a list): a circuit-tracer transcoder set (its
    YAML config, or a folder holding one and no dictionary of ours: `sae.peers.load_transcoder_set`),
    one circuit-tracer layer file (.safetensors / .npz), else the dictionary folders
    `transcoder_folders` finds; one-line WorkbenchErrors as those loaders give them."""
    from sae.io import is_dictionary_folder
    from sae.peers import CIRCUIT_TRACER_SUFFIXES, load_transcoder_set

    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    loaded = []
    for run in map(Path, runs):
        yaml = run.is_file() and run.suffix in (".yaml", ".yml")
        if yaml or (run.is_dir() and not is_dictionary_folder(run) and any(run.glob("*.y*ml"))):
            folder = run.parent if yaml else run
            for d in load_transcoder_set(run):
                layer = d.meta.get("layer", transcoder_layer(d))
                files = [
                    f for f in (folder / f"layer_{layer}{x}" for x in CIRCUIT_TRACER_SUFFIXES) if f.is_file()
                ]
                path = files[0] if files else run
                if not getattr(d, "is_transcoder", False):
                    raise WorkbenchError(f"{path}: not a transcoder (an SAE of {d.meta.get('hook') or '?'})")
                d.meta.setdefault("path", str(path))
                loaded.append((path, d))
        elif run.is_file() and run.suffix in CIRCUIT_TRACER_SUFFIXES:
            loaded.append((run, load_transcoder(run)))
        else:
            loaded += [(folder, load_transcoder(folder)) for folder in transcoder_folders([run])]
    return loaded


# --- the graph ---------------------------------------------------------------------------
def attribution_graph(
    model,
    transcoders,
    prompt,
    *,
    targets=None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    batch_size: int = 256,
    edges_per_target: int | None = 1024,
    dtype: torch.dtype | None = None,
    transcoder_info: list[dict] | None = None,
    zero_bos: bool = True,
) -> AttributionGraph:
    """The pruned attribution graph of `prompt` (see the module docstring).

    model: a workbench Model of GPT-2 architecture or a GraphTransformer; transcoders: a list of
    Dictionary (`meta["hook"]` = a layer's MLP input hook), a folder (str / Path) of per-layer
    transcoder runs or a list of such paths (`load_transcoders`, as `workbench circuits
    --transcoders` loads them) or, for a GraphTransformer, {layer: Dictionary}; targets: token
    ids or token strings (each one token of the model's tokenizer, `parse_target`), a list or
    one, at the last position (None: top logits covering 95%, ≤ 10);
    zero_bos: when position 0 holds the model's BOS token (`bos_position`), it gets no feature
    nodes: our transcoders are trained with BOS rows skipped, so latents there are noise; their
    write stays in that position's error node, so logits and completeness stay exact. As
    circuit-tracer (`ReplacementModel.setup_attribution(zero_bos=True)`, which zeroes the BOS
    features *and* error vectors, keeping both node slots) the BOS error and embedding nodes stay
    nodes; unlike it, the BOS error keeps the MLP's BOS output (circuit-tracer drops it into an
    unattributed constant), so every input is still its edges plus its bias;
    edges_per_target: entries kept per target row, largest |weight| first (default 1024;
    None: all, exact influence; `circuits.graph_edges.attribute`); dtype: compute dtype (float64
    for exact checks; None: the model's, float32 for a bfloat16 / float16 model). Raises
    WorkbenchError (one line) on other models, hooks or targets, a transcoder trained on another
    model, non-finite weights, a transcoder without a linear pre-activation (codebooks; gated ones
    use their magnitude path), a prompt longer than n_ctx, a GPT-2 variant whose logits the
    graph's copy does not reproduce (`check_reproduces`)."""
    started = time.perf_counter()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise WorkbenchError(f"batch_size must be a whole number ≥ 1, got {batch_size!r}")
    graph = graph_model(model)
    if _is_paths(transcoders):
        loaded = load_transcoders(transcoders)
        transcoders = [d.to(graph.device) for _, d in sorted(loaded, key=lambda fd: transcoder_layer(fd[1]))]
    layers = transcoder_layers(model, transcoders)
    for layer in layers:
        if layer >= graph.shape.n_layers or not graph.shape.d_mlp:
            raise WorkbenchError(f"transcoder for layer {layer}: the model has no such MLP")
    tokens, strings, text = prompt_tokens(model, prompt)
    if len(tokens) > graph.shape.n_ctx:
        raise WorkbenchError(f"the prompt is {len(tokens)} tokens; the model's n_ctx is {graph.shape.n_ctx}")
    check_finite(graph, layers)
    if dtype is None and graph.dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32  # half-precision edges miss completeness by ~0.3 logits (bf16 demo)
    bos = bool(zero_bos) and bos_position(model, tokens)
    system = FrozenSystem(graph, tokens, layers, dtype=dtype, zero_bos=bos)
    check_reproduces(model, system)
    system.check_features()
    target_ids = choose_targets(system.clean.logits, target_token_ids(model, targets))
    attribution = attribute(system, target_ids, batch_size=batch_size, edges_per_target=edges_per_target)
    nodes = attribution.nodes
    probs = system.clean.logits[-1].double().softmax(-1)[target_ids].float().cpu()
    weights = torch.zeros(nodes.n, dtype=attribution.adjacency.values.dtype)
    weights[nodes.logit_start :] = probs.to(weights.dtype)
    n_fixed = nodes.n - nodes.embed_start
    pruned = prune(attribution.adjacency, weights, nodes.n_features, n_fixed, node_threshold, edge_threshold)
    scores = graph_scores(
        attribution.adjacency,
        weights,
        slice(nodes.error_start, nodes.embed_start),
        slice(nodes.embed_start, nodes.logit_start),
    )
    gap = (attribution.adjacency.incoming() + attribution.biases - attribution.inputs).abs()
    metrics = {
        **scores,
        "completeness_gap": float(gap.max()) if len(gap) else 0.0,
        "seconds": round(time.perf_counter() - started, 3),
    }
    data = _graph_json(model, system, attribution, pruned, strings, text, target_ids, probs, transcoder_info)
    data["pruning"] = {
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "nodes_before": nodes.n,
        "edges_before": int(len(attribution.adjacency.values)),
        "edges_per_target": edges_per_target,
        "zero_bos": bos,
    }
    data["metrics"] = metrics
    return AttributionGraph(data, attribution, system, pruned, model)


def _graph_json(model, system, attribution, pruned, strings, text, target_ids, probs, info) -> dict:
    nodes, adjacency = attribution.nodes, attribution.adjacency
    ids = node_ids(nodes)
    decode = (lambda t: model.to_str_tokens(torch.tensor([t]))[0]) if hasattr(model, "to_str_tokens") else str
    own = pruned.influence / pruned.influence.sum().clamp_min(1e-30)
    node_list = []
    for index in pruned.node_mask.nonzero().flatten().tolist():
        node_list.append(
            _node_json(
                system,
                nodes,
                index,
                ids[index],
                (float(pruned.cumulative[index]), float(own[index])),
                strings,
                decode,
            )
        )
    edge_list = [
        {"source": ids[c], "target": ids[r], "weight": float(v)}
        for r, c, v in zip(
            adjacency.rows[pruned.edge_mask].tolist(),
            adjacency.cols[pruned.edge_mask].tolist(),
            adjacency.values[pruned.edge_mask].tolist(),
        )
    ]
    logits = system.clean.logits[-1]
    return {
        "format_version": FORMAT_VERSION,
        "kind": "attribution-graph",
        "model": getattr(model, "spec", type(model).__name__),
        "prompt": text,
        "tokens": [int(t) for t in system.clean.tokens],
        "token_strings": strings,
        "transcoders": info if info is not None else transcoder_json(system.transcoders),
        "targets": [
            {
                "token": int(t),
                "token_string": decode(int(t)),
                "probability": float(p),
                "logit": float(logits[t]),
            }
            for t, p in zip(target_ids.tolist(), probs.tolist())
        ],
        "nodes": node_list,
        "edges": edge_list,
    }


def transcoder_json(transcoders: dict) -> list[dict]:
    """The JSON's "transcoders": layer, run folder (meta "path", which `sae.load` sets; absolute),
    hooks, feature store (meta "store", else the run's `features.duckdb` when `workbench analyze`
    built one, as the CLI's `check_transcoders` finds it) or None."""
    from workbench.store import STORE_FILE

    out = []
    for layer, d in sorted(transcoders.items()):
        meta = getattr(d, "meta", None) or {}
        path = meta.get("path") or meta.get("folder")
        path = str(Path(path).absolute()) if path else None  # the explorer opens it from anywhere
        store = meta.get("store")
        if store is None and path and (Path(path) / STORE_FILE).is_file():
            store = str(Path(path) / STORE_FILE)  # `workbench analyze` builds it inside the run
        out.append(
            {
                "layer": layer,
                "path": path,
                "hook": meta.get("hook"),
                "out_hook": meta.get("out_hook"),
                "store": store,
            }
        )
    return out


def node_ids(nodes) -> list[str]:
    """The JSON id of every node, in the adjacency's order."""
    ids = [f"f.{layer}.{pos}.{latent}" for layer, pos, latent in nodes.features.tolist()]
    ids += [f"e.{layer}.{pos}" for layer in nodes.error_layers for pos in range(nodes.n_positions)]
    ids += [f"t.{pos}" for pos in range(nodes.n_positions)]
    ids += [f"l.{int(t)}" for t in nodes.targets]
    return ids


def _node_json(system, nodes, index, node_id, influence: tuple[float, float], strings, decode) -> dict:
    """One node's JSON; `influence` = (cumulative share, own share)."""
    clean, L = system.clean, system.shape.n_layers
    if index < nodes.error_start:
        layer, pos, latent = nodes.features[index].tolist()
        a = float(nodes.activations[index])
        return {
            "id": node_id,
            "type": "feature",
            "layer": layer,
            "position": pos,
            "feature": latent,
            "activation": a,
            "influence": influence[0],
            "share": influence[1],
            "label": f"L{layer}/{latent}",
        }
    if index < nodes.embed_start:
        k = index - nodes.error_start
        layer, pos = nodes.error_layers[k // nodes.n_positions], k % nodes.n_positions
        return {
            "id": node_id,
            "type": "error",
            "layer": layer,
            "position": pos,
            "activation": float(clean.errors[layer, pos].norm()),
            "influence": influence[0],
            "share": influence[1],
            "label": f"error L{layer}",
        }
    if index < nodes.logit_start:
        pos = index - nodes.embed_start
        return {
            "id": node_id,
            "type": "embedding",
            "layer": -1,
            "position": pos,
            "activation": float(clean.embed[pos].norm()),
            "influence": influence[0],
            "share": influence[1],
            "label": strings[pos],
        }
    token = int(nodes.targets[index - nodes.logit_start])  # influence 0: kept at every threshold
    return {
        "id": node_id,
        "type": "logit",
        "layer": L,
        "position": nodes.n_positions - 1,
        "activation": float(clean.logits[-1, token]),
        "influence": 0.0,
        "share": 0.0,
        "label": decode(token),
    }
