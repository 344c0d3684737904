"""Hand-set logic-gate transformers: a planted circuit known weight by weight.

Prompts are [BOS, a, b] with bits a, b (tokens 1 = "0", 2 = "1"). One layer, no LayerNorm:
- head a0.0 attends from every position to position 1 and copies the bit there (a);
- head a0.1 attends to the position itself (b at the last position);
- head a0.2 is a distractor: it attends to position 1 too, but writes where nothing reads;
- the MLP computes the gate, OR(a, b) = (a + b) − ReLU(a + b − 1) or AND(a, b) = ReLU(a + b − 1),
  with GELU(s·z)/s standing in for ReLU, and writes y and the constant 1/2;
- the unembedding gives the "True" token the logit c·(y − 1/2), every other token 0.
The metric is the logit of the right answer relative to "False"; clean and corrupted prompts
are independent random bit pairs. The planted circuit carries the bits along
embed → a0.0.v, embed → a0.1.v, a0.0 → m0, a0.1 → m0, m0 → logits (the query/key edges read
positions, which are the same in clean and corrupted prompts). The saturated OR is the known
trap: with a = b = 1 ablating either input alone changes nothing, so one-edge-at-a-time
patching and gradients at the clean point miss the inputs (`gate_task(..., saturated=True)`).
"""

from __future__ import annotations

import torch

from circuits.tasks import Task, TaskError, widen
from circuits.transformer import GraphTransformer, Shape

GATES = ("or", "and")
TRUE_TOKEN, FALSE_TOKEN = 3, 4
_BIT, _POS, _A, _B, _JUNK, _Y, _HALF = 0, 1, 4, 5, 6, 7, 8  # residual dimensions (positions take 1..3)
_SHARP, _RELU_SCALE, _LOGIT_SCALE = 30.0, 30.0, 8.0


def gate_model(gate: str) -> GraphTransformer:
    """The one-layer, three-head, LayerNorm-free model computing `gate` of the two bits."""
    if gate not in GATES:
        raise TaskError(f"unknown gate {gate!r} (one of {', '.join(GATES)})")
    model = GraphTransformer(
        Shape(n_layers=1, d_model=12, n_heads=3, d_vocab=5, n_ctx=3, d_mlp=2, layer_norm=False)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[2, _BIT] = 1.0
        for position in range(3):
            model.W_pos[position, _POS + position] = 1.0
        _copy_head(model, 0, attend_to=lambda p: 1, write=_A)
        _copy_head(model, 1, attend_to=lambda p: p, write=_B)
        _copy_head(model, 2, attend_to=lambda p: 1, write=_JUNK)
        s = _RELU_SCALE
        model.W_in[0, _A] = s
        model.W_in[0, _B] = s
        model.b_in[0, 1] = -s  # hidden 0: s(a + b); hidden 1: s(a + b − 1)
        if gate == "or":
            model.W_out[0, 0, _Y], model.W_out[0, 1, _Y] = 1 / s, -1 / s
        else:
            model.W_out[0, 1, _Y] = 1 / s
        model.b_out[0, _HALF] = 0.5
        model.W_U[_Y, TRUE_TOKEN] = _LOGIT_SCALE
        model.W_U[_HALF, TRUE_TOKEN] = -_LOGIT_SCALE
    return model.eval()


def _copy_head(model: GraphTransformer, head: int, attend_to, write: int) -> None:
    """Head `head` attends from position p to attend_to(p) and writes the bit found there to `write`."""
    W_Q, W_K, W_V, W_O = (
        model.W_QKV[0, 0, head],
        model.W_QKV[0, 1, head],
        model.W_QKV[0, 2, head],
        model.W_O[0, head],
    )
    for position in range(3):
        W_Q[_POS + position, position] = _SHARP  # the query names the position it wants ...
        W_K[_POS + attend_to(position), position] = _SHARP  # ... and that position's key answers
    W_V[_BIT, 0] = 1.0
    W_O[0, write] = 1.0


def gate_task(gate: str, n: int = 64, seed: int = 0, saturated: bool = False) -> Task:
    """Random bit pairs; the metric is ±(logit True − logit False) at the last position.
    saturated=True: every clean prompt is (1, 1) and every corrupted one (0, 0), the OR trap
    where no single edge's ablation moves an OR gate's output."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 3, (n, 3), generator=generator)
    corrupted = torch.randint(1, 3, (n, 3), generator=generator)
    if saturated:
        clean[:], corrupted[:] = 2, 1
    clean[:, 0] = corrupted[:, 0] = 0
    bits = clean[:, 1:] == 2
    answer = bits.any(1) if gate == "or" else bits.all(1)
    sign = answer.float() * 2 - 1

    def metric(logits, rows=slice(None)):
        last = widen(logits[:, -1])
        return sign[rows].to(last.device, last.dtype) * (last[:, TRUE_TOKEN] - last[:, FALSE_TOKEN])

    truth = {
        "heads": ["a0.0", "a0.1"],
        "edges": ["embed->a0.0.v", "embed->a0.1.v", "a0.0->m0", "a0.1->m0", "m0->logits"],
    }
    return Task(
        f"{gate}-gate" + ("-saturated" if saturated else ""), clean, corrupted, metric, ground_truth=truth
    )
