"""A two-layer attention-only transformer the project trains on repeated random tokens, and its
ground truth read off its attention patterns.

Training: `induction_task` prompts (a random segment repeated once at a random offset), loss on
the tokens only induction can predict, Adam. The model learns induction after a phase change;
which offsets its heads use depends on the seed (we have seen previous-token heads at offset −1
and shifted ones at −3/−4 whose layer-1 heads attend 4 past the previous occurrence), so the
ground truth is derived, not assumed:
- an offset head (layer 0) puts ≥ `MIN_MASS` of its attention at one relative offset −o;
- an induction head (layer 1) puts ≥ `MIN_MASS` at one position c after the previous
  occurrence of the current token (c = 1 is the textbook head);
- wiring: the key of an induction head reads the offset head with o = c (its key then holds the
  previous occurrence's token), its value reads the offset head with o = c − 1 (the token after
  the previous occurrence; o = 0 means the embedding itself), its query reads the embedding, its
  output goes to the logits; each used offset head reads its token through embed → v.

The default recipe's model ships with the package (circuits/assets/induction-2l: weights,
recipe.json and the loss of every training step, 0.3 MB), so `load_or_train` reads it instead of
training for a minute; the tests retrain the recipe's first steps and compare them with the shipped
log. `python -m circuits.trained_induction` retrains it into that folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from circuits.tasks import Task, induction_task
from circuits.transformer import GraphTransformer, Shape
from workbench.files import read_json, save_tensors_atomic, write_json_atomic

MIN_MASS = 0.5
SHIPPED = Path(__file__).resolve().parent / "assets" / "induction-2l"
"""The default recipe's trained model, packaged (model.safetensors, recipe.json, training-log.json)."""


@dataclass(frozen=True)
class InductionRecipe:
    """How the two-layer induction model is trained (saved as recipe.json beside its weights; another
    recipe retrains it)."""

    d_model: int = 64
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads per layer (two layers, no MLPs)."""
    vocab: int = 256
    """Tokens in the vocabulary."""
    length: int = 33
    """Tokens per training sequence (and the model's context)."""
    steps: int = 1500
    """Adam steps, each on a fresh batch of induction sequences."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 3e-3
    """Adam learning rate."""
    seed: int = 0
    """Seed of the initialisation and of the training sequences."""

    @staticmethod
    def upgrade_json(obj: dict) -> dict:
        """A recipe.json saved before `batch_size` was renamed (issue 18: it said `batch`), in
        today's names."""
        return {("batch_size" if k == "batch" else k): v for k, v in obj.items()}

    def shape(self) -> Shape:
        return Shape(
            n_layers=2,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_vocab=self.vocab,
            n_ctx=self.length,
            d_mlp=0,
        )


def train_induction_model(
    recipe: InductionRecipe = InductionRecipe(), progress: bool = False, losses: list[float] | None = None
) -> GraphTransformer:
    """Train by `recipe` on the CPU's global RNG seeded with recipe.seed; each step's loss (mean
    −log p of the predictable tokens, nats) is appended to `losses` when given. Step s trains on
    induction_task seed 10000 + seed·steps + s, so with seed 0 a shorter run is the longer one's
    first steps."""
    torch.manual_seed(recipe.seed)
    model = GraphTransformer(recipe.shape())
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    for step in tqdm(range(recipe.steps), desc="induction model", disable=not progress):
        task = induction_task(
            recipe.vocab,
            n=recipe.batch_size,
            length=recipe.length,
            seed=10_000 + recipe.seed * recipe.steps + step,
        )
        loss = -task.score(model(task.clean))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if losses is not None:
            losses.append(float(loss.detach()))
    return model.eval().requires_grad_(False)


def _load_saved(folder: Path, recipe: InductionRecipe) -> GraphTransformer | None:
    """The model saved under `folder` by this recipe, or None."""
    from safetensors.torch import load_file

    weights, config = folder / "model.safetensors", folder / "recipe.json"
    if not (weights.exists() and config.exists()):
        return None
    if InductionRecipe.upgrade_json(read_json(config)) != recipe.__dict__:
        return None
    model = GraphTransformer(recipe.shape())
    model.load_state_dict(load_file(weights))
    return model.eval().requires_grad_(False)


def load_or_train(
    folder: Path, recipe: InductionRecipe = InductionRecipe(), progress: bool = True
) -> GraphTransformer:
    """The model saved under `folder` for this recipe, else the packaged one (SHIPPED) when the
    recipe is its recipe, else trained (~1 minute for the default size) and saved under `folder`
    (model.safetensors, recipe.json, training-log.json). On the CPU, trained there too, so the
    saved weights are the same on every machine: move the model where it should run."""
    for source in (folder, SHIPPED):
        model = _load_saved(source, recipe)
        if model is not None:
            return model
    losses: list[float] = []
    model = train_induction_model(recipe, progress, losses)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(
        folder / "model.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()}
    )
    write_json_atomic(folder / "training-log.json", {"loss": [round(x, 6) for x in losses]})
    write_json_atomic(folder / "recipe.json", recipe.__dict__)
    return model


def repeated_positions(task: Task) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, query positions p, previous occurrences p − m) of the tokens inside second copies."""
    rows, queries, previous = [], [], []
    length = task.clean.shape[1]
    for row, tokens in enumerate(task.clean):
        for m in range((length - 1) // 2, 3, -1):
            starts = [
                a
                for a in range(1, length - 2 * m + 1)
                if torch.equal(tokens[a + m : a + 2 * m], tokens[a : a + m])
            ]
            if starts:
                a = starts[0]
                for p in range(a + m, a + 2 * m - 1):
                    rows.append(row), queries.append(p), previous.append(p - m)
                break
    return torch.tensor(rows), torch.tensor(queries), torch.tensor(previous)


def head_roles(model: GraphTransformer, task: Task) -> dict[str, tuple[str, int, float]]:
    """head -> ("offset", o, mass) | ("induction", c, mass) | ("other", 0, best mass)."""
    with torch.no_grad():
        patterns = model(task.clean, keep=True)[3]
    rows, queries, previous = (t.to(model.device) for t in repeated_positions(task))
    every = torch.arange(len(queries), device=model.device)
    roles = {}
    for head in range(model.shape.n_heads):
        attention = patterns[0][rows, head, queries]  # [n, P]
        masses = [float(attention[every, (queries - o).clamp(min=0)].mean()) for o in range(1, 8)]
        best = max(range(len(masses)), key=masses.__getitem__)
        roles[f"a0.{head}"] = (
            ("offset", best + 1, masses[best]) if masses[best] >= MIN_MASS else ("other", 0, masses[best])
        )
        attention = patterns[1][rows, head, queries]
        masses = [
            float(attention[every, (previous + c).clamp(max=task.clean.shape[1] - 1)].mean())
            for c in range(0, 8)
        ]
        best = max(range(len(masses)), key=masses.__getitem__)
        roles[f"a1.{head}"] = (
            ("induction", best, masses[best]) if masses[best] >= MIN_MASS else ("other", 0, masses[best])
        )
    return roles


def ground_truth(roles: dict[str, tuple[str, int, float]]) -> dict[str, list[str]]:
    """The heads and edges of the induction circuit the roles imply (see the module docstring)."""
    offset_heads = {}
    for head, (role, o, _) in roles.items():
        if role == "offset":
            offset_heads.setdefault(o, []).append(head)
    heads, edges = set(), set()
    for head, (role, c, _) in roles.items():
        if role != "induction":
            continue
        keys, values = offset_heads.get(c, []), (["embed"] if c == 1 else offset_heads.get(c - 1, []))
        if not keys or not values:
            continue
        heads.add(head)
        edges |= {f"embed->{head}.q", f"{head}->logits"}
        for source in keys:
            edges.add(f"{source}->{head}.k")
        for source in values:
            edges.add(f"{source}->{head}.v")
        for source in [*keys, *values]:
            if source != "embed":
                heads.add(source)
                edges.add(f"embed->{source}.v")
    return {"heads": sorted(heads), "edges": sorted(edges)}


def trained_induction_task(
    model: GraphTransformer, recipe: InductionRecipe = InductionRecipe(), n: int = 64, seed: int = 1
) -> Task:
    """Held-out induction prompts with the ground truth derived from the model's heads."""
    task = induction_task(recipe.vocab, n=n, length=recipe.length, seed=seed, name="trained-induction")
    task.ground_truth = ground_truth(head_roles(model, task))
    return task


if __name__ == "__main__":  # retrain the packaged model (after a change to the recipe or the model)
    import shutil

    shutil.rmtree(SHIPPED, ignore_errors=True)
    load_or_train(SHIPPED)
