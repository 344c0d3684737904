"""A hand-set two-layer induction model: the textbook circuit planted weight by weight.

Attention only, no LayerNorm; the residual stream has one-hot slots for the current token, the
position, the previous token and the predicted token, plus a scratch slot:
- a0.0, the previous-token head: position p attends to p − 1 and copies its token into "prev";
- a1.0, the induction head: its query is the current token, its key the "prev" slot (read
  through the edge a0.0 → a1.0.k), so it attends to the position after the previous occurrence
  of the current token and copies that token into "predicted", which the unembedding reads.
Distractors that a method must rank below the circuit:
- a0.1 attends to itself and copies the current token into the scratch slot, a0.2 attends to
  BOS, a0.3 is silent;
- a1.1 attends to itself and adds a small vote for the current token to the logits (it moves
  the metric a little: a real, off-circuit effect), a1.2 reads the scratch slot and votes for
  BOS's token, a1.3 is silent.
Ground truth: heads a0.0 and a1.0; the edges that carry the token information (embed → a0.0.v,
a0.0 → a1.0.k, embed → a1.0.q, embed → a1.0.v, a1.0 → logits). The query/key edges of the
previous-token head read positions, which clean and corrupted prompts share.
"""

from __future__ import annotations

import torch

from circuits.tasks import Task, induction_task
from circuits.transformer import GraphTransformer, Shape

VOCAB, CONTEXT = 16, 24
_TOKEN, _POSITION, _PREV, _PREDICTED, _SCRATCH = (
    0,
    VOCAB,
    VOCAB + CONTEXT,
    2 * VOCAB + CONTEXT,
    3 * VOCAB + CONTEXT,
)
_SHARP, _LOGIT_SCALE, _DISTRACTOR_VOTE = 6.0, 12.0, 1.5

GROUND_TRUTH = {
    "heads": ["a0.0", "a1.0"],
    "edges": ["embed->a0.0.v", "a0.0->a1.0.k", "embed->a1.0.q", "embed->a1.0.v", "a1.0->logits"],
}


def induction_model() -> GraphTransformer:
    """2 layers x 4 heads, d_model 96 (head width 24), vocab 16, context 24."""
    model = GraphTransformer(
        Shape(n_layers=2, d_model=96, n_heads=4, d_vocab=VOCAB, n_ctx=CONTEXT, d_mlp=0, layer_norm=False)
    )
    eye_v, eye_p = torch.eye(VOCAB), torch.eye(CONTEXT)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[:, _TOKEN : _TOKEN + VOCAB] = eye_v
        model.W_pos[:, _POSITION : _POSITION + CONTEXT] = eye_p
        previous = torch.zeros(CONTEXT, CONTEXT)  # key of position j answers the query of j + 1
        previous[torch.arange(CONTEXT - 1), torch.arange(1, CONTEXT)] = 1
        previous[0, 0] = 1  # BOS has no predecessor: it attends to itself
        _head(model, 0, 0, query=(_POSITION, eye_p), key=(_POSITION, previous), value=_TOKEN, write=_PREV)
        _head(model, 0, 1, query=(_POSITION, eye_p), key=(_POSITION, eye_p), value=_TOKEN, write=_SCRATCH)
        _head(
            model,
            0,
            2,
            query=(_POSITION, eye_p),
            key=(_POSITION, _to_first(CONTEXT)),
            value=_TOKEN,
            write=_SCRATCH,
        )
        _head(model, 1, 0, query=(_TOKEN, eye_v), key=(_PREV, eye_v), value=_TOKEN, write=_PREDICTED)
        _head(
            model,
            1,
            1,
            query=(_POSITION, eye_p),
            key=(_POSITION, eye_p),
            value=_TOKEN,
            write=_PREDICTED,
            gain=_DISTRACTOR_VOTE / _LOGIT_SCALE,
        )
        _head(
            model,
            1,
            2,
            query=(_POSITION, eye_p),
            key=(_POSITION, _to_first(CONTEXT)),
            value=_SCRATCH,
            write=_PREDICTED,
            gain=_DISTRACTOR_VOTE / _LOGIT_SCALE,
        )
        model.W_U[_PREDICTED : _PREDICTED + VOCAB] = eye_v * _LOGIT_SCALE
    return model.eval()


def _to_first(n: int) -> torch.Tensor:
    """Every query position's wanted key is position 0."""
    out = torch.zeros(n, n)
    out[0] = 1
    return out


def _head(
    model: GraphTransformer,
    layer: int,
    head: int,
    query: tuple[int, torch.Tensor],
    key: tuple[int, torch.Tensor],
    value: int,
    write: int,
    gain: float = 1.0,
) -> None:
    """Query slot × identity and key slot × `key` matrix meet in the head's space (score
    _SHARP² / √d_head on a match); the value slot is copied to the `write` slot."""
    (q_at, q_map), (k_at, k_map) = query, key
    W_Q, W_K, W_V = (model.W_QKV[layer, i, head] for i in range(3))
    n = q_map.shape[0]
    scale = _SHARP * model.shape.d_head**0.25
    W_Q[q_at : q_at + n, :n] = q_map * scale
    W_K[k_at : k_at + k_map.shape[0], : k_map.shape[1]] = k_map * scale
    W_V[value : value + VOCAB, :VOCAB] = torch.eye(VOCAB)
    model.W_O[layer, head, :VOCAB, write : write + VOCAB] = torch.eye(VOCAB) * gain


def planted_induction_task(n: int = 64, seed: int = 0) -> Task:
    """`induction_task` on the hand-set model's vocabulary and context, with its ground truth."""
    task = induction_task(VOCAB, n=n, length=CONTEXT, bos=0, seed=seed, name="planted-induction")
    task.ground_truth = GROUND_TRUTH
    return task
