"""Discrete-code circuits: O'Neill & Bui (2024), "Sparse Autoencoders Enable Scalable and
Reliable Circuit Identification in Language Models", arXiv 2405.12522.

What the paper specifies (abstract, arXiv 2405.12522; the authors' reference code,
github.com/charlieoneill11/sae-circuits: `src/sae.py`, `src/train.py`, `src/node.py`,
`src/main.py`, `experiments/main_results.py`, `data/{ioi,gt,ds}.py`, `data/data_utils.py`):
- Positive prompts are ones where the model can predict the next token, negative prompts
  minimally different ones where it cannot (IOI: three distinct names, so no name repeats and
  no indirect object follows; greater-than: the start year "XX01", so every end year is greater).
- Per prompt and attention head one vector: the head's output (TransformerLens
  `stack_head_results`, its d_model write). The released data files pool it with
  `position="mean"` (mean over all positions); the code also offers "last", the prediction
  position, which is what we use (the issue's reading of the paper): an example is the head's
  output at one prediction position, so a prompt with several predicted tokens (induction)
  gives several examples, and the real-model tasks pass hook_z at the last position. (Mean
  pooling measured worse here: planted induction 0.67-0.83, trained induction 0-1.)
- One sparse autoencoder shared by every head (ReLU encoder with a tied pre-encoder bias,
  unit-norm decoder, loss mean squared error + λ·L1 of the latents, λ = 0.02, 0.05 on
  docstring), 200 latents, 500 full-batch Adam steps at lr 1e-3, trained on only 10 examples
  drawn at random from the pooled positives and negatives ("5-10 text examples"); every example
  is then coded.
- The code of (example, head) is the argmax latent: one integer per head per example.
- Node score of a head: the number of distinct codes it uses on positives and never on
  negatives (`normalise=True` divides by the codes it uses on either); the paper then takes a
  softmax over heads, a monotone map that changes no ranking (we return the counts). Heads are
  ranked by it; ROC AUC against the known circuit is the paper's measure (node level: IOI
  0.87, greater-than 0.86, docstring 0.87, `experiments/results/main_results.json`).

Ours: the SAE is our `relu` dictionary (L1 of f_i·|d_i| with a free decoder: the same model
reparametrised) at a fixed λ. Its entries are scaled to root mean square 1 and λ = d·`l1`, so
`l1` is the paper's coefficient on a per-entry mean squared error at any activation scale (the
paper's λ applied to GPT-2's raw outputs, whose scale we cannot match). A row with no active
latent gets a code of its own (the paper's argmax would call it latent 0). The training
examples and the initialisation come from generators seeded by `seed`, never the global RNG.

What it can see, measured (head ROC AUC, 32 prompts, task seeds 0-2 x fit seeds 0-2; the
table in the README): heads whose output at the prediction position takes values on positives
that it never takes on negatives. The planted induction head does (AUC 0.75 every time); the
planted previous-token head copies a random token in either set, its outputs are identically
distributed, so it ties with the silent distractors at 0 and 0.75 is the ceiling of any score
of the two output sets. On the gates the corrupted prompts are random bit pairs the model
answers as well as the clean ones (the paper's negatives must be unanswerable): every head's
code set is the same on both sides and all score 0 (AUC 0.5); in the saturated OR all three
heads change alike (the distractor a0.2 copies bit a exactly as a0.0 does and writes where
nothing reads), so no output-only score separates them. On the trained induction model 7 of
8 heads are the circuit and the AUC is the rank of the eighth; it moves with λ (mean 0.60 at
l1 0.02, 0.87 at 0.0005; ranges 0.14-1.0 across seeds), the few-example noise of argmax codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuits.attribution import node_of_receiver
from circuits.tasks import Task, TaskError, widen
from circuits.transformer import GraphTransformer
from sae.base import Dictionary, StepContext, create
from sae.config import DictionaryConfig
from workbench import seeding
from workbench.kernels.backend import use_kernels

N_CODES, STEPS, LR, L1, TRAIN_EXAMPLES = 200, 500, 1e-3, 0.02, 10


def head_names(model: GraphTransformer) -> list[str]:
    return [s for s in model.graph.sources if s.startswith("a")]


def prediction_outputs(model: GraphTransformer, task: Task) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(clean, corrupted): head -> [n_positions, d_model] float32 CPU outputs at the task's
    prediction positions (`task.prediction_positions()`, the same positions in both sets)."""
    where = task.prediction_positions()
    sets = []
    for tokens in (task.clean, task.corrupted):
        with torch.no_grad():
            outputs = widen(model(tokens, keep=True)[1]).cpu()
        sets.append(
            {name: outputs[i][where] for i, name in enumerate(model.graph.sources) if name.startswith("a")}
        )
    return sets[0], sets[1]


def code_scores(model: GraphTransformer, task: Task, *, seed: int = 0, **options) -> dict[str, float]:
    """head -> the number of its codes used on the clean prompts and never on the corrupted
    ones, at the prediction positions (`code_scores_from_outputs`, which takes the options)."""
    clean, corrupted = prediction_outputs(model, task)
    return code_scores_from_outputs(clean, corrupted, seed=seed, **options)


def code_scores_from_outputs(
    clean: dict[str, Tensor],
    corrupted: dict[str, Tensor],
    *,
    seed: int = 0,
    n_codes: int = N_CODES,
    steps: int = STEPS,
    lr: float = LR,
    l1: float = L1,
    train_examples: int = TRAIN_EXAMPLES,
    normalise: bool = False,
) -> dict[str, float]:
    """head -> its count of codes unique to the positives (O'Neill & Bui 2024, node level).

    clean / corrupted: head -> [n, d] outputs at the prediction positions of the positive /
    negative prompts (one row per example; the two sets may differ in n, every head shares d).
    One `relu` SAE with `n_codes` latents is trained for `steps` full-batch Adam steps (lr,
    sparsity `l1`) on `train_examples` examples drawn from both sets (every head's row of each;
    0 or more than there are: all); each (example, head) is coded by its argmax latent.
    normalise: divide by the number of distinct codes the head uses on either set.
    Raises TaskError on mismatched heads, shapes, non-finite values or options out of range."""
    if n_codes < 1 or steps < 1 or lr <= 0 or l1 < 0 or train_examples < 0:
        raise TaskError(
            f"discrete codes need n_codes >= 1, steps >= 1, lr > 0, l1 >= 0 and train_examples >= 0, "
            f"got {n_codes}, {steps}, {lr}, {l1} and {train_examples}"
        )
    heads, positives, negatives = _stacked(clean, corrupted)
    pooled = torch.cat([positives, negatives])
    pick = torch.randperm(len(pooled), generator=seeding.generator(seed, "codes", "examples"))
    chosen = pooled[pick[:train_examples]] if 0 < train_examples < len(pooled) else pooled
    sae, scale = fit_code_sae(chosen.reshape(-1, pooled.shape[-1]), n_codes, steps, lr, l1, seed)
    positive_codes, negative_codes = (argmax_codes(sae, x / scale) for x in (positives, negatives))
    return unique_code_counts(heads, positive_codes, negative_codes, normalise)


def _stacked(clean: dict[str, Tensor], corrupted: dict[str, Tensor]) -> tuple[list[str], Tensor, Tensor]:
    """(heads, positives [n+, H, d], negatives [n-, H, d]) in float32 on the CPU."""
    heads = list(clean)
    if not heads or set(heads) != set(corrupted):
        raise TaskError(
            f"discrete codes need the same non-empty set of heads on both sides, got {sorted(clean)} "
            f"and {sorted(corrupted)}"
        )
    stacks = []
    for side, values in (("clean", clean), ("corrupted", corrupted)):
        shapes = {tuple(values[h].shape) for h in heads}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or 0 in next(iter(shapes)):
            raise TaskError(
                f"discrete codes: every head's {side} outputs must be one non-empty [n, d] shape, "
                f"got {sorted(shapes)}"
            )
        stack = torch.stack([widen(values[h].detach()).float().cpu() for h in heads], dim=1)
        if not bool(stack.isfinite().all()):
            raise TaskError(f"discrete codes: the {side} outputs hold NaN or infinite values")
        stacks.append(stack)
    if stacks[0].shape[-1] != stacks[1].shape[-1]:
        raise TaskError(
            f"discrete codes: clean outputs have d = {stacks[0].shape[-1]}, corrupted "
            f"d = {stacks[1].shape[-1]}"
        )
    return heads, stacks[0], stacks[1]


def fit_code_sae(
    rows: Tensor, n_codes: int, steps: int, lr: float, l1: float, seed: int
) -> tuple[Dictionary, float]:
    """(SAE, scale): a `relu` dictionary trained on rows [N, d] / scale, scale the root mean
    square of their entries; the paper's loss, mean squared error per entry + `l1`·Σ|f|, is
    ours (squared error summed over the d entries + λ·Σ f_i|d_i|) divided by d, so λ = d·`l1`;
    no warm-up, full-batch Adam."""
    scale = float(rows.pow(2).mean().sqrt().clamp_min(1e-12))
    x = rows / scale
    config = DictionaryConfig(
        architecture="relu",
        d_in=x.shape[1],
        n_latents=n_codes,
        k=1,
        l1_coef=l1 * x.shape[1],
        l1_warmup_fraction=0.0,
        controller_rate=0.0,
    )
    sae = create(config, seed=seed, salt="codes")
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    with torch.enable_grad(), use_kernels("eager"):  # tens of rows: dense beats the sparse kernels
        for step in range(steps):
            loss = sae.training_step(x, StepContext(None, step / max(1, steps))).loss
            optimizer.zero_grad()
            loss.backward()
            sae.before_optimizer_step()
            optimizer.step()
            sae.after_optimizer_step()
    return sae.requires_grad_(False), scale


def argmax_codes(sae: Dictionary, x: Tensor) -> Tensor:
    """[n, H] long: the argmax latent of each row of x [n, H, d]; n_latents where none fires."""
    with torch.no_grad():
        dense = sae.encode(x).to_dense().view(*x.shape[:-1], sae.n_latents)
    best = dense.argmax(-1)
    return torch.where(dense.amax(-1) > 0, best, torch.full_like(best, sae.n_latents))


def unique_code_counts(
    heads: list[str], positive: Tensor, negative: Tensor, normalise: bool = False
) -> dict[str, float]:
    """head -> |codes on positives − codes on negatives| (over |either| when `normalise`)."""
    scores = {}
    for i, head in enumerate(heads):
        seen_positive, seen_negative = set(positive[:, i].tolist()), set(negative[:, i].tolist())
        unique = len(seen_positive - seen_negative)
        scores[head] = unique / len(seen_positive | seen_negative) if normalise else float(unique)
    return scores


def edge_scores_of_heads(model: GraphTransformer, head_scores: dict[str, float]) -> Tensor:
    """[edges]: an edge into a head carries that head's score, an edge into the logits its source head's."""
    graph = model.graph
    out = torch.zeros(len(graph.edges))
    for index, (s, r) in enumerate(graph.edges):
        target = node_of_receiver(graph.receivers[r])
        out[index] = head_scores.get(
            target, head_scores.get(graph.sources[s], 0.0) if target == "logits" else 0.0
        )
    return out


def circuit_of_heads(model: GraphTransformer, heads: set[str]) -> Tensor:
    """[edges] bool: edges from embed or a kept head into a kept head or the logits."""
    graph = model.graph
    keep = heads | {"embed", "logits"}
    return torch.tensor(
        [
            graph.sources[s] in keep
            and node_of_receiver(graph.receivers[r]) in keep
            and (graph.sources[s] != "embed" or node_of_receiver(graph.receivers[r]) != "logits")
            for s, r in graph.edges
        ]
    )


def kept_heads(head_scores: dict[str, float], share: float = 0.5) -> set[str]:
    """Heads scoring at least `share` of the best head's score (none when no head scores)."""
    best = max(head_scores.values(), default=0.0)
    return {h for h, v in head_scores.items() if best > 0 and v >= share * best}
