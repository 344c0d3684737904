"""The trainer's real TopK step, as extra paths of `workbench bench kernels` (interleaved with
its limit, dense and fused steps, so the ratios come from the same rounds).

`workbench.bench_kernels` times the kernels inside a bare step; these time `Trainee.step` of a
real `TopK` dictionary (encode, decode, loss, backward, decoder-gradient projection, gradient
clipping, fused Adam, renormalisation, firing counts):
    trainer        no dead latents: AuxK is off
    trainer+auxk   1/8 of the latents dead: AuxK selects and decodes their top-aux_k (aux_k =
                   d_in / 2, on every s-th row, `sae.base.aux_row_stride`)
"""

from __future__ import annotations

from typing import Callable

import torch

from sae.base import create
from sae.config import DictionaryConfig
from sae.trainee import Trainee
from workbench.seeding import generator


def trainer_paths(case, x: torch.Tensor, k: int) -> dict[str, Callable[[], None]]:
    """For a TopK case of `workbench bench kernels`: {"trainer": step, "trainer+auxk": step}, on
    x's device (the dictionary is drawn on the CPU and moved there)."""
    if case.architecture != "topk":
        return {}
    config = DictionaryConfig("topk", d_in=x.shape[1], n_latents=case.n_latents, k=k)
    paths = {}
    for name, dead_share in (("trainer", 0.0), ("trainer+auxk", 1 / 8)):
        dictionary = create(config, seed=0).to(x.device)
        dictionary.initialize_from(x[:4096])
        trainee = _FixedDead(name, dictionary, lr=1e-4, clip_grad=1.0, dead_after_tokens=10**12)
        trainee.fixed_dead = torch.zeros(case.n_latents, dtype=torch.bool, device=x.device)
        chosen = torch.randperm(case.n_latents, generator=generator(0, "bench dead latents"))[
            : int(dead_share * case.n_latents)
        ]
        trainee.fixed_dead[chosen.to(x.device)] = True
        paths[name] = _stepper(trainee, x)
    return paths


class _FixedDead(Trainee):
    """A trainee whose AuxK set stays the chosen latents, whatever fires (random data revives them)."""

    fixed_dead: torch.Tensor

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.fixed_dead


def _stepper(trainee: Trainee, x: torch.Tensor) -> Callable[[], None]:
    """The trainee's step on x; `step.persistent_bytes()` counts its weights and Adam moments
    (for the bench's device memory column)."""
    state = {"step": 0}

    def step() -> None:
        trainee.step(x, 1e-4, 0.5, state["step"])
        state["step"] += 1

    def persistent_bytes() -> int:
        tensors = list(trainee.dictionary.parameters())
        tensors += [t for s in trainee.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    step.persistent_bytes = persistent_bytes  # type: ignore[attr-defined]
    return step
