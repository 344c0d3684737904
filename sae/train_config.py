"""How to train: the data, the grid of dictionaries trained in one pass, the optimizer schedule."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar

from sae.config import DictionaryConfig
from workbench.devices import MATMUL_DTYPES, check_device_spec, check_dtype_name
from workbench.errors import ConfigError

FORMAT_VERSION = 3
"""Saved train configs: 3 names the grid's fields `architectures` and `n_latents` (2 and 1 said
`arch` and `latents`); 2 nests the dictionaries' coefficients under "dictionary", 1 (or no
format_version) had them at the top level. Every version is still read (`TrainConfig.upgrade_json`);
fields added since a file was written (device, matmul_dtype) read as their defaults."""

RENAMED_IN_3 = {"arch": "architectures", "latents": "n_latents"}
"""Fields renamed in format_version 3 (issue 18: one word per concept): old name -> new name."""


@dataclass(frozen=True)
class TrainConfig:
    """Saved beside the run; `workbench train --config RUN/config.json` trains it again."""

    NESTED_NOT_FLAGS: ClassVar[dict[str, tuple[str, ...]]] = {
        "dictionary": ("architecture", "d_in", "n_latents", "k", "d_out")
    }
    """Fields of a nested config that the grid sets per dictionary: neither flags nor saved
    (d_out: the width of --out-hook in the cache)."""
    FLAG_ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {
        "architectures": ("--arch",),
        "hook": ("--in-hook",),
    }
    """`--arch` is the field's short flag (and the one the docs use); `--in-hook` names a
    transcoder's input."""
    OMITTED_WHEN_DEFAULT: ClassVar[tuple[str, ...]] = ("out_hook", "transcoder_layers", "cross_layer")
    """Transcoder fields left out of an SAE run's saved config (so its files read as before)."""

    cache: str = ""
    """Activation cache folder; empty means the default cache (built first if absent)."""
    hook: str = ""
    """Hook to train on (a transcoder's input, --in-hook); empty means the cache's first hook."""
    out_hook: str = ""
    """Transcoders: the hook to predict from --hook's rows at the same tokens (both in the cache,
    e.g. blocks.0.ln2.hook_normalized -> blocks.0.hook_mlp_out); empty trains SAEs of --hook."""
    transcoder_layers: tuple[str, ...] = ()
    """Transcoders of these layers' MLPs (numbers, comma lists, or all): each reads and writes the
    hooks the model adapter maps to its MLP input and output (`Model.mlp_hooks`), one run per
    layer under runs/transcoder-<in hook>; instead of --hook/--out-hook."""
    cross_layer: bool = False
    """Train one cross-layer transcoder (sae.crosslayer) over the --transcoder-layer layers
    instead of one transcoder per layer."""
    architectures: tuple[str, ...] = ("topk",)
    """Architectures to train, all in one read of the cache (with every --k and --expansion)."""
    k: tuple[int, ...] = (32,)
    """Active latents per token (one dictionary per value)."""
    expansion: tuple[int, ...] = (8,)
    """n_latents = expansion * d_in (one dictionary per value); ignored when --n-latents is set."""
    n_latents: int = 0
    """Dictionary width; 0 means expansion * d_in."""
    codes: int = 0
    """codebook: number of codes (its width); 0 means as --n-latents / --expansion."""
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    """Every dictionary of the grid: its coefficients (flags of their own names, e.g. --aux-k);
    the grid sets architecture, d_in, n_latents and k."""
    tokens: int = 0
    """Training tokens; 0 means one pass over the cache (BOS rows are skipped)."""
    batch_size: int = 0
    """Tokens per step; 0 means auto: the largest power of two in [256, 4096] that gives
    at least 2,000 steps (`auto_batch_size`)."""
    lr: float = 0.0
    """Adam learning rate; 0 means 2e-4 / sqrt(n_latents / 2**14)."""
    warmup_steps: int = -1
    """Linear learning-rate warm-up; -1 means min(1000, 5% of the steps)."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to 0."""
    clip_grad: float = 1.0
    """Gradient-norm clip per dictionary; 0 disables it."""
    dead_after_tokens: int = 0
    """A latent that has not fired for this many tokens is dead (AuxK, dead %);
    0 means min(10M, tokens / 10)."""
    starving_below: float = 0.0
    """AuxK also trains latents whose running firing rate is below this fraction of the mean rate
    (0: dead latents only)."""
    resample_every: int = 50
    """Steps between resamplings of latents that do not earn their place (see sae.resample); 0 disables it."""
    resample_until: float = 0.95
    """Fraction of training after which no more resampling happens."""
    resample_below: float = 0.02
    """A latent whose firing rate since the last resampling is below this fraction of the mean rate
    (k / n_latents) is resampled."""
    resample_duplicate_cosine: float = 1.0
    """A latent whose decoder row has this cosine with a busier latent's is resampled
    (1 disables: it costs an n_latents^2 matrix)."""
    seed: int = 0
    """Seeds initialisation and the data order."""
    checkpoint_every: int = 0
    """Steps between checkpoints (resume with the same command); 0 means 10 per run."""
    log_every: int = 10
    """Steps between metric records in each dictionary's log.jsonl."""
    wandb: bool = False
    """Also log to Weights & Biases (offline unless WANDB_MODE / an API key says otherwise)."""
    wandb_project: str = "workbench"
    """W&B project name."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N.
    Not part of the run's identity: a run checkpointed on one device resumes on another."""
    matmul_dtype: str = "float32"
    """The encoders' selection matmul: float32, or bfloat16 (faster on GPUs; the selected values,
    the gradients, the weights and the optimizer stay float32)."""
    out: str = ""
    """Output folder (one sub-folder per dictionary); empty means runs/sae-<hook>
    (runs/transcoder-<hook> for a transcoder)."""

    def __post_init__(self):
        for name in ("architectures", "k", "expansion"):  # TrainConfig(k=8) means k=(8,)
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                object.__setattr__(self, name, (value,))
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{item.name} must be finite, got {value}")
        check_device_spec(self.device)
        check_dtype_name(self.matmul_dtype, MATMUL_DTYPES, "matmul_dtype")
        if not self.architectures or not self.k or not self.expansion:
            raise ConfigError("--arch, --k and --expansion need at least one value")
        if not isinstance(self.dictionary, DictionaryConfig):
            raise ConfigError(f"dictionary must be a DictionaryConfig, got {type(self.dictionary).__name__}")
        template = DictionaryConfig()
        for name in self.NESTED_NOT_FLAGS["dictionary"]:
            if getattr(self.dictionary, name) != getattr(template, name):
                raise ConfigError(
                    f"dictionary.{name} is set per dictionary by the grid "
                    "(--arch, --k, --expansion, --n-latents); leave it at its default"
                )
        positive = {"log_every": self.log_every}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        non_negative = {
            "batch_size": self.batch_size,
            "tokens": self.tokens,
            "n_latents": self.n_latents,
            "codes": self.codes,
            "lr": self.lr,
            "clip_grad": self.clip_grad,
            "dead_after_tokens": self.dead_after_tokens,
            "checkpoint_every": self.checkpoint_every,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if any(v <= 0 for v in (*self.k, *self.expansion)):
            raise ConfigError("--k and --expansion values must be positive")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.dictionary.skip and not (self.out_hook or self.transcoder_layers):
            raise ConfigError(
                "--skip adds a transcoder's skip connection: give --out-hook or --transcoder-layer"
            )
        if self.out_hook and self.transcoder_layers:
            raise ConfigError("give --transcoder-layer or --hook/--out-hook, not both")
        if self.out_hook and "codebook" in self.architectures:
            raise ConfigError("codebook dictionaries cannot be transcoders (drop codebook from --arch)")
        if len(set(self.grid())) != len(self.grid()):
            raise ConfigError("the grid of --arch, --k and --expansion repeats a dictionary")

    def grid(self) -> list[tuple[str, int, int]]:
        """(architecture, k, expansion) of every dictionary this run trains."""
        expansions = (0,) if self.n_latents else self.expansion
        return list(itertools.product(self.architectures, self.k, expansions))

    def dictionary_config(
        self, architecture: str, k: int, expansion: int, d_in: int, d_out: int = 0
    ) -> DictionaryConfig:
        """The config of one dictionary of the grid: the `dictionary` template with its sizes
        (`d_out` > 0: a transcoder to that width)."""
        n_latents = (
            (self.codes if architecture == "codebook" and self.codes else 0)
            or self.n_latents
            or expansion * d_in
        )
        if k > n_latents:
            raise ConfigError(f"k={k} exceeds the dictionary width {n_latents}")
        return replace(
            self.dictionary, architecture=architecture, d_in=d_in, n_latents=n_latents, k=k, d_out=d_out
        )

    def for_one(self, architecture: str, k: int, expansion: int) -> "TrainConfig":
        """This config narrowed to one dictionary of its grid (saved in that dictionary's folder)."""
        if self.n_latents:
            return replace(self, architectures=(architecture,), k=(k,))
        return replace(self, architectures=(architecture,), k=(k,), expansion=(expansion,))

    def name_of(self, architecture: str, k: int, expansion: int) -> str:
        """The folder name of one dictionary of the grid: <architecture>-k<k>-x<expansion>
        (or -m<n_latents>, -c<codes>)."""
        if architecture == "codebook" and self.codes:
            width = f"c{self.codes}"
        else:
            width = f"m{self.n_latents}" if self.n_latents else f"x{expansion}"
        return f"{architecture}-k{k}-{width}"

    def lr_for(self, n_latents: int) -> float:
        """The learning rate of a dictionary of width `n_latents`: `lr`, or its default."""
        return self.lr or 2e-4 / math.sqrt(n_latents / 2**14)

    def to_json(self) -> dict:
        obj = {"format_version": FORMAT_VERSION, **asdict(self)}
        obj["dictionary"] = {
            k: v for k, v in self.dictionary.to_json().items() if k not in self.NESTED_NOT_FLAGS["dictionary"]
        }
        for name in self.OMITTED_WHEN_DEFAULT:
            if not getattr(self, name):
                obj.pop(name)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in obj.items()}

    @classmethod
    def upgrade_json(cls, obj: dict) -> dict:
        """A saved train config of any format_version, in this version's shape (without
        format_version). Version 1 (format_version 1 or none) kept the dictionary fields flat;
        versions 1 and 2 named two fields as `RENAMED_IN_3`'s keys."""
        version = obj.get("format_version", 1)
        if version not in (1, 2, FORMAT_VERSION):
            raise ConfigError(
                f"unknown train config format_version {version!r} "
                f"(this workbench reads 1 to {FORMAT_VERSION})"
            )
        obj = {k: v for k, v in obj.items() if k != "format_version"}
        if version == 1:
            grid_set = cls.NESTED_NOT_FLAGS["dictionary"]
            nested = [f.name for f in fields(DictionaryConfig) if f.name not in grid_set]
            obj["dictionary"] = {name: obj.pop(name) for name in nested if name in obj}
        if version < 3:
            obj = {RENAMED_IN_3.get(k, k): v for k, v in obj.items()}
        return obj

    @classmethod
    def from_json(cls, obj: dict) -> "TrainConfig":
        """Read `to_json`'s output (or a format_version 1 file); missing fields take their defaults."""
        values = cls.upgrade_json(obj)
        nested = values.pop("dictionary", {})
        allowed = {f.name for f in fields(DictionaryConfig)} - set(cls.NESTED_NOT_FLAGS["dictionary"])
        if not isinstance(nested, dict) or set(nested) - allowed:
            raise ConfigError(
                f"train config: 'dictionary' must be an object of {sorted(allowed)}, got {nested!r}"
            )
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        try:
            return cls(**values, dictionary=DictionaryConfig.from_json(nested))
        except TypeError as exc:
            raise ConfigError(f"train config: {exc}") from None


AUTO_BATCH_RANGE = (256, 4096)
AUTO_BATCH_MIN_STEPS = 2000


def auto_batch_size(tokens: int) -> int:
    """The largest power of two in [256, 4096] that leaves at least 2,000 steps for `tokens`.

    Measured (issue 16): a 2M-token run at batch 4,096 (488 steps) recovers planted features
    at MCC 0.64, at 1,024 (1,953 steps) 0.88, at 512 0.90; the demo's TopK FVU goes 0.163 ->
    0.122 -> 0.110 -> 0.102 at 256 (no resampling). Long runs keep 4,096 (the GPU-friendly size)."""
    low, high = AUTO_BATCH_RANGE
    size = high
    while size > low and tokens // size < AUTO_BATCH_MIN_STEPS:
        size //= 2
    return size


def lr_at(step: int, total: int, base: float, warmup: int, decay_fraction: float) -> float:
    """Linear warm-up over `warmup` steps, constant, then linear decay to 0 over the last
    `decay_fraction` of the steps."""
    scale = 1.0
    if warmup > 0 and step < warmup:
        scale = (step + 1) / warmup
    decay_steps = int(total * decay_fraction)
    if decay_steps > 0 and step >= total - decay_steps:
        scale = min(scale, (total - step) / decay_steps)
    return base * scale
