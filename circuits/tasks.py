"""Circuit tasks: clean and corrupted prompts of equal shape, and a metric of the logits.

The metric gives one value per prompt, higher meaning "the model does the task" (e.g. the mean
log-prob of the right next tokens); the task's score is its mean over prompts. Metrics take
the rows they score, so attribution can run on chunks of prompts with bounded memory.

Prompts and what metrics hold (targets, answer ids) are built on the CPU; a metric moves what
it reads to the logits' device and computes in at least float32 (`widen`), so a model on a GPU
or in bfloat16 needs no other change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from workbench.errors import WorkbenchError


class TaskError(WorkbenchError, ValueError):
    """A task that cannot be run."""


@dataclass
class Task:
    name: str
    clean: Tensor
    """[N, P] token ids."""
    corrupted: Tensor
    """[N, P], the same shape: what resample ablation patches in."""
    metric: Callable[[Tensor, slice], Tensor]
    """(logits [n, P, V] of prompts `rows`, rows) -> [n] values (higher: the task is done)."""
    ground_truth: dict = field(default_factory=dict)
    """Optional: {"heads": [...], "edges": [...]} by node/edge name."""
    positions: Tensor | None = None
    """Optional [N, P] bool: the positions whose logits the metric reads (the prediction
    positions, where a head-level method such as discrete codes looks); None: the last one."""

    def __post_init__(self) -> None:
        if self.clean.shape != self.corrupted.shape or self.clean.dim() != 2:
            raise TaskError(
                f"task {self.name!r}: clean {tuple(self.clean.shape)} and corrupted "
                f"{tuple(self.corrupted.shape)} prompts must be [N, P] of one shape"
            )
        if self.positions is not None and self.positions.shape != self.clean.shape:
            raise TaskError(
                f"task {self.name!r}: positions {tuple(self.positions.shape)} must match the prompts "
                f"{tuple(self.clean.shape)}"
            )

    def prediction_positions(self) -> Tensor:
        """[N, P] bool on the CPU: `positions`, or each prompt's last position when unset."""
        if self.positions is not None:
            return self.positions.bool().cpu()
        last = torch.zeros(self.clean.shape, dtype=torch.bool)
        last[:, -1] = True
        return last

    def score(self, logits: Tensor, rows: slice = slice(None)) -> Tensor:
        """The mean metric over the prompts `rows` (logits of those prompts)."""
        return self.metric(logits, rows).mean()


def widen(x: Tensor) -> Tensor:
    """`x` in float32 when narrower (bfloat16, float16), else unchanged (the same tensor)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def next_token_logprob(tokens: Tensor, where: Tensor) -> Callable[[Tensor, slice], Tensor]:
    """Per prompt, the mean log-prob of the next token over the positions where `where` [N, P]
    is true (the logits at position p predict token p + 1)."""

    def metric(logits: Tensor, rows: slice = slice(None)) -> Tensor:
        logits = widen(logits)
        targets = tokens[rows, 1:].to(logits.device)
        weights = where[rows, :-1].to(logits.device, logits.dtype)
        logprobs = logits[:, :-1].log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (logprobs * weights).sum(1) / weights.sum(1).clamp_min(1)

    return metric


def kl_to(clean_logits: Tensor) -> Callable[[Tensor, slice], Tensor]:
    """Per prompt, minus the KL divergence of the output from the clean output (mean over positions)."""
    reference = clean_logits.detach().log_softmax(-1)

    def metric(logits: Tensor, rows: slice = slice(None)) -> Tensor:
        logits = widen(logits)
        kl = torch.nn.functional.kl_div(
            logits.log_softmax(-1),
            reference[rows].to(logits.device, logits.dtype),
            log_target=True,
            reduction="none",
        )
        return -kl.sum(-1).mean(-1)

    return metric


def induction_task(
    vocab: int, n: int = 32, length: int = 33, bos: int = 0, seed: int = 0, name: str = "induction"
) -> Task:
    """Repeated random tokens: [BOS, filler, segment, segment, filler] with the segment's length
    and offset random per prompt; corrupted prompts are unrelated random tokens. The metric is
    the mean log-prob of the next token inside the second copy, where only induction helps."""
    if length < 9:  # BOS + two copies of a segment of at least 4 tokens
        raise TaskError(f"an induction prompt needs length >= 9 (BOS and two 4-token copies), got {length}")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, length), generator=generator)
    tokens[:, 0] = bos
    corrupted = torch.randint(1, vocab, (n, length), generator=generator)
    corrupted[:, 0] = bos
    half = (length - 1) // 2
    segment = torch.randint(4, half + 1, (n,), generator=generator)
    start = (torch.rand(n, generator=generator) * (length - 2 * segment)).long() + 1
    position = torch.arange(length)
    where = torch.zeros(n, length, dtype=torch.bool)
    for i in range(n):
        a, m = int(start[i]), int(segment[i])
        tokens[i, a + m : a + 2 * m] = tokens[i, a : a + m]
        where[i] = (position >= a + m) & (position < a + 2 * m - 1)
    return Task(name, tokens, corrupted, next_token_logprob(tokens, where), positions=where)
