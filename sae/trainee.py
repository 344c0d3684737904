"""One dictionary in training: its optimizer, dead-latent counters and step.

Several trainees share one stream of batches (`sae.training`). Everything that changes during
training (weights, buffers, Adam moments, counters) round-trips through `state_tensors` /
`load_state_tensors`, so a resumed run continues bit for bit. Under torchrun each rank steps on
its share of the batch: gradients are averaged and firing counts summed over the ranks before
anything is updated, so every rank holds the same state.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from sae.base import Dictionary, StepContext, StepOutput, centred_mean_square
from sae.resample import latents_to_resample, resample
from workbench.distributed import all_reduce_sum, gather_rows, world_size
from workbench.errors import WorkbenchError

_MOMENTS = ("step", "exp_avg", "exp_avg_sq")


class TrainingDivergedError(WorkbenchError):
    """The loss became NaN or infinite."""


def _average_gradients(parameters) -> None:
    """Mean of every gradient over the ranks, in one flat all-reduce."""
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class Trainee:
    def __init__(
        self,
        name: str,
        dictionary: Dictionary,
        lr: float,
        clip_grad: float,
        dead_after_tokens: int,
        starving_below: float = 0.0,
    ):
        self.name, self.dictionary = name, dictionary
        self.starving_below = starving_below
        self.base_lr, self.clip_grad, self.dead_after_tokens = lr, clip_grad, dead_after_tokens
        fused = all(p.device.type in ("cpu", "cuda") for p in dictionary.parameters())
        self.optimizer = torch.optim.Adam(dictionary.parameters(), lr=lr, betas=(0.9, 0.999), fused=fused)
        self.tokens_since_fired = torch.zeros(
            dictionary.n_latents, dtype=torch.long, device=dictionary.W_dec.device
        )
        self.fires_since_resample = torch.zeros_like(self.tokens_since_fired)
        # Running firing rate per latent (EMA over steps), for the "starving" part of the AuxK set.
        self.firing_rate = torch.full(
            (dictionary.n_latents,), 1.0 / dictionary.n_latents, device=dictionary.W_dec.device
        )
        # [resamplings done, latents they moved]: reported in the final metrics
        self.resampling = torch.zeros(2, dtype=torch.long)
        self._unchecked: tuple[Tensor, int] | None = None
        """The last step's loss and step number, until `check_loss` reads it."""

    @property
    def dead_mask(self) -> Tensor:
        """Latents AuxK trains: dead ones, and (with starving_below) those firing below that
        fraction of the mean rate."""
        dead = self.tokens_since_fired >= self.dead_after_tokens
        if self.starving_below > 0:
            dead |= self.firing_rate < self.starving_below * self.firing_rate.mean()
        return dead

    @property
    def is_dead(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_after_tokens

    def step(
        self, x: Tensor, lr: float, progress: float, step: int, target: Optional[Tensor] = None
    ) -> StepOutput:
        """One optimizer step on the rows x [N, d_in] (a transcoder's: predicting `target` [N, d_out])."""
        d = self.dictionary
        self.check_loss()
        out = d.training_step(x, StepContext(self.dead_mask, progress, self.firing_rate, target))
        self._unchecked = (out.loss.detach(), step)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if world_size() > 1:
            _average_gradients(d.parameters())
        d.before_optimizer_step()
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(d.parameters(), self.clip_grad)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        d.after_optimizer_step()
        self._count_firing(out, x.shape[0])
        return out

    def check_loss(self) -> None:
        """Raise TrainingDivergedError if the last step's loss was not finite. Read one step late
        (at the next step, and by the loop before every checkpoint and at the end), so that on a
        GPU the host does not wait for each step's work before queueing the next one."""
        if self._unchecked is None:
            return
        loss, step = self._unchecked
        self._unchecked = None
        if not math.isfinite(value := float(loss)):
            raise TrainingDivergedError(
                f"{self.name}: loss is {value} at step {step} (lower --lr; the last checkpoint is intact)"
            )

    @torch.no_grad()
    def _count_firing(self, out: StepOutput, n_tokens: int) -> None:
        # index_add_ and masked_fill_, not a boolean-mask gather and bincount: those read their
        # output size on the host, which on a GPU waits for the step to finish
        fired = (out.codes.flat_values() > 0).long()
        counts = torch.zeros(self.dictionary.n_latents, dtype=torch.long, device=fired.device)
        counts.index_add_(0, out.codes.flat_indices(), fired)
        world = world_size()
        if world > 1:  # the whole batch's counts, on every rank
            counts, n_tokens = all_reduce_sum(counts), n_tokens * world
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(counts > 0, 0)
        self.fires_since_resample += counts
        self.firing_rate.lerp_(counts.to(self.firing_rate.dtype) / n_tokens, 0.01)

    @property
    def can_resample(self) -> bool:
        """Codebooks have no encoder: they replace their dead codes themselves."""
        return hasattr(self.dictionary, "W_enc")

    def resample(
        self,
        x: Tensor,
        out: StepOutput,
        below: float,
        duplicate_cosine: float,
        generator: torch.Generator,
        target: Optional[Tensor] = None,
    ) -> int:
        """Resample latents firing below `below` times the mean rate since the last call, or
        duplicating a busier latent (see `sae.resample`); return how many."""
        fires = self.fires_since_resample
        min_fires = below * float(fires.sum()) / self.dictionary.n_latents
        chosen = latents_to_resample(self.dictionary, fires, min_fires, duplicate_cosine)
        x, x_hat = gather_rows(x), gather_rows(out.x_hat.detach())  # the whole batch, on every rank
        target = None if target is None else gather_rows(target)
        n = resample(self.dictionary, self.optimizer, chosen, x, x_hat, generator, target)
        self.dictionary.after_optimizer_step()
        self.fires_since_resample.zero_()
        self.tokens_since_fired[chosen] = self.dead_after_tokens  # in the AuxK set until they fire
        self.resampling += torch.tensor([1, n])
        return n

    def totals(self) -> dict[str, int]:
        """What resampling did over the whole run (0 and 0 when it is off)."""
        return {"resamplings": int(self.resampling[0]), "resampled_total": int(self.resampling[1])}

    @torch.no_grad()
    def metrics(self, x: Tensor, out: StepOutput, target: Optional[Tensor] = None) -> dict[str, float]:
        """Loss, FVU, L0 and the step's terms over the whole batch (every rank's share under torchrun).
        For a transcoder FVU is the prediction's, of `target`."""
        names = sorted(out.terms)
        x = x if target is None else target
        local = [
            (x - out.x_hat).pow(2).sum(),
            (out.codes.flat_values() > 0).sum(),
            out.loss.detach(),
            *[out.terms[n] for n in names],
        ]
        summed = all_reduce_sum(
            torch.stack([t.double() for t in local])
        )  # over ranks; identity in one process
        world, rows = world_size(), x.shape[0] * world_size()
        residual, fired = summed[0], summed[1]
        loss, terms = summed[2] / world, list(summed[3:] / world)  # per-rank means over equal shares
        total = centred_mean_square(x) * rows
        record = {
            "loss": float(loss),
            "fvu": float(residual / total.clamp_min(1e-12)),
            "l0": float(fired) / rows,
            "dead_fraction": float(self.is_dead.float().mean()),
        }
        record.update({name: float(value) for name, value in zip(names, terms)})
        return record

    # --- checkpoints ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"model.{k}": v.detach() for k, v in self.dictionary.state_dict().items()}
        names = {id(p): n for n, p in self.dictionary.named_parameters()}
        for param, state in self.optimizer.state.items():
            for key in _MOMENTS:
                if key in state:
                    tensors[f"adam.{names[id(param)]}.{key}"] = state[key].detach()
        tensors["tokens_since_fired"] = self.tokens_since_fired
        tensors["fires_since_resample"] = self.fires_since_resample
        tensors["firing_rate"] = self.firing_rate
        tensors["resampling"] = self.resampling
        return {k: v.contiguous() for k, v in tensors.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        buffers = dict(self.dictionary.named_buffers())
        for name in self.dictionary.defaulted_buffers:  # checkpoints written before the buffer existed
            model.setdefault(name, buffers[name])
        self.dictionary.load_state_dict(model, strict=True)
        for name, param in self.dictionary.named_parameters():
            moments = {
                key: tensors[f"adam.{name}.{key}"] for key in _MOMENTS if f"adam.{name}.{key}" in tensors
            }
            if moments:
                self.optimizer.state[param] = {k: v.clone() for k, v in moments.items()}
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        self.fires_since_resample.copy_(tensors["fires_since_resample"])
        self.firing_rate.copy_(tensors["firing_rate"])
        if "resampling" in tensors:  # checkpoints written before it was counted
            self.resampling.copy_(tensors["resampling"])
