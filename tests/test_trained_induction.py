"""The packaged two-layer induction model (circuits/assets/induction-2l): loaded, not retrained,
and still what its recipe trains. The circuit checks on it are in test_circuits_ground_truth.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from circuits import trained_induction
from circuits.tasks import induction_task
from circuits.trained_induction import SHIPPED, InductionRecipe, load_or_train, train_induction_model

STEPS_RETRAINED = 40  # ~1.5 s of the recipe's 1,500 steps


def _no_training(*args, **kwargs):
    raise AssertionError("retrained")


def test_the_default_recipe_loads_the_packaged_weights_without_training(tmp_path, monkeypatch):
    monkeypatch.setattr(trained_induction, "train_induction_model", _no_training)
    model = load_or_train(tmp_path / "model", progress=False)
    shipped = load_file(SHIPPED / "model.safetensors")
    assert model.state_dict().keys() == shipped.keys()
    assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items())
    assert json.loads((SHIPPED / "recipe.json").read_text()) == InductionRecipe().__dict__
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_the_recipe_reproduces_the_first_steps_of_the_packaged_training_log():
    """Training by today's code (model, task sampler, seeds, optimiser) gives the shipped run's
    losses step for step; a change to any of them shows here and calls for retraining the asset
    (python -m circuits.trained_induction)."""
    logged = json.loads((SHIPPED / "training-log.json").read_text())["loss"]
    assert len(logged) == InductionRecipe().steps
    losses: list[float] = []
    train_induction_model(replace(InductionRecipe(), steps=STEPS_RETRAINED), losses=losses)
    assert losses == pytest.approx(logged[:STEPS_RETRAINED], abs=1e-4)
    assert logged[0] > 5 and logged[-1] < 0.5  # from uniform guessing (5.5 nats) to induction


def test_the_packaged_weights_are_the_end_of_the_logged_run():
    """The shipped model scores the last training batch about as the log's last step did (one
    Adam step later), far from the untrained model's loss."""
    recipe = InductionRecipe()
    logged = json.loads((SHIPPED / "training-log.json").read_text())["loss"]
    model = load_or_train(SHIPPED, recipe, progress=False)
    last = induction_task(
        recipe.vocab, n=recipe.batch_size, length=recipe.length, seed=10_000 + recipe.steps - 1
    )
    with torch.no_grad():
        loss = -float(last.score(model(last.clean)))
    assert loss == pytest.approx(logged[-1], abs=0.05)


def test_another_recipe_is_trained_saved_and_loaded_again(tmp_path, monkeypatch):
    recipe = InductionRecipe(d_model=16, n_heads=2, vocab=32, length=9, steps=3, batch_size=4)
    model = load_or_train(tmp_path, recipe, progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "recipe.json", "training-log.json"}
    assert len(json.loads((tmp_path / "training-log.json").read_text())["loss"]) == 3
    monkeypatch.setattr(trained_induction, "train_induction_model", _no_training)
    again = load_or_train(tmp_path, recipe, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    with pytest.raises(AssertionError, match="retrained"):  # neither saved nor packaged
        load_or_train(tmp_path / "elsewhere", replace(recipe, steps=4), progress=False)
