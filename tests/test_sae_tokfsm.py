"""Codebook features against the TokFSM ground truth, and the FSM itself."""

from __future__ import annotations

import pytest
import torch

from sae.tokfsm import BOS, FSMConfig, TokFSM, code_state_scores, run_tokfsm_benchmark


def test_sequences_spell_walks_of_the_machine():
    fsm = TokFSM(FSMConfig(states=12, out_degree=3, digits=2, steps_per_sequence=6, seed=1))
    tokens, states = fsm.sample(20, seed=2)
    assert tokens.shape == (20, 13) and bool((tokens[:, 0] == BOS).all()) and bool((states[:, 0] == -1).all())
    spelled = tokens[:, 1:].view(20, 6, 2)
    walk = states[:, 1::2]
    assert torch.equal(spelled[..., 0] * 10 + spelled[..., 1], walk)
    for a, b in zip(walk[:, :-1].reshape(-1).tolist(), walk[:, 1:].reshape(-1).tolist()):
        assert b in fsm.successors[a].tolist()


def test_code_state_scores_on_a_known_assignment():
    states = torch.tensor([0, 0, 1, 1, 2, 2])
    active = torch.zeros(6, 4, dtype=torch.bool)
    active[[0, 1], 0] = True  # code 0: exactly state 0
    active[[2, 4], 1] = True  # code 1: half state 1, half state 2
    active[[3], 2] = True  # code 2: one of state 1's two positions
    rows = code_state_scores(active, states, 3)
    assert rows[0] == {"state": 0, "code": 0, "precision": 1.0, "recall": 1.0}
    assert rows[1]["precision"] == pytest.approx(1.0) and rows[1]["recall"] == pytest.approx(0.5)


@pytest.mark.slow
def test_most_states_get_a_precise_code():
    """Issue 5: in a test-sized TokFSM, most states have a code with precision >= 0.9. The model
    trains 600 steps, not the benchmark's 1,200: 8 of 12 states pass either way (mean precision
    0.90 vs 0.91) in half the time."""
    result = run_tokfsm_benchmark(model_steps=600)
    assert (
        result["lm_loss_last"] < result["model_loss"] + 0.1
    )  # the codebook bottleneck keeps the model working
    assert result["states_with_precision_0.9"] > result["states"] / 2, result["states_with_precision_0.9"]
