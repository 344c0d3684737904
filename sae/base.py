"""The `Dictionary` interface every architecture implements, and the registry of architectures.

Notation (issue 4): z = W_enc (x - b_dec) + b_enc, f = sigma(z) sparse, x_hat = sum_i f_i d_i + b_dec,
with d_i = W_dec[i]. Weights are stored one row per latent (W_enc: [n_latents, d_in], W_dec:
[n_latents, d_out]), as the fused kernels take them.

A transcoder (config.d_out > 0, issue 22) reads one hook and predicts another, y (an MLP's
output from its input): z = W_enc x + b_enc (no input shift: b_dec lives in the output space),
y_hat = sum_i f_i d_i + b_dec (+ x W_skip^T with config.skip), as SAELens's and circuit-tracer's
transcoders. Its training step reads y from `StepContext.target`; every architecture fits
`reconstruction_target` (x for an SAE, y - x W_skip^T for a transcoder: the same gradients as
fitting y with y_hat, and W_skip learns through it).

`encode` gives the latent activations as `SparseCodes` (call `.to_dense()` for [N, n_latents]);
`decode` takes them (or a dense tensor) back.

Training goes through `training_step(x, context) -> StepOutput`: the architecture's loss, its
formula in the module that defines it. The trainer owns the optimizer; a dictionary owns its
constraints (`before_optimizer_step`, `after_optimizer_step`) and its running state (buffers,
saved with the weights, so a resumed run continues exactly).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn

from sae.config import DictionaryConfig
from workbench import seeding
from workbench.errors import ConfigError, WorkbenchError
from workbench.kernels import SparseCodes, decode
from workbench.kernels.codes import csr_offsets


class DictionaryError(WorkbenchError, ValueError):
    """Input a dictionary cannot take: wrong width, wrong rank, non-finite values."""


class StepContext(NamedTuple):
    dead_mask: Optional[Tensor]
    """bool [n_latents]: latents that have not fired for the configured number of tokens (AuxK)."""
    progress: float
    """Fraction of training done, in [0, 1] (drives coefficient warm-ups)."""
    firing_rate: Optional[Tensor] = None
    """float [n_latents]: each latent's running firing frequency per token (Mutual Choice's aux_zipf_loss)."""
    target: Optional[Tensor] = None
    """[N, d_out]: a transcoder's target rows (the out-hook's activations at the same tokens as x,
    scaled like them); None for an SAE, which reconstructs x."""


class StepOutput(NamedTuple):
    loss: Tensor
    """The scalar to back-propagate."""
    x_hat: Tensor
    """[N, d_out] prediction of the target (x for an SAE; for a transcoder y, skip term included);
    the full-width one for Matryoshka."""
    codes: SparseCodes
    """The latent activations f (entries may be 0 where an architecture keeps a window)."""
    terms: dict[str, Tensor]
    """Each loss term before its coefficient, plus architecture state worth logging (detached)."""


_REGISTRY: dict[str, type["Dictionary"]] = {}


def register(name: str):
    """Class decorator: make an architecture available under `name` (refuses duplicates)."""

    def add(cls: type["Dictionary"]) -> type["Dictionary"]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.architecture = name
        _REGISTRY[name] = cls
        return cls

    return add


def architectures() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def dictionary_class(name: str) -> type["Dictionary"]:
    _import_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown architecture {name!r}; choose from {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create(config: DictionaryConfig, seed: int = 0, salt: str = "") -> "Dictionary":
    """A freshly initialised dictionary of `config.architecture`, drawn from its own stream
    (`workbench.seeding`: the seed, "init", the architecture and `salt`, e.g. the dictionary's
    name in a grid); the global RNG is neither read nor changed."""
    cls = dictionary_class(config.architecture)
    if config.d_in <= 0 or config.n_latents <= 0:  # d_out is checked by the config
        raise ConfigError(
            f"a dictionary needs d_in and n_latents > 0, got {config.d_in} and {config.n_latents}"
        )
    dictionary = cls(config, generator=seeding.generator(seed, "init", config.architecture, salt))
    dictionary.seed = seeding.stream_seed(seed, "later draws", config.architecture, salt)
    return dictionary


def _import_builtin() -> None:
    import sae.dictionaries  # noqa: F401  (registers the built-in classes)


class Dictionary(nn.Module):
    architecture: ClassVar[str] = ""
    unit_norm_decoder: ClassVar[bool] = True
    """Keep decoder rows at unit norm (projected gradient); False where the loss carries |d_i|."""
    defaulted_buffers: ClassVar[tuple[str, ...]] = ()
    """Training-state buffers added after format_version 1 was fixed: a folder may lack them
    (initial values)."""

    def __init__(self, config: DictionaryConfig, generator: Optional[torch.Generator] = None):
        """Random unit decoder rows drawn from `generator` (default: the stream of seed 0; use
        `create` for a seeded one), W_enc = W_dec^T, b_dec = 0. A transcoder's encoder rows are
        drawn independently after the decoder's (its input and output spaces differ), and
        W_skip (config.skip) starts at 0."""
        super().__init__()
        self.config = config
        self.meta: dict = {}  # a loaded folder's other fields: hook, model, metrics, ...
        self.seed = 0  # seeds the dictionary's own later draws (codebook k-means, replacements)
        m, d, d_out = config.n_latents, config.d_in, config.effective_d_out
        generator = generator or seeding.generator(0, "init", config.architecture, "")
        w_dec = torch.randn(m, d_out, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        if config.is_transcoder:
            w_enc = torch.randn(m, d, generator=generator)
            self.W_enc = nn.Parameter(w_enc / w_enc.norm(dim=1, keepdim=True))
        else:
            self.W_enc = nn.Parameter(w_dec.clone())  # W_enc initialised as W_dec^T (rows here)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip: Optional[nn.Parameter] = nn.Parameter(torch.zeros(d_out, d)) if config.skip else None

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def n_latents(self) -> int:
        return self.config.n_latents

    @property
    def d_out(self) -> int:
        """The decoder's width: the out-hook's for a transcoder, d_in for an SAE."""
        return self.config.effective_d_out

    @property
    def is_transcoder(self) -> bool:
        return self.config.is_transcoder

    @property
    def encoder_shift(self) -> Optional[Tensor]:
        """What the encoder subtracts from x before W_enc: b_dec [d_in] for an SAE (the kernels'
        `shift`), None for a transcoder (its b_dec is in the output space)."""
        return None if self.config.is_transcoder else getattr(self, "b_dec", None)

    def skip_term(self, x: Float[Tensor, "N d_in"]) -> Optional[Float[Tensor, "N d_out"]]:
        """x @ W_skip.T for a skip transcoder, else None."""
        return None if self.W_skip is None else x @ self.W_skip.t()

    def reconstruction_target(self, x: Tensor, context: StepContext) -> tuple[Tensor, Optional[Tensor]]:
        """(what the decoder fits, the skip term): (x, None) for an SAE; (y - skip, skip) for a
        transcoder, y = context.target [N, d_out]. Raises DictionaryError when a transcoder gets
        no target, or one of the wrong shape."""
        if not self.config.is_transcoder:
            return x, None
        y = context.target
        if y is None or y.dim() != 2 or y.shape != (x.shape[0], self.d_out):
            got = "none" if y is None else f"shape {tuple(y.shape)}"
            raise DictionaryError(
                f"{self.architecture} transcoder: training needs target rows [{x.shape[0]}, {self.d_out}] "
                f"(the out-hook's), got {got}"
            )
        skip = self.skip_term(x)
        return (y if skip is None else y - skip), skip

    @staticmethod
    def with_skip(x_hat: Tensor, skip: Optional[Tensor]) -> Tensor:
        """The full prediction: the decoder's output plus the skip term (if any)."""
        return x_hat if skip is None else x_hat + skip

    def pre_activations(self, x: Float[Tensor, "N d_in"]) -> Float[Tensor, "N n_latents"]:
        """Dense pre-activations z = W_enc (x - shift) + b_enc of the rows of x: the quantity an
        active latent's activation equals (topk, batchtopk, jumprelu, relu, matryoshka, choice;
        gated overrides it with its magnitude path). Used by attribution graphs."""
        x = self._rows(x)
        shift = self.encoder_shift
        bias = getattr(self, "b_enc", None)
        if not hasattr(self, "W_enc") or bias is None:
            raise DictionaryError(f"{self.architecture}: no linear encoder to give pre-activations")
        return torch.addmm(bias, x if shift is None else x - shift, self.W_enc.t())

    def calibrate(self, x: Float[Tensor, "N d_in"]) -> None:
        """Set inference thresholds from rows x (scaled as in training) at the end of training
        (`sae.calibrate`); architectures that select the same way in training and inference have none."""

    # --- inference ------------------------------------------------------------------------
    def encode(self, x: Float[Tensor, "... d_in"]) -> SparseCodes:
        """Latent activations of the rows of x (leading dims flattened), as SparseCodes."""
        return self._encode(self._rows(x))

    def decode(self, codes: SparseCodes | Float[Tensor, "N n_latents"]) -> Float[Tensor, "N d_out"]:
        """sum_i f_i d_i + b_dec: [N, d_out] (d_out = d_in for an SAE); a transcoder's skip term
        is not included (`forward` adds it)."""
        if isinstance(codes, Tensor):
            if codes.dim() != 2 or codes.shape[1] != self.n_latents:
                raise DictionaryError(
                    f"decode: dense codes must be [N, {self.n_latents}], got {tuple(codes.shape)}"
                )
            codes = SparseCodes.from_dense(codes.to(self.W_dec.dtype))
        if codes.n_latents != self.n_latents:
            raise DictionaryError(
                f"decode: codes over {codes.n_latents} latents, dictionary has {self.n_latents}"
            )
        return decode(codes, self.W_dec, getattr(self, "b_dec", None))  # codebooks have no bias

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """decode(encode(x)) (+ the skip term of a skip transcoder), shaped [..., d_out]."""
        if not self.config.is_transcoder:
            return self.decode(self.encode(x)).view(x.shape).to(x.dtype)
        rows = self._rows(x)
        y_hat = self.with_skip(self.decode(self._encode(rows)), self.skip_term(rows))
        return y_hat.view(*x.shape[:-1], self.d_out).to(x.dtype)

    def _encode(self, x: Tensor) -> SparseCodes:
        """Codes of the rows x [N, d_in]: the encoder acts on x - b_dec, which the kernels form
        themselves (shift=b_dec), so b_dec's gradient costs O(m d), not a decode of every row."""
        raise NotImplementedError

    # --- training -------------------------------------------------------------------------
    def training_step(self, x: Float[Tensor, "N d_in"], context: StepContext) -> StepOutput:
        raise NotImplementedError

    @torch.no_grad()
    def initialize_from(
        self, sample: Float[Tensor, "N d_in"], target: Optional[Float[Tensor, "N d_out"]] = None
    ) -> None:
        """Data-dependent initialisation: b_dec at the geometric median of a sample (of the
        targets, rows of `target` [N, d_out], for a transcoder)."""
        if self.config.is_transcoder:
            if target is None or target.shape[-1] != self.d_out:
                raise DictionaryError(
                    f"{self.architecture} transcoder: initialize_from needs target rows of width {self.d_out}"
                )
            sample = target
        self.b_dec.copy_(geometric_median(sample.to(self.b_dec.dtype)))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Unit-norm decoders: remove the gradient component parallel to each decoder row."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            grad, rows = self.W_dec.grad, self.W_dec
            parallel = torch.einsum(
                "md,md->m", grad, rows
            )  # one pass, no [m, d] temporary: 2x faster at 16k x 768
            grad.addcmul_(parallel[:, None], rows, value=-1)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_input_scale(self, scale: float, output_scale: Optional[float] = None) -> None:
        """Make a dictionary trained on x * scale act on x itself: the encoder absorbs the scale,
        the decoder and b_dec undo it. Latent activations are unchanged. A transcoder trained to
        predict y * output_scale from x * scale predicts y afterwards (W_skip absorbs both);
        `output_scale` None means `scale` (an SAE's input and output are one space)."""
        out = scale if output_scale is None else output_scale
        self.W_enc *= scale
        self.W_dec /= out
        self.b_dec /= out
        if self.W_skip is not None:
            self.W_skip.mul_(scale / out)

    # --- helpers --------------------------------------------------------------------------
    def _rows(self, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            raise DictionaryError(
                f"{self.architecture}: input has shape {tuple(x.shape)}, expected [..., {self.d_in}]"
            )
        if not x.is_floating_point():
            raise DictionaryError(f"{self.architecture}: input must be floating point, got {x.dtype}")
        return x.reshape(-1, self.d_in).to(self.W_dec.dtype)  # every dictionary has W_dec


def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over rows of the squared error summed over dimensions: mean_n |x_n - x_hat_n|^2."""
    return (x - x_hat).pow(2).sum(dim=-1).mean()


def aux_k_loss(x: Tensor, x_hat: Tensor, aux_codes: SparseCodes, W_dec: Tensor, stride: int = 1) -> Tensor:
    """AuxK (Gao et al. 2024): dead latents reconstruct the residual e = sg(x - x_hat), decoded
    without b_dec, normalised by the residual's variance: |e - e_hat|^2 / |e - mean(e)|^2. The
    pre-activations are used as they are (no ReLU), so a dead latent with negative
    pre-activations still receives a gradient. With `stride` s, on rows 0, s, 2s, ... only (the
    rows the encoder gave an AuxK selection; the batch is shuffled, so they are a random sample)."""
    residual = (x - x_hat).detach()[::stride]
    estimate = decode(aux_codes, W_dec)[::stride]
    return reconstruction_loss(residual, estimate) / centred_mean_square(residual).clamp_min(1e-12)


AUX_MIN_ROWS = 256


def aux_row_stride(n_local: int, k: int, aux_k: int, rows_per_pass: int = 2048) -> int:
    """AuxK's row stride s: the largest power of two <= 2 aux_k / k that leaves >= 256 rows of
    the whole batch (all ranks) and divides the local batch and the encoder's pass. AuxK then
    decodes N * aux_k / s >= N k / 2 entries instead of N * aux_k, 12x the main selection at
    aux_k 384, k 32 (the trainer step was 2.3x the limit with 1/8 of latents dead; 1.2x now)."""
    from workbench.distributed import world_size

    n, s = n_local * world_size(), 1
    while (
        2 * s <= 2 * aux_k / k
        and n // (2 * s) >= AUX_MIN_ROWS
        and n_local % (2 * s) == 0
        and rows_per_pass % (2 * s) == 0
    ):
        s *= 2
    return s


def centred_mean_square(rows: Tensor) -> Tensor:
    """Σ|row − mean|² / N over the batch; under torchrun, over every rank's rows together."""
    from workbench.distributed import all_reduce_sum, world_size

    world = world_size()
    if world == 1:
        return (rows - rows.mean(dim=0)).pow(2).sum(dim=-1).mean()
    n = rows.shape[0] * world
    total = all_reduce_sum(torch.cat([rows.sum(dim=0), rows.pow(2).sum().reshape(1)]))
    mean = total[:-1] / n
    return total[-1] / n - mean.pow(2).sum()


def relu_values(codes: SparseCodes) -> SparseCodes:
    return codes.with_values(codes.values.relu())


def drop_zeros(codes: SparseCodes) -> SparseCodes:
    """The same codes without their zero entries (as CSR)."""
    codes = codes.to_csr()
    keep = codes.values != 0
    if bool(keep.all()):
        return codes
    rows = codes.row_ids()[keep]
    return SparseCodes(
        codes.indices[keep], codes.values[keep], codes.n_latents, csr_offsets(rows, codes.n_rows)
    )


def gather_per_latent(parameter: Tensor, codes: SparseCodes) -> Tensor:
    """parameter[latent] for each entry of the codes, shaped like codes.values (differentiable).

    index_select, not `parameter[indices]`: the backward of advanced indexing accumulates with
    index_put_, whose CPU result changes with thread scheduling (ReLU/Gated weights differed run
    to run at 2 threads); index_select's backward is index_add_, deterministic."""
    return parameter.index_select(0, codes.flat_indices()).view_as(codes.values)


@torch.no_grad()
def geometric_median(
    points: Float[Tensor, "N d"], iterations: int = 64, tolerance: float = 1e-6
) -> Float[Tensor, " d"]:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points`."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved <= tolerance * median.norm().clamp_min(1.0):
            break
    return median
