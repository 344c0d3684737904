"""Feature circuits (Marks et al. 2024): dictionary latents and their error terms as nodes.

At every hook with a dictionary, x = decode(f) + ε (ε = x − decode(f), so the model is unchanged).
- Node indirect effect of latent i (and of the error term ε), by integrated gradients from the
  clean to the corrupted value: IE ≈ mean_α ∂m/∂f_i(α) · (f_i^corr − f_i^clean), summed over
  positions (BOS left alone) and averaged over prompts. `exact_feature_effects` patches one
  latent at a time to its corrupted value (the reference the tests compare against).
- Edge u_i → d_j between consecutive hooks: ∂m/∂f_d_j · ∂f_d_j/∂f_u_i · Δf_u_i, summed over
  positions — the change of the downstream node's first-order effect that the upstream
  latent's clean-to-corrupted change causes, through the model (a VJP per downstream node).
Latents of the last hook connect to `logits` with their node effect. Codebook codes are
nodes too (their activations are the code weights); edges into a code are 0, since choosing a
code has no gradient.
The dictionaries must be on the model's device (`workbench circuits` moves them there); the
activations they read are float32 whatever the model's dtype, and effects come out as floats or
tensors on that device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.graph import Circuit, Edge, Node
from circuits.tasks import Task, TaskError
from sae.base import Dictionary


@dataclass
class FeatureEffects:
    hooks: list[str]
    latents: dict[str, Float[Tensor, " n_latents"]]
    """hook -> [n_latents] indirect effect of setting the latent to its corrupted value."""
    errors: dict[str, float]
    """hook -> indirect effect of the error term."""
    edges: list[tuple[str, int, str, int, float]] = field(default_factory=list)
    """(upstream hook, latent or -1 for the error term, downstream hook, latent or -1, weight)."""
    splits: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=dict, repr=False)
    """hook -> (clean latents, clean error, corrupted latents, corrupted error), reused for the edges;
    latents [batch, pos, n_latents], errors [batch, pos, d_model]."""


def _ordered_hooks(model, dictionaries: dict[str, Dictionary]) -> list[str]:
    """The dictionaries' hooks in the order a forward pass fires them."""
    model.check_hooks(list(dictionaries))
    fired: list[str] = []
    hooks = [(name, lambda act, hook, name=name: fired.append(name)) for name in dictionaries]
    with torch.no_grad(), model.hooks(hooks):
        model(torch.full((1, 2), model.bos_token_id, dtype=torch.long))
    return list(dict.fromkeys(fired))


def _split(dictionary: Dictionary, x: Tensor) -> tuple[Tensor, Tensor]:
    """(dense latents [B, P, m], error [B, P, d]) of activations x [B, P, d]."""
    codes = dictionary.encode(x).to_dense().view(*x.shape[:-1], dictionary.n_latents)
    return codes, x - dictionary.decode(codes.reshape(-1, dictionary.n_latents)).view_as(x)


def _activations(model, tokens: Tensor, hooks: list[str]) -> dict[str, Tensor]:
    with torch.no_grad():
        return {h: a.float() for h, a in model.run_with_cache(tokens, hooks).items()}


def _replacement(hook: str, dictionary: Dictionary, latents: Tensor, error: Tensor):
    """A (hook, fn) setting the activation (positions after BOS) to decode(latents) + error."""

    def hook_fn(activation, hook=None):
        rebuilt = (
            dictionary.decode(latents[:, 1:].reshape(-1, dictionary.n_latents)).view_as(error[:, 1:])
            + error[:, 1:]
        )
        return torch.cat([activation[:, :1], rebuilt.to(activation.dtype)], dim=1)

    return hook, hook_fn


def feature_effects(model, task: Task, dictionaries: dict[str, Dictionary], steps: int = 8) -> FeatureEffects:
    """Node indirect effects of every latent and error term, by `steps`-point integrated gradients."""
    if not dictionaries:
        raise TaskError("feature circuits need at least one dictionary (hook -> dictionary)")
    hooks = _ordered_hooks(model, dictionaries)
    clean, corrupt = _activations(model, task.clean, hooks), _activations(model, task.corrupted, hooks)
    latents, errors, splits = {}, {}, {}
    for hook in hooks:
        dictionary = dictionaries[hook]
        (f0, e0), (f1, e1) = (
            _split_detached(dictionary, clean[hook]),
            _split_detached(dictionary, corrupt[hook]),
        )
        splits[hook] = (f0, e0, f1, e1)
        grad_f, grad_e = torch.zeros_like(f0), torch.zeros_like(e0)
        for alpha in (torch.arange(steps) + 0.5) / steps:  # 0-dim CPU tensors: scalars on any device
            f = (f0 + alpha * (f1 - f0)).requires_grad_(True)
            e = (e0 + alpha * (e1 - e0)).requires_grad_(True)
            with model.hooks([_replacement(hook, dictionary, f, e)]):
                df, de = torch.autograd.grad(
                    task.score(model(task.clean)), (f, e)
                )  # no grads left on the model
            grad_f += df / steps
            grad_e += de / steps
        latents[hook] = (grad_f * (f1 - f0))[:, 1:].sum((0, 1))  # the metric is a mean: this is per prompt
        errors[hook] = float((grad_e * (e1 - e0))[:, 1:].sum())
    return FeatureEffects(hooks, latents, errors, splits=splits)


def _split_detached(dictionary: Dictionary, x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return _split(dictionary, x)


def exact_feature_effects(
    model, task: Task, dictionaries: dict[str, Dictionary], hook: str, latents: list[int]
) -> Float[Tensor, " latents"]:
    """[len(latents)]: m(latent patched to its corrupted value at every position) − m(clean)."""
    dictionary = dictionaries[hook]
    clean, corrupt = (
        _activations(model, task.clean, [hook])[hook],
        _activations(model, task.corrupted, [hook])[hook],
    )
    (f0, e0), (f1, _) = _split_detached(dictionary, clean), _split_detached(dictionary, corrupt)
    with torch.no_grad():
        base = float(task.score(model(task.clean)))
        out = []
        for latent in latents:
            f = f0.clone()
            f[..., latent] = f1[..., latent]
            with model.hooks([_replacement(hook, dictionary, f, e0)]):
                out.append(float(task.score(model(task.clean))) - base)
    return torch.tensor(out)


def feature_edges(
    model, task: Task, dictionaries: dict[str, Dictionary], found: FeatureEffects, per_hook: int = 10
) -> None:
    """Fill `found.edges` between the `per_hook` strongest latents (and the error terms) of
    consecutive hooks."""
    kept = {h: strongest(found, h, per_hook) for h in found.hooks}
    for up, down in zip(found.hooks, found.hooks[1:]):
        f0, e0, f1, e1 = found.splits[up]
        f_up, e_up = f0.clone().requires_grad_(True), e0.clone().requires_grad_(True)
        f_down, e_down, weight_f, weight_e = _downstream(model, task, dictionaries, up, down, f_up, e_up)
        targets = [(j, (weight_f[..., j] * f_down[..., j])[:, 1:].sum()) for j in kept[down]]
        targets.append((-1, (weight_e * e_down)[:, 1:].sum()))
        for j, value in targets:
            if not value.requires_grad:  # discrete codes (codebooks): no gradient path into them
                grad_f = grad_e = None
            else:
                grad_f, grad_e = torch.autograd.grad(
                    value, (f_up, e_up), retain_graph=True, allow_unused=True
                )
            per_latent = _zero_if_none(grad_f, f0) * (f1 - f0)
            for i in kept[up]:
                found.edges.append((up, i, down, j, float(per_latent[:, 1:, i].sum())))
            found.edges.append((up, -1, down, j, float((_zero_if_none(grad_e, e0) * (e1 - e0))[:, 1:].sum())))


def _zero_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _downstream(model, task, dictionaries, up, down, f_up, e_up):
    """One pass with the upstream hook rebuilt from the leaves (f_up, e_up). Returns the downstream
    latents and error as functions of them, and ∂m/∂(downstream latents, error) at the clean run."""
    dictionary = dictionaries[down]
    held = {}

    def at_down(activation, hook=None):
        f, e = _split(dictionary, activation.float())
        held["f"], held["e"] = f, e
        held["f_leaf"], held["e_leaf"] = f.detach().requires_grad_(True), e.detach().requires_grad_(True)
        rebuilt = (
            dictionary.decode(held["f_leaf"].reshape(-1, dictionary.n_latents)).view_as(e) + held["e_leaf"]
        )
        return torch.cat([activation[:, :1], rebuilt[:, 1:].to(activation.dtype)], dim=1)

    with model.hooks([_replacement(up, dictionaries[up], f_up, e_up), (down, at_down)]):
        metric = task.score(model(task.clean))
    weight_f, weight_e = torch.autograd.grad(metric, (held["f_leaf"], held["e_leaf"]))
    return held["f"], held["e"], weight_f, weight_e


def strongest(found: FeatureEffects, hook: str, n: int) -> list[int]:
    effects = found.latents[hook]
    return effects.abs().topk(min(n, len(effects))).indices.tolist()


def feature_circuit(
    model,
    task: Task,
    dictionaries: dict[str, Dictionary],
    steps: int = 8,
    per_hook: int = 10,
    stores: dict[str, str] | None = None,
) -> Circuit:
    """Node effects, edges between consecutive hooks, as a circuit JSON (feature and error nodes)."""
    found = feature_effects(model, task, dictionaries, steps)
    feature_edges(model, task, dictionaries, found, per_hook)
    return to_feature_circuit(found, task, per_hook, stores or {})


def to_feature_circuit(found: FeatureEffects, task: Task, per_hook: int, stores: dict[str, str]) -> Circuit:
    def node_id(hook: str, latent: int) -> str:
        return f"{hook}/{'error' if latent < 0 else latent}"

    nodes, effect = [], {}
    for layer, hook in enumerate(found.hooks, start=1):
        for latent in [*strongest(found, hook, per_hook), -1]:
            score = found.errors[hook] if latent < 0 else float(found.latents[hook][latent])
            effect[node_id(hook, latent)] = score
            nodes.append(
                Node(
                    node_id(hook, latent),
                    "error" if latent < 0 else "feature",
                    layer,
                    f"{hook} error" if latent < 0 else f"#{latent}",
                    score,
                    True,
                    hook,
                    None if latent < 0 else latent,
                    None if latent < 0 else stores.get(hook),
                )
            )
    nodes.append(Node("logits", "logits", len(found.hooks) + 1, "logits"))
    last = found.hooks[-1]
    weights = [(node_id(u, i), node_id(d, j), w) for u, i, d, j, w in found.edges]
    weights += [(n.id, "logits", n.score) for n in nodes if n.hook == last]
    largest = max((abs(w) for *_, w in weights), default=0.0)
    edges = [Edge(a, b, w, abs(w) >= 0.05 * largest) for a, b, w in weights]
    return Circuit(
        nodes,
        edges,
        task=task.name,
        method="feature-ig",
        metrics={"error_effects": found.errors, "hooks": found.hooks},
    )
