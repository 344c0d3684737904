"""The smallest circuit of a ranking that does the task: a search over prefix sizes k of a ranking
(edges or heads, best first) for the smallest whose faithfulness reaches a target.

Faithfulness f(k) = (m(C_k) − m(∅)) / (m(M) − m(∅)) of the circuit C_k made of the k best-ranked
units is not monotone in k (a kept unit can hurt: a negative head, an edge whose source is
ablated), so an exact answer needs every k. The search is instead the usual one for a
threshold on a mostly-increasing curve (as in the faithfulness-vs-edges curves of Conmy et al.
2023 and Hanna et al. 2024, "Have Faith in Faithfulness"): geometric growth k = 1, 2, 4, … until
f(k) ≥ target (or k = n), then bisection between the last size below and the first one above.
That is at most 2·⌈log2 n⌉ + 1 evaluations, each one forward over the task's prompts.

What it guarantees: the returned k reaches the target (unless no evaluated size does, and then
k = n); every evaluated size smaller than k falls short of it, k − 1 among them when k > 1. So
k is a boundary where the curve crosses the target, and it is the smallest such k whenever f is
monotone; a non-monotone f may have a smaller crossing the search did not visit.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

from workbench.errors import ConfigError


class FaithfulSearch(NamedTuple):
    k: int
    """The smallest prefix size found reaching the target (n when none does)."""
    faithfulness: float
    """f(k)."""
    curve: list[tuple[int, float]]
    """Every evaluated (k, f(k)), sorted by k."""


def check_target(target: float) -> None:
    """Raise ConfigError unless 0 < target <= 1 (a fraction of the model's task score)."""
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ConfigError(f"faithfulness target must be in (0, 1], got {target}")


def smallest_faithful(faithfulness_of: Callable[[int], float], n: int, target: float = 0.8) -> FaithfulSearch:
    """Search k in 1..n for the smallest prefix size with `faithfulness_of(k)` >= `target`.

    `faithfulness_of(k)`: the faithfulness (a float; nan counts as falling short) of the circuit
    of the k best-ranked units; `n`: the ranking's length (0 gives k = 0, nothing evaluated).
    Geometric steps then bisection, at most 2·⌈log2 n⌉ + 1 calls; see the module docstring for
    what the result guarantees. Raises ConfigError for a target outside (0, 1]."""
    check_target(target)
    if n < 0:
        raise ConfigError(f"a ranking has n >= 0 units, got {n}")
    seen: dict[int, float] = {}

    def reaches(k: int) -> bool:
        if k not in seen:
            seen[k] = float(faithfulness_of(k))
        return not math.isnan(seen[k]) and seen[k] >= target

    if n == 0:
        return FaithfulSearch(0, float("nan"), [])
    below, k = 0, 1
    while not reaches(k):
        if k == n:  # nothing reaches the target: keep everything
            return FaithfulSearch(n, seen[n], sorted(seen.items()))
        below, k = k, min(2 * k, n)
    above = k
    while above - below > 1:
        middle = (below + above) // 2
        if reaches(middle):
            above = middle
        else:
            below = middle
    return FaithfulSearch(above, seen[above], sorted(seen.items()))
