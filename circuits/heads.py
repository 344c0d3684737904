"""Head-level circuits on any workbench `Model`, through its hooks (no graph rewrite): the nodes
are the attention heads (`blocks.L.attn.hook_z`, one slice per head: GQA models such as Gemma
share K/V, the query heads still have their own z) and the MLPs (`blocks.L.hook_mlp_out`).

A node is ablated by resample ablation: its output is replaced, at every position, by its
output on the corrupted prompt (the corrupted run unpatched), as in Wang et al. 2022.
Every score estimates the same quantity, s(v) ≈ m(v ablated) − m(clean) (mean over prompts):
- exact: one patched forward per node, prompts × nodes batched in chunks (the reference);
- eap (Syed et al. 2023): (corrupted_v − clean_v) · ∂m/∂v at the clean run, one backward;
- eap-ig (Hanna et al. 2024): the same difference times ∂m/∂v averaged over `steps` points
  of the straight path from the corrupted to the clean input embeddings;
- acdc (Conmy et al. 2023), at node level: nodes visited from the last layer down, a layer's
  candidates tested in one batched forward, each removed when the metric drops by less than
  τ (the layer's removals checked together, then one at a time when together they drop more);
  τ swept upwards (1%, 5%, 20% of the clean-minus-ablated gap), each sweep starting from the
  last one's circuit. Score: the largest τ at which a node survives (ties: its last drop);
- codes: `circuits.codes.code_scores_from_outputs` on each head's z at the prediction
  positions, clean vs corrupted (heads only; the MLPs stay in its circuits).
A circuit is the smallest prefix of a ranking whose faithfulness (m(C) − m(∅)) / (m(M) − m(∅))
reaches the target (`circuits.search.smallest_faithful`); nodes outside it are ablated.
Metrics that read only the last position (`metric.last_position_only`) get logits for that
position alone: the unembedding of a 262k vocabulary is most of a small model's forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from circuits.tasks import Task, TaskError, widen

HEAD_HOOK = "blocks.{}.attn.hook_z"
MLP_HOOK = "blocks.{}.hook_mlp_out"
EMBED_HOOK = "hook_embed"
FINAL_HOOK = "unembed.hook_in"
HEAD_METHODS = ("exact", "eap", "eap-ig", "acdc", "codes")
ACDC_FRACTIONS = (0.01, 0.05, 0.2)
"""ACDC's swept thresholds τ as shares of the clean-minus-ablated gap (each sweep costs up to one
patched run per surviving node; three keep Gemma-3-270M's IOI within minutes on a CPU)."""
MAX_LOGITS = 2**26
"""Logit entries per forward (256 MB in float32): bounds the rows of one chunk."""


@dataclass(frozen=True)
class Nodes:
    """The nodes of a model, in topological order: per layer its heads a{L}.{h}, then m{L}."""

    n_layers: int
    n_heads: int
    names: tuple[str, ...]

    @classmethod
    def of(cls, model) -> "Nodes":
        n_heads = int(model.bridge.cfg.n_heads)
        names = [n for layer in range(model.n_layers) for n in _layer_names(layer, n_heads)]
        return cls(model.n_layers, n_heads, tuple(names))

    def index(self, layer: int, head: int | None = None) -> int:
        """Position of head `head` of `layer` (None: its MLP) in `names`."""
        return layer * (self.n_heads + 1) + (self.n_heads if head is None else head)

    def layer_of(self, i: int) -> int:
        return i // (self.n_heads + 1)


def _layer_names(layer: int, n_heads: int) -> list[str]:
    return [f"a{layer}.{h}" for h in range(n_heads)] + [f"m{layer}"]


def label(node: str) -> str:
    """a3.1 -> L3H1, m3 -> MLP3."""
    if node.startswith("a"):
        layer, head = node[1:].split(".")
        return f"L{layer}H{head}"
    return f"MLP{node[1:]}"


class Patcher:
    """A model and a task with the clean and corrupted activations of every node cached; runs
    the clean prompts with any set of nodes ablated (one keep-mask per row of a batch)."""

    def __init__(self, model, task: Task, batch_size: int = 32):
        self.model, self.task, self.nodes = model, task, Nodes.of(model)
        self.last_only = bool(getattr(task.metric, "last_position_only", False))
        self.last_only = self.last_only and self._last_position_works()
        positions = 1 if self.last_only else task.clean.shape[1]
        self.rows = max(1, min(batch_size, MAX_LOGITS // (positions * model.d_vocab)))
        hooks = [EMBED_HOOK, *self._hooks()]
        self.clean = model.run_with_cache(task.clean, hooks, stop_early=False)
        self.corrupted = model.run_with_cache(task.corrupted, hooks, stop_early=False)
        self.n = len(task.clean)
        self.full = float(self.evaluate(torch.ones(1, len(self.nodes.names), dtype=torch.bool))[0])
        self.empty = float(self.evaluate(torch.zeros(1, len(self.nodes.names), dtype=torch.bool))[0])

    def _last_position_works(self) -> bool:
        """Whether cutting the unembedding's input to the last position gives that position's
        logits (checked on one prompt; an architecture that reshapes there falls back to all)."""
        if FINAL_HOOK not in self.model.hook_names:
            return False
        tokens = self.task.clean[:1]
        try:
            with torch.no_grad():
                full = self.model(tokens)[:, -1]
                with self.model.hooks([(FINAL_HOOK, _last_position)]):
                    cut = self.model(tokens)
        except RuntimeError:
            return False
        return cut.shape[1] == 1 and torch.allclose(cut[:, 0], full, atol=1e-3 * float(full.abs().max()))

    def _hooks(self) -> list[str]:
        return [
            h
            for layer in range(self.nodes.n_layers)
            for h in (HEAD_HOOK.format(layer), MLP_HOOK.format(layer))
        ]

    def faithfulness(self, value: float) -> float:
        """(value − m(∅)) / (m(M) − m(∅)); nan when the model's score equals the ablated one."""
        return (value - self.empty) / (self.full - self.empty) if self.full != self.empty else float("nan")

    def evaluate(self, keep: Tensor) -> Tensor:
        """[K] mean metric over the prompts with the nodes where `keep` [K, nodes] is False ablated."""
        keep = keep.bool().cpu()
        configs = torch.arange(len(keep)).repeat_interleave(self.n)
        prompts = torch.arange(self.n).repeat(len(keep))
        totals = torch.zeros(len(keep), dtype=torch.float64)
        for start in range(0, len(configs), self.rows):
            chunk = slice(start, start + self.rows)
            values = self._run(keep[configs[chunk]], prompts[chunk])
            totals.index_add_(0, configs[chunk], values.double().cpu())
        return (totals / self.n).float()

    def _run(self, keep_rows: Tensor, prompts: Tensor) -> Tensor:
        """[R] metric of each row: prompt `prompts[r]` with the nodes `keep_rows[r]` keeps."""
        hooks = []
        for layer in range(self.nodes.n_layers):
            heads = keep_rows[:, self.nodes.index(layer, 0) : self.nodes.index(layer)]
            if not bool(heads.all()):
                hooks.append((HEAD_HOOK.format(layer), self._patch(HEAD_HOOK.format(layer), heads, prompts)))
            mlp = keep_rows[:, self.nodes.index(layer)]
            if not bool(mlp.all()):
                hooks.append((MLP_HOOK.format(layer), self._patch(MLP_HOOK.format(layer), mlp, prompts)))
        if self.last_only:
            hooks.append((FINAL_HOOK, _last_position))
        with torch.no_grad(), self.model.hooks(hooks):
            logits = self.model(self.task.clean[prompts])
        return self.task.metric(logits, prompts)

    def _patch(self, name: str, keep: Tensor, prompts: Tensor):
        def patch(activation: Tensor, hook) -> Tensor:
            corrupted = self.corrupted[name][prompts].to(activation.device, activation.dtype)
            corrupted = corrupted.view(activation.shape)
            kept = keep.to(activation.device).view(len(keep), 1, *([-1, 1] if keep.dim() == 2 else [1]))
            return torch.where(kept, activation, corrupted)

        return patch

    def gradients(self, alphas: list[float]) -> dict[str, Tensor]:
        """hook -> Σ over `alphas` of ∂(Σ metric)/∂activation [N, P, ...], the input embeddings
        at corrupted + α (clean − corrupted) (α = 1: the clean run), chunked over prompts."""
        sums: dict[str, Tensor] = {}
        for start in range(0, self.n, self.rows):
            rows = torch.arange(start, min(start + self.rows, self.n))
            for alpha in alphas:
                for hook, grad in self._gradient(rows, alpha).items():
                    sums.setdefault(hook, torch.zeros_like(self.clean[hook], dtype=torch.float32))
                    sums[hook][rows] += grad.flatten(2).float().to(sums[hook].device)
        return sums

    def _gradient(self, rows: Tensor, alpha: float) -> dict[str, Tensor]:
        captured: dict[str, Tensor] = {}
        clean_embed, corrupted_embed = self.clean[EMBED_HOOK][rows], self.corrupted[EMBED_HOOK][rows]

        def embed(activation, hook):
            mixed = corrupted_embed + alpha * (clean_embed - corrupted_embed)
            return (
                mixed.to(activation.device, activation.dtype).view(activation.shape).detach().requires_grad_()
            )

        def grab(name):
            def hook_fn(activation, hook):
                captured[name] = activation.clone()  # the clone is what flows on: its gradient is ours
                return captured[name]

            return hook_fn

        hooks = [(EMBED_HOOK, embed), *((h, grab(h)) for h in self._hooks())]
        if self.last_only:
            hooks.append((FINAL_HOOK, _last_position))
        with torch.enable_grad(), self.model.hooks(hooks):
            value = self.task.metric(self.model(self.task.clean[rows]), rows).sum()
            names = list(captured)
            grads = torch.autograd.grad(value, [captured[n] for n in names])
        return dict(zip(names, grads))

    def per_node(self, per_hook: dict[str, Tensor]) -> Tensor:
        """[nodes] of hook -> [N, P, width] tensors: summed over prompts, positions and d_head
        (per head) or d_model (MLPs)."""
        out = torch.zeros(len(self.nodes.names))
        for layer in range(self.nodes.n_layers):
            z = per_hook[HEAD_HOOK.format(layer)]
            per_head = z.reshape(*z.shape[:2], self.nodes.n_heads, -1).sum((0, 1, 3))
            out[self.nodes.index(layer, 0) : self.nodes.index(layer)] = per_head.cpu()
            out[self.nodes.index(layer)] = float(per_hook[MLP_HOOK.format(layer)].sum())
        return out


def _last_position(activation: Tensor, hook) -> Tensor:
    return activation[:, -1:]


def exact_node_scores(patcher: Patcher, chunk: int = 8) -> Tensor:
    """[nodes] m(node ablated) − m(clean): one patched run per node, `chunk` nodes per batch."""
    n = len(patcher.nodes.names)
    out = []
    for start in range(0, n, chunk):
        keep = torch.ones(min(chunk, n - start), n, dtype=torch.bool)
        keep[torch.arange(len(keep)), torch.arange(start, start + len(keep))] = False
        out.append(patcher.evaluate(keep))
    return torch.cat(out) - patcher.full


def eap_node_scores(patcher: Patcher, steps: int = 1) -> Tensor:
    """[nodes] (corrupted − clean) · mean gradient / N: at the clean run (steps = 1, EAP) or
    averaged over α = 1/steps … 1 of the corrupted→clean input path (EAP-IG)."""
    alphas = [1.0] if steps == 1 else [(k + 1) / steps for k in range(steps)]
    grads = patcher.gradients(alphas)
    diff = {
        hook: (widen(patcher.corrupted[hook]) - widen(patcher.clean[hook]))
        * grads[hook].to(patcher.clean[hook].device)
        for hook in grads
        if hook != EMBED_HOOK
    }
    return patcher.per_node(diff) / (len(alphas) * patcher.n)


def acdc_node_scores(patcher: Patcher, fractions: list[float] | None = None) -> Tensor:
    """[nodes] the largest swept τ at which each node survives node-level ACDC (0: never), times
    1 + half its last measured drop (as a share of the gap, at most 1), which breaks ties and
    stays below the next τ; see the module docstring."""
    nodes, n = patcher.nodes, len(patcher.nodes.names)
    gap = abs(patcher.full - patcher.empty) or 1.0
    fractions = fractions or list(ACDC_FRACTIONS)
    keep = torch.ones(n, dtype=torch.bool)
    scores, drops = torch.zeros(n), torch.zeros(n)
    current = patcher.full
    for tau in sorted(f * gap for f in fractions):
        for layer in reversed(range(nodes.n_layers)):
            candidates = [i for i in range(nodes.index(layer, 0), nodes.index(layer) + 1) if keep[i]]
            if not candidates:
                continue
            trials = keep.repeat(len(candidates), 1)
            trials[torch.arange(len(candidates)), torch.tensor(candidates)] = False
            values = patcher.evaluate(trials)
            drops[candidates] = current - values
            removable = [c for c, v in zip(candidates, values.tolist()) if current - v < tau]
            current = _remove(patcher, keep, removable, current, tau)
        scores[keep] = tau
    return scores * (1 + 0.5 * (drops.abs() / gap).clamp(max=1))  # below the next τ (×4)


def _remove(patcher: Patcher, keep: Tensor, removable: list[int], current: float, tau: float) -> float:
    """Ablate `removable` in `keep` (in place): all together when that drops the metric by less
    than τ, else one at a time, each kept only when it does. Returns the new metric."""
    if not removable:
        return current
    trial = keep.clone()
    trial[removable] = False
    value = float(patcher.evaluate(trial[None])[0])
    if current - value < tau:
        keep[:] = trial
        return value
    if len(removable) == 1:
        return current
    for node in removable:
        trial = keep.clone()
        trial[node] = False
        value = float(patcher.evaluate(trial[None])[0])
        if current - value < tau:
            keep[node], current = False, value
    return current


def code_node_scores(patcher: Patcher, seed: int = 0) -> Tensor:
    """[nodes] the discrete-code score of every head (MLPs 0) from each head's z at the task's
    prediction positions. Raises TaskError (bad outputs)."""
    from circuits.codes import code_scores_from_outputs as score

    where = patcher.task.prediction_positions()
    clean, corrupted = {}, {}
    for i, node in enumerate(patcher.nodes.names):
        if node.startswith("a"):
            layer, head = patcher.nodes.layer_of(i), i % (patcher.nodes.n_heads + 1)
            for out, cache in ((clean, patcher.clean), (corrupted, patcher.corrupted)):
                z = cache[HEAD_HOOK.format(layer)]
                out[node] = widen(
                    z.reshape(*z.shape[:2], patcher.nodes.n_heads, -1)[:, :, head][where.to(z.device)]
                )
    scores = score(clean, corrupted, seed=seed)
    return torch.tensor([float(scores.get(node, 0.0)) for node in patcher.nodes.names])


@dataclass
class HeadDiscovery:
    """One method's node scores and the smallest faithful circuit of its ranking."""

    method: str
    scores: dict[str, float]
    """node -> score (exact, eap, eap-ig: estimated m(ablated) − m(clean); acdc: τ survived;
    codes: its head score)."""
    kept: list[str]
    """The circuit's nodes, best-ranked first."""
    faithfulness: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(nodes kept, faithfulness) as the search evaluated them."""
    seconds: float = 0.0
    """Scoring and search (the shared activation cache excluded)."""


def node_scores(patcher: Patcher, method: str, steps: int = 8, seed: int = 0) -> Tensor:
    """[nodes] the scores of `method` (one of HEAD_METHODS). Raises TaskError."""
    if method == "exact":
        return exact_node_scores(patcher)
    if method == "eap":
        return eap_node_scores(patcher, 1)
    if method == "eap-ig":
        return eap_node_scores(patcher, steps)
    if method == "acdc":
        return acdc_node_scores(patcher)
    if method == "codes":
        return code_node_scores(patcher, seed)
    raise TaskError(f"unknown head-level method {method!r} (one of {', '.join(HEAD_METHODS)})")


def discover_heads(
    patcher: Patcher,
    method: str = "eap-ig",
    *,
    steps: int = 8,
    target: float = 0.8,
    seed: int = 0,
    n_nodes: int = 0,
) -> HeadDiscovery:
    """Score the nodes with `method`, then keep the smallest prefix of its ranking (by |score|)
    reaching faithfulness `target` (or the `n_nodes` best when n_nodes > 0)."""
    from circuits.search import smallest_faithful

    started = time.perf_counter()
    scores = node_scores(patcher, method, steps, seed)
    names = patcher.nodes.names
    ranked = sorted(range(len(names)), key=lambda i: -abs(float(scores[i])))
    always = []
    if method == "codes":  # a head-level method: the MLPs stay in, the heads are ranked
        always = [i for i in ranked if names[i].startswith("m")]
        ranked = [i for i in ranked if names[i].startswith("a")]

    def faithful(k: int) -> float:
        keep = torch.zeros(1, len(names), dtype=torch.bool)
        keep[0, always + ranked[:k]] = True
        return patcher.faithfulness(float(patcher.evaluate(keep)[0]))

    if n_nodes > 0:
        k = min(n_nodes, len(ranked))
        found_k, value = k, faithful(k)
        curve = [(k, value)]
    else:
        found_k, value, curve = smallest_faithful(faithful, len(ranked), target)
    kept = [names[i] for i in ranked[:found_k]] + [names[i] for i in always]
    return HeadDiscovery(
        method,
        dict(zip(names, scores.tolist())),
        kept,
        value,
        [(k + len(always), f) for k, f in curve],
        time.perf_counter() - started,
    )


def head_circuit(patcher: Patcher, found: HeadDiscovery, metrics: dict | None = None):
    """The circuit JSON (circuits.graph): embed, every head and MLP (layer = block + 1, so the
    explorer draws them in block columns; score = the method's; in_circuit = kept) and logits;
    edges join the kept nodes of consecutive kept layers (embed first, logits last), as a
    drawing of the circuit's order, scored by the target node's score (not measured edges)."""
    from circuits.graph import Circuit, Edge, Node

    nodes = [Node("embed", "embed", 0, "embed")]
    for name in patcher.nodes.names:
        kind, layer = ("head" if name.startswith("a") else "mlp"), int(name[1:].split(".")[0]) + 1
        nodes.append(Node(name, kind, layer, label(name), float(found.scores[name]), name in found.kept))
    nodes.append(Node("logits", "logits", patcher.nodes.n_layers + 1, "logits"))
    by_layer: dict[int, list[str]] = {}
    for node in nodes:
        if node.in_circuit:
            by_layer.setdefault(node.layer, []).append(node.id)
    layers = sorted(by_layer)
    edges = [
        Edge(source, target, float(found.scores.get(target, 0.0)), True)
        for low, high in zip(layers, layers[1:])
        for source in by_layer[low]
        for target in by_layer[high]
    ]
    return Circuit(nodes, edges, task=patcher.task.name, method=found.method, metrics=metrics or {})
