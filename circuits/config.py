"""What `workbench circuits` runs: one config, its flags derived from it, saved in every circuit JSON
(as `"config"`), so `workbench circuits --config X.circuit.json` reruns the circuit to the same scores.

The names of methods and ablations live here (not beside their code) so that building the
command's flags imports no torch (checking a device or dtype name imports `workbench.devices`).
Files saved before `device` and `model_dtype` existed rerun with their defaults (auto, float32).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import ConfigError
from workbench.model_sources import BUILTIN_MODELS

METHODS = ("exact", "eap", "eap-ig", "eap-ig-activations", "acdc", "codes")
ABLATIONS = ("resample", "mean", "zero")


@dataclass(frozen=True)
class CircuitConfig:
    """The task, model, method and budgets of one circuit (or of `--benchmark`: methods, prompts)."""

    model: str = ""
    """A model spec; empty means demo (the ground-truth tasks bring their own model). Edge-level tasks
    need a GPT-2-architecture model; the real-model tasks run on any (e.g. gemma-3-270m)."""
    task: str = "induction"
    """induction, trained-induction, planted-induction, or-gate, and-gate, or-gate-saturated, or a task
    .json file (see circuits/catalog.py); or a real-model task, run at head level (circuits/heads.py):
    ioi, greater-than, repeat-tokens, repeat-name."""
    dictionary: tuple[str, ...] = ()
    """Dictionary folders (one per hook): a feature circuit of their latents and error terms."""
    features_per_hook: int = 10
    """Latents per hook in a feature circuit."""
    transcoders: tuple[str, ...] = ()
    """Transcoder folders (one per layer, or a folder holding one per layer): the attribution graph of
    --prompt through their features (circuits.graphs) instead of a task's circuit."""
    prompt: str = ""
    """The text an attribution graph traces (with --transcoders); BOS is prepended as the model does."""
    target: str = ""
    """The logit an attribution graph explains: a token string that is one token of the model's
    tokenizer (tried first), else a token id; empty means the top logits covering 95% probability
    (at most 10)."""
    node_threshold: float = 0.8
    """Attribution graph pruning: keep the nodes carrying this cumulative share of the influence on the
    targets (circuit-tracer's rule; the explorer can only tighten it)."""
    edge_threshold: float = 0.98
    """Attribution graph pruning: keep the edges carrying this cumulative share of the edge scores."""
    method: str = ""
    """exact, eap, eap-ig, eap-ig-activations, acdc or codes; empty means eap-ig (with --benchmark: a
    comma list, empty means all)."""
    ablation: str = "resample"
    """What an ablated edge carries: resample, mean or zero."""
    prompts: int = 32
    """Prompts in the task."""
    length: int = 33
    """Tokens per prompt."""
    steps: int = 8
    """Integration steps of EAP-IG (and of a feature circuit's attribution)."""
    edges: int = 0
    """Edges kept in the circuit (at head level, for the real-model tasks and non-GPT-2 models:
    nodes; codes keeps N heads and every MLP); 0 means the smallest circuit reaching
    --faithfulness."""
    faithfulness: float = 0.8
    """The faithfulness the default circuit reaches (in (0, 1]): the smallest prefix of the method's
    ranking whose circuit, the rest ablated, keeps this share of the model's task score."""
    seed: int = 0
    """Seed of the task's prompts."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N."""
    model_dtype: str = "float32"
    """The model's forward dtype: float32, bfloat16 (the usual choice on GPUs) or float16 (a --model
    only: the ground-truth tasks' hand-set models run in float32)."""

    def __post_init__(self):
        unknown = [m for m in self.method.split(",") if m not in METHODS] if self.method else []
        if unknown:
            raise ConfigError(f"unknown method {unknown[0]!r} (one of {', '.join(METHODS)})")
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"unknown ablation {self.ablation!r} (one of {', '.join(ABLATIONS)})")
        positive = dict(prompts=self.prompts, length=self.length, steps=self.steps)
        for name, value in {**positive, "features_per_hook": self.features_per_hook}.items():
            if value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.edges < 0:
            raise ConfigError(f"edges must be >= 0, got {self.edges}")
        if not 0 < self.faithfulness <= 1:
            raise ConfigError(f"faithfulness must be in (0, 1], got {self.faithfulness}")
        for name in ("node_threshold", "edge_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        from workbench.devices import MODEL_DTYPES, check_device_spec, check_dtype_name

        check_device_spec(self.device)
        check_dtype_name(self.model_dtype, MODEL_DTYPES, "model_dtype")


def config_json(config: CircuitConfig) -> dict:
    """`config` as saved in a circuit JSON: local paths (task file, dictionaries, transcoders, a model folder)
    made absolute, so the file reruns from any folder."""

    def absolute(spec: str) -> str:
        path = Path(spec).expanduser()
        return str(path.absolute()) if spec and path.exists() else spec

    model = config.model if config.model in BUILTIN_MODELS else absolute(config.model)  # built-ins come first
    task = absolute(config.task) if config.task.endswith(".json") else config.task
    dictionary = tuple(map(absolute, config.dictionary))
    transcoders = tuple(map(absolute, config.transcoders))
    saved = dataclasses.replace(
        config, model=model, task=task, dictionary=dictionary, transcoders=transcoders
    )
    saved_json = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(saved).items()}
    if not config.transcoders:  # a task's circuit: its config as before attribution graphs existed
        saved_json = {k: v for k, v in saved_json.items() if k not in GRAPH_FIELDS}
    return saved_json


GRAPH_FIELDS = ("transcoders", "prompt", "target", "node_threshold", "edge_threshold")
"""CircuitConfig fields only an attribution graph uses (left out of a task circuit's saved config)."""
