"""Codebook features (Tamkin et al. 2023, "Codebook Features: Sparse and Discrete
Interpretability for Neural Networks") as a dictionary trained on cached activations.

C codes c_j of dimension d; each activation x picks the k codes most similar to it (cosine by
default, or dot product) and is replaced by their sum (or mean): x_hat = sum_{j in top_k} c_j.
A code is a binary feature: `encode` gives value 1 (1/k for the mean) at the chosen codes, so
`decode(encode(x))` is the bottleneck's output. Loss = |x - x_hat|^2; the search has no
gradient, so the chosen codes' rows learn (the kernels' sparse decode backward touches only
them). Codes start at spherical k-means centres of a sample (scaled by 1/k for sums); a code
chosen by no token for `DEAD_CODE_STEPS` steps, or nearly duplicating a busier code, is
replaced by an input of the batch drawn with
probability proportional to its squared error (scaled likewise), so it goes where codes are
missing. Inserting codebooks into a model and fine-tuning end to end is
`workbench codebook-finetune` (not yet built).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.base import Dictionary, StepContext, StepOutput, reconstruction_loss, register
from sae.resample import latents_to_resample
from workbench import seeding
from workbench.distributed import all_reduce_sum, gather_rows
from workbench.kernels import SparseCodes, codebook_lookup

KMEANS_ITERATIONS = 10
DEAD_CODE_STEPS = 20
DUPLICATE_COSINE = 0.95


@register("codebook")
class Codebook(Dictionary):
    unit_norm_decoder = False

    def __init__(self, config, generator=None):
        super().__init__(config, generator)
        del self.W_enc, self.b_dec  # a codebook has only its codes (W_dec) and no bias
        self.register_buffer("uses_since_check", torch.zeros(config.n_latents, dtype=torch.long))
        self.register_buffer("steps_since_check", torch.zeros((), dtype=torch.long))
        self.register_buffer("replacements", torch.zeros((), dtype=torch.long))

    @property
    def codes(self) -> Tensor:
        return self.W_dec

    def encode(self, x: Tensor) -> SparseCodes:
        return self.lookup(self._rows(x))[1]

    def lookup(self, x: Tensor, straight_through: bool = False) -> tuple[Tensor, SparseCodes]:
        """(output [N, d_in], codes) for the rows `x` as given (no input checks): the k chosen
        codes summed, or averaged with aggregate "mean". With `straight_through`, `x` receives the
        output's gradient as if the bottleneck were the identity (`sae.codebook_finetune`)."""
        output, chosen = codebook_lookup(
            x, self.W_dec, self.config.k, metric=self.config.metric, straight_through=straight_through
        )
        weight = 1.0 / self.config.k if self.config.aggregate == "mean" else 1.0
        codes = SparseCodes(
            chosen.indices, torch.full_like(chosen.values, weight), self.n_latents, extra=chosen.extra
        )
        return output * weight, codes

    def training_step(self, x: Tensor, context: StepContext) -> StepOutput:
        x_hat, codes = self.lookup(x)
        mse = reconstruction_loss(x, x_hat)
        self._replace_dead_codes(x, x_hat.detach(), codes)
        return StepOutput(
            mse, x_hat, codes, {"mse": mse.detach(), "replaced_codes": self.replacements.clone()}
        )

    @torch.no_grad()
    def _replace_dead_codes(self, x: Tensor, x_hat: Tensor, codes: SparseCodes) -> None:
        """Every DEAD_CODE_STEPS steps: codes chosen by no token since the last check, or nearly
        duplicating a busier code, move to badly reconstructed inputs."""
        self.uses_since_check += all_reduce_sum(
            torch.bincount(codes.flat_indices(), minlength=self.n_latents)
        )
        self.steps_since_check += 1
        if int(self.steps_since_check) < DEAD_CODE_STEPS:
            return
        stale = latents_to_resample(
            self, self.uses_since_check, min_fires=1, duplicate_cosine=DUPLICATE_COSINE
        )
        self.uses_since_check.zero_()
        self.steps_since_check.zero_()
        dead = stale.nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        x, x_hat = gather_rows(x), gather_rows(x_hat)  # under torchrun: the whole batch, on every rank
        generator = seeding.generator(self.seed, "replace codes", int(self.replacements))
        error = (x - x_hat).pow(2).sum(dim=1).cpu() + 1e-12
        rows = torch.multinomial(
            error, dead.numel(), replacement=dead.numel() > x.shape[0], generator=generator
        ).to(x.device)
        self._pending = (dead, x[rows] * self._code_scale())  # applied after the optimizer step
        self.replacements += dead.numel()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        pending = getattr(self, "_pending", None)
        if pending is not None:
            self.W_dec[pending[0]] = pending[1]
            self._pending = None

    def _code_scale(self) -> float:
        return 1.0 if self.config.aggregate == "mean" else 1.0 / self.config.k

    @torch.no_grad()
    def initialize_from(self, sample: Tensor, target: Optional[Tensor] = None) -> None:
        """Spherical k-means (cosine) or k-means (dot) centres of the sample, scaled for sums."""
        sample = sample.to(self.W_dec.dtype)
        generator = seeding.generator(self.seed, "k-means")
        picks = torch.randint(0, sample.shape[0], (self.n_latents,), generator=generator)
        centres = sample[picks].clone()
        spherical = self.config.metric == "cosine"
        points = F.normalize(sample, dim=1) if spherical else sample
        for _ in range(KMEANS_ITERATIONS):
            keys = F.normalize(centres, dim=1) if spherical else centres
            assign = (
                (points @ keys.t()).argmax(dim=1) if spherical else torch.cdist(points, centres).argmin(dim=1)
            )
            sums = torch.zeros_like(centres).index_add_(0, assign, sample)
            counts = torch.bincount(assign, minlength=self.n_latents)
            centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        self.W_dec.copy_(centres * self._code_scale())

    @torch.no_grad()
    def fold_input_scale(self, scale: float, output_scale: Optional[float] = None) -> None:
        """Cosine and dot-product rankings do not change when x is scaled; only the codes do."""
        self.W_dec /= scale
