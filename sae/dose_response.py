"""Dose-response of one steering edit: `sweep(model, add(d, 12, 0), [0, 2, 4, 8], prompts, ...)`.

Per strength (the edit's strength replaced; for a clamp, the held value):
- concept_rate: the share of generated tokens in the concept's token set, or the mean of a
  scoring function (e.g. a probe) over the continuations;
- kl_neutral: KL(unsteered ‖ steered) of the next-token distributions over a neutral text, per
  token — what the edit costs where the concept does not belong;
- ce_neutral: the steered model's next-token cross-entropy on that text;
- fluency: the unsteered model's mean log-prob per token of the steered continuations (lower:
  text the model itself finds unlikely);
and one example continuation. `figure(rows)` draws concept rate and KL against strength.
Everything runs on the model's device (the edit is placed there by `sae.steering.steer`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.base import DictionaryError
from sae.steering import Edit, check_edits, placed, steer


@dataclass
class SweepRow:
    strength: float
    concept_rate: float
    kl_neutral: float
    ce_neutral: float
    fluency: float
    example: str


def sweep(
    model,
    edit: Edit,
    strengths: Sequence[float],
    prompts: Sequence[str],
    concept: Sequence[str] | Sequence[int] | Callable[[str], float],
    neutral_text: str,
    max_new_tokens: int = 20,
    positions: str | Tensor = "all",
) -> list[SweepRow]:
    """One row per strength (greedy decoding, so rows differ only by the edit). Raises
    DictionaryError for no prompts or strengths, and (before any pass) what
    `sae.steering.check_edits` raises for the edit at any of the strengths."""
    if not prompts or not strengths:
        raise DictionaryError("sweep needs at least one prompt and one strength")
    check_edits(model, [dataclasses.replace(edit, strength=float(s)) for s in strengths], positions)
    edit = placed([edit], model.device)[0]  # one copy of a dictionary held elsewhere, not one per strength
    neutral = model.tokenize(neutral_text).to(model.device)
    if neutral.shape[1] < 2:
        raise DictionaryError("the neutral text must be at least one token after BOS")
    concept_ids = None if callable(concept) else _token_set(model, concept)
    with torch.no_grad():
        reference = model(neutral).float().log_softmax(-1)[0, :-1]
    rows = []
    for strength in strengths:
        steered_edit = dataclasses.replace(edit, strength=float(strength))
        with torch.no_grad(), steer(model, [steered_edit], positions):
            continuations = [
                _continuation(model.generate(p, max_new_tokens=max_new_tokens), p) for p in prompts
            ]
            logprobs = model(neutral).float().log_softmax(-1)[0, :-1]
        rows.append(
            SweepRow(
                strength=float(strength),
                concept_rate=_concept_rate(model, continuations, concept, concept_ids),
                kl_neutral=float(
                    F.kl_div(logprobs, reference, log_target=True, reduction="none").sum(-1).mean()
                ),
                ce_neutral=float(-logprobs.gather(-1, neutral[0, 1:, None]).mean()),
                fluency=_fluency(model, prompts, continuations),
                example=prompts[0] + continuations[0],
            )
        )
    return rows


def _continuation(text: str, prompt: str) -> str:
    return text[len(prompt) :] if text.startswith(prompt) else text


def _token_set(model, concept: Sequence[str] | Sequence[int]) -> set[int]:
    ids: set[int] = set()
    for item in concept:
        if isinstance(item, int):
            ids.add(item)
        else:
            ids.update(model.tokenize(item, prepend_bos=False)[0].tolist())
    if not ids:
        raise DictionaryError("the concept token set is empty")
    return ids


def _concept_rate(model, continuations: list[str], concept, ids: set[int] | None) -> float:
    if ids is None:
        return float(sum(concept(text) for text in continuations) / len(continuations))
    tokens = [t for text in continuations for t in model.tokenize(text, prepend_bos=False)[0].tolist()]
    return sum(t in ids for t in tokens) / max(len(tokens), 1)


def _fluency(model, prompts: Sequence[str], continuations: list[str]) -> float:
    """Mean log-prob per continuation token under the unsteered model."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, continuation in zip(prompts, continuations):
            n_prompt = model.tokenize(prompt).shape[1]
            tokens = model.tokenize(prompt + continuation)
            if tokens.shape[1] <= n_prompt:
                continue
            logprobs = model(tokens).float().log_softmax(-1)[0, n_prompt - 1 : -1]
            total += float(logprobs.gather(-1, tokens[0, n_prompt:, None].to(logprobs.device)).sum())
            count += tokens.shape[1] - n_prompt
    return total / max(count, 1)


def figure(rows: list[SweepRow], title: str = "steering dose-response"):
    """Concept rate (left axis) and KL on neutral text (right axis) against strength (plotly)."""
    import plotly.graph_objects as go

    x = [r.strength for r in rows]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=x, y=[r.concept_rate for r in rows], name="concept rate", mode="lines+markers")
    )
    fig.add_trace(
        go.Scatter(
            x=x, y=[r.kl_neutral for r in rows], name="KL on neutral text", mode="lines+markers", yaxis="y2"
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="strength",
        yaxis=dict(title="concept rate"),
        yaxis2=dict(title="KL (nats/token)", overlaying="y", side="right"),
    )
    return fig
