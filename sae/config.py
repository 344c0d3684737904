"""What a dictionary is: its architecture, sizes and the coefficients its loss uses.

One frozen dataclass for every architecture (fields an architecture does not use are ignored
and say so), so one `workbench train --arch topk,jumprelu` command can build several.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from workbench.errors import ConfigError

METRICS = ("cosine", "dot")
"""codebook: how codes are scored against an activation."""
AGGREGATES = ("sum", "mean")
"""codebook: how the chosen codes combine."""


def _at_least(low: float, **values: float) -> None:
    for name, value in values.items():
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class DictionaryConfig:
    architecture: str = "topk"
    """Registered architecture name (see `sae.architectures()`)."""
    d_in: int = 0
    """Input width (the hook's d)."""
    n_latents: int = 0
    """Dictionary width."""
    k: int = 32
    """Active latents per token: TopK's k, BatchTopK/Matryoshka/Mutual Choice's mean k,
    Feature Choice's mean k."""
    aux_k: int = 0
    """AuxK: dead latents per token that reconstruct the residual; 0 means d_in // 2
    (topk, batchtopk, matryoshka, mutual_choice)."""
    aux_coef: float = 1 / 32
    """AuxK loss coefficient (alpha)."""
    l1_coef: float = 5.0
    """Sparsity coefficient lambda (relu: L1 of f_i * |d_i|; gated: ReLU(pi_i) * |d_i|);
    the L0 controller's starting value."""
    l1_warmup_fraction: float = 0.05
    """relu/gated: fraction of training over which lambda ramps up linearly from 0."""
    target_l0: float = 0.0
    """jumprelu, relu, gated: the L0 the sparsity controller steers to; 0 means k."""
    bandwidth: float = 0.05
    """jumprelu: width epsilon of the rectangle kernel of the threshold pseudo-gradient."""
    controller_rate: float = 0.02
    """jumprelu, relu, gated: step of the L0 controller per step, per unit of relative L0 error
    (0: relu/gated keep lambda = l1_coef)."""
    threshold_momentum: float = 0.01
    """batchtopk/matryoshka/feature_choice: eta of the running inference threshold."""
    prefixes: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)
    """matryoshka: nested widths as fractions of n_latents (ascending, last 1.0)."""
    metric: str = "cosine"
    """codebook: similarity that picks the codes, cosine or dot."""
    aggregate: str = "sum"
    """codebook: the chosen codes' sum or mean replaces the activation."""
    aux_zipf: bool = True
    """mutual_choice: aux_zipf_loss (AuxK over latents firing below a Zipf fit of the densities,
    dead ones included); False: plain AuxK."""
    approx_topk: bool = False
    """topk: training selects from int8-matmul candidates re-ranked exactly
    (`workbench.kernels.approx`); inference stays exact."""
    d_out: int = 0
    """Output width: 0 for an SAE (decodes back to its input, width d_in); > 0 makes a transcoder
    that reads one hook (d_in) and predicts another (d_out, e.g. an MLP's output from its
    input), even when d_out == d_in. Not for codebooks."""
    skip: bool = False
    """Transcoders only: add a linear skip connection x @ W_skip.T (W_skip [d_out, d_in]) to the
    prediction (skip transcoders, Paulo et al. 2025)."""

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{field.name} must be finite, got {value}")
        _at_least(0, d_in=self.d_in, n_latents=self.n_latents, aux_k=self.aux_k, aux_coef=self.aux_coef)
        _at_least(0, l1_coef=self.l1_coef, target_l0=self.target_l0, controller_rate=self.controller_rate)
        if self.k <= 0 or (self.n_latents and self.k > self.n_latents):
            raise ConfigError(f"k must be in [1, n_latents], got {self.k} for {self.n_latents} latents")
        if not 0 <= self.l1_warmup_fraction <= 1:
            raise ConfigError(f"l1_warmup_fraction must be in [0, 1], got {self.l1_warmup_fraction}")
        if not 0 < self.threshold_momentum <= 1:
            raise ConfigError(f"threshold_momentum must be in (0, 1], got {self.threshold_momentum}")
        if self.bandwidth <= 0:
            raise ConfigError(f"bandwidth must be > 0, got {self.bandwidth}")
        if self.metric not in METRICS or self.aggregate not in AGGREGATES:
            raise ConfigError(
                f"metric must be {' or '.join(METRICS)} and aggregate {' or '.join(AGGREGATES)}, "
                f"got {self.metric!r} and {self.aggregate!r}"
            )
        if self.d_out < 0:
            raise ConfigError(f"d_out must be >= 0 (0: an SAE), got {self.d_out}")
        if self.skip and not self.d_out and self.d_in:  # a template (d_in 0, TrainConfig's) may say skip
            raise ConfigError("skip needs a transcoder (d_out > 0): an SAE has no skip connection")
        if self.d_out and self.architecture == "codebook":
            raise ConfigError("codebook dictionaries cannot be transcoders (d_out must be 0)")
        p = self.prefixes
        if not p or p[-1] != 1.0 or p[0] <= 0 or any(b <= a for a, b in zip(p, p[1:])):
            raise ConfigError(f"prefixes must ascend from > 0 to 1.0, got {list(p)}")

    def to_json(self) -> dict:
        """The fields as JSON; an SAE's omit d_out and skip (its files read as before transcoders)."""
        obj = asdict(self)
        obj["prefixes"] = list(self.prefixes)
        if not self.d_out and not self.skip:
            del obj["d_out"], obj["skip"]
        return obj

    @classmethod
    def from_json(cls, obj: dict) -> "DictionaryConfig":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in obj.items() if k in names}
        if "prefixes" in values:
            values["prefixes"] = tuple(float(v) for v in values["prefixes"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"dictionary config: {exc}") from None

    @property
    def is_transcoder(self) -> bool:
        """Whether the dictionary decodes to another hook (d_out > 0)."""
        return self.d_out > 0

    @property
    def effective_d_out(self) -> int:
        """The decoder's width: d_out for a transcoder, d_in for an SAE."""
        return self.d_out or self.d_in

    @property
    def effective_aux_k(self) -> int:
        return min(self.aux_k or max(1, self.d_in // 2), self.n_latents)

    @property
    def effective_target_l0(self) -> float:
        return self.target_l0 or float(self.k)
