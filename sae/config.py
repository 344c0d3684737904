"""What a dictionary is: its architecture, sizes and the coefficients its loss uses.

One frozen dataclass for every architecture (fields an architecture does not use are ignored
and say so), so one `workbench train --arch topk,jumprelu` command can build several.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from workbench.errors import ConfigError


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

    def __post_init__(self):
        if self.d_in < 0 or self.n_latents < 0:
            raise ConfigError(f"d_in and n_latents must be >= 0, got {self.d_in} and {self.n_latents}")
        if self.k <= 0 or (self.n_latents and self.k > self.n_latents):
            raise ConfigError(f"k must be in [1, n_latents], got {self.k} for {self.n_latents} latents")
        if self.aux_k < 0 or self.aux_coef < 0 or self.l1_coef < 0 or self.target_l0 < 0:
            raise ConfigError("aux_k, aux_coef, l1_coef and target_l0 must be >= 0")
        if not 0 <= self.l1_warmup_fraction <= 1 or not 0 < self.threshold_momentum <= 1:
            raise ConfigError("l1_warmup_fraction must be in [0, 1] and threshold_momentum in (0, 1]")
        if self.bandwidth <= 0 or self.controller_rate < 0:
            raise ConfigError("bandwidth must be > 0 and controller_rate >= 0")
        p = self.prefixes
        if not p or p[-1] != 1.0 or p[0] <= 0 or any(b <= a for a, b in zip(p, p[1:])):
            raise ConfigError(f"prefixes must ascend from > 0 to 1.0, got {list(p)}")

    def to_json(self) -> dict:
        obj = asdict(self)
        obj["prefixes"] = list(self.prefixes)
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
    def effective_aux_k(self) -> int:
        return min(self.aux_k or max(1, self.d_in // 2), self.n_latents)

    @property
    def effective_target_l0(self) -> float:
        return self.target_l0 or float(self.k)
