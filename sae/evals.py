"""Evaluate a dictionary on held-out text: reconstruction, sparsity, and what splicing it into
the model costs.

Windows come from the validation split of the corpus the cache was built from (never trained
on); the model runs on them once clean and once each with the hook's activation replaced (BOS
position untouched) by: the dictionary's reconstruction, zeros, and the eval-set mean.
Reported (over non-BOS positions):
    mse          mean squared error per element;  fvu = sum |x - x_hat|^2 / sum |x - mean(x)|^2
    explained_variance = 1 - fvu;  l0 = active latents per token;  dead_fraction = latents that
    never fire on the eval set;  log_density_histogram = counts of log10(firing frequency)
    relative_reconstruction_bias = E|x_hat|^2 / E<x_hat, x> (Rajamanoharan et al. 2024; < 1: shrinkage)
    ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean), and with mean ablation
    kl_score = (KL_zero - KL_sae) / KL_zero, KL(clean || patched) per position, and with mean ablation
    sparse_probing_latents / _neurons: mean held-out balanced accuracy of k-sparse probes (k = 1)
    over the built-in probing tasks (`sae.probe_tasks`), on latents vs on the hook's neurons
    of the first eval windows (as SAEBench compares dictionaries)
Everything runs on the model's device (`--device`; the dictionary is moved there, a given
model is used where it is); the sums are float64 there and the numbers returned are Python's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from sae.base import Dictionary, DictionaryError
from sae.splicing import capture, hook_of, on_device, replace_activation, splice
from workbench.devices import MODEL_DTYPES, check_device_spec, check_dtype_name, resolve_device
from workbench.errors import ConfigError

DENSITY_BINS = torch.arange(-8.0, 0.01, 0.5)


@dataclass(frozen=True)
class EvalConfig:
    tokens: int = 32_768
    """Validation tokens to evaluate on (whole windows)."""
    batch_size: int = 16
    """Windows per forward pass."""
    model: str = ""
    """Model spec; empty means the one the dictionary was trained on."""
    corpus: str = ""
    """Corpus spec; empty means the dictionary's."""
    hook: str = ""
    """Hook; empty means the dictionary's."""
    context_length: int = 0
    """Tokens per window; 0 means the dictionary's."""
    probe_k: int = 1
    """Sparse probing on latents vs neurons (built-in tasks) with k features; 0 skips it."""
    probe_tokens: int = 8192
    """Tokens of the eval set the probes use (latents are held densely)."""
    cache: str = ""
    """Score on this cache's rows instead of held-out text (its held-out rows if made with --from,
    else all non-BOS rows); empty means held-out text, or the dictionary's own cache when it
    records no model."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N."""
    model_dtype: str = "float32"
    """The model's forward dtype: float32, bfloat16 (the usual choice on GPUs) or float16."""
    together: bool = False
    """Transcoders: evaluate every RUN's transcoder in place of its MLP at once, in one pass
    (automatic when the RUNs are transcoders of distinct layers of one model; see
    sae.transcoder_evals)."""

    def __post_init__(self):
        check_device_spec(self.device)
        check_dtype_name(self.model_dtype, MODEL_DTYPES, "model_dtype")


def evaluate(
    dictionary: Dictionary, config: EvalConfig = EvalConfig(), model=None, progress: bool = True
) -> dict:
    """The metrics of the module docstring on held-out text, run on `model` (default: the
    config's or dictionary's model, loaded on `config.device` in `config.model_dtype`) where it
    is, with the dictionary (or a copy of it) there; `evaluate_rows` when scoring a cache.
    Raises DictionaryError, DeviceError (a device this machine lacks), UnknownModelError."""
    from workbench.models import load_model

    meta = dictionary.meta
    hook = hook_of(dictionary, config.hook or None)
    spec = config.model or meta.get("model")
    if config.cache or (model is None and not spec):
        if config.model_dtype != "float32":  # as circuits refuses it for tasks with a model of their own
            raise ConfigError(f"eval on cache rows runs no model; drop --model-dtype {config.model_dtype}")
        return evaluate_rows(dictionary, config, progress)
    if model is None:
        model = load_model(spec, device=resolve_device(config.device), dtype=config.model_dtype)
    if dictionary.is_transcoder:  # FVU of its MLP's output, CE / KL with that MLP replaced
        from sae.transcoder_evals import evaluate_transcoders

        if config.hook and config.hook != meta.get("hook"):
            raise DictionaryError(
                f"a transcoder reads {meta.get('hook')} and writes {meta.get('out_hook')}; "
                f"--hook {config.hook} cannot move it: drop --hook"
            )

        joint = evaluate_transcoders([dictionary], config, model, progress)
        own = joint.pop("transcoders")[0]
        return {**own, **joint}
    windows = validation_windows(config, meta, model)
    dictionary = on_device(dictionary, model.device).eval()
    with torch.no_grad():
        mean = _mean_activation(model, hook, windows, config.batch_size)
        totals = _Totals(dictionary.n_latents, model.device)
        probe_rows = _ProbeRows(config.probe_tokens if config.probe_k else 0)
        for start in tqdm(
            range(0, len(windows), config.batch_size), disable=not progress, desc="eval", unit="batch"
        ):
            _evaluate_batch(
                model, dictionary, hook, windows[start : start + config.batch_size], mean, totals, probe_rows
            )
    metrics = {
        "hook": hook,
        "model": spec,
        "corpus": config.corpus or meta.get("corpus") or "default",
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        **totals.metrics(),
    }
    if config.probe_k:
        metrics.update(probe_rows.metrics(windows, model.tokenizer, config.probe_k))
    return metrics


def validation_windows(config: "EvalConfig", meta: dict, model) -> Tensor:
    """The token windows [n, context] an eval scores: `config.tokens` tokens of the validation split
    of the config's (else the dictionary's recorded, else the default) corpus, at the config's or
    the recorded context length. `meta`: the (first) dictionary's meta."""
    from workbench.activations import CacheConfig, select_windows

    cache_config = CacheConfig(
        model=config.model or meta.get("model") or "demo",
        corpus=config.corpus or meta.get("corpus") or "default",
        split="validation",
        tokens=config.tokens,
        context_length=config.context_length or int(meta.get("context_length") or 0),
    )
    return select_windows(cache_config, model)


def evaluate_rows(dictionary: Dictionary, config: EvalConfig = EvalConfig(), progress: bool = True) -> dict:
    """Reconstruction metrics on cache rows alone (no model): mse, fvu, explained_variance, l0,
    dead_fraction, log_density_histogram, relative_reconstruction_bias over up to `config.tokens`
    rows of `config.cache` (default: the dictionary's own): the rows held out at import for a
    cache made with --from, else every non-BOS row, on `config.device`. Raises DictionaryError if
    there is none, DeviceError for a device this machine lacks."""
    from workbench.cache_reader import ActivationCache

    if dictionary.is_transcoder:
        raise DictionaryError(
            "a transcoder is evaluated with its model (FVU of the MLP output, CE/KL); drop --cache"
        )
    device = resolve_device(config.device)
    where = config.cache or dictionary.meta.get("cache")
    if not where:
        raise DictionaryError("this dictionary records neither a model nor a cache; pass --model or --cache")
    cache = ActivationCache(where)
    hook = hook_of(dictionary, config.hook or None)
    cache.expect(hook=hook, width=dictionary.d_in)
    subset = "all" if cache.has_tokens else "held_out"
    totals = _Totals(dictionary.n_latents, device)
    dictionary = on_device(dictionary, device).eval()
    with torch.no_grad():
        for batch in tqdm(
            cache.batches(hook, 4096, shuffle=False, subset=subset),
            disable=not progress,
            desc="eval",
            unit="batch",
        ):
            x = batch.activations[: config.tokens - totals.n].to(device).float()
            codes = dictionary.encode(x)
            totals.add_reconstruction(x, dictionary.decode(codes), codes)
            if totals.n >= config.tokens:
                break
    if totals.n == 0:
        raise DictionaryError(
            f"{cache.path}: no {subset.replace('_', '-')} rows to evaluate on "
            "(import with --validation-fraction > 0)"
        )
    return {"hook": hook, "cache": str(cache.path), "rows": subset, **totals.reconstruction_metrics()}


def _mean_activation(model, hook: str, windows: Tensor, batch_size: int) -> Tensor:
    total, count = None, 0
    for start in range(0, len(windows), batch_size):
        act = model.run_with_cache(windows[start : start + batch_size], [hook])[hook][:, 1:]
        flat = act.reshape(-1, act.shape[-1]).double()
        total = flat.sum(0) if total is None else total + flat.sum(0)
        count += flat.shape[0]
    return (total / count).float()


def _evaluate_batch(
    model,
    dictionary: Dictionary,
    hook: str,
    tokens: Tensor,
    mean: Tensor,
    totals: "_Totals",
    probe_rows: "_ProbeRows",
) -> None:
    captured: list = []
    with model.hooks([capture(hook, captured)]):
        clean = model(tokens)
    act = captured[0][:, 1:]
    x = act.reshape(-1, dictionary.d_in).float()
    codes = dictionary.encode(x)
    x_hat = dictionary.decode(codes)
    totals.add_reconstruction(x, x_hat, codes)
    probe_rows.add(x, codes)
    with splice(model, dictionary, hook):
        spliced = model(tokens)
    with replace_activation(model, hook, torch.zeros_like(mean)):
        zeroed = model(tokens)
    with replace_activation(model, hook, mean):
        averaged = model(tokens)
    totals.add_logits(tokens, clean, {"sae": spliced, "zero": zeroed, "mean": averaged})


class _ProbeRows:
    """The first windows' neuron and (dense) latent rows, for sparse probing."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.neurons, self.latents, self.count = max_tokens, [], [], 0

    def add(self, x: Tensor, codes) -> None:
        if self.count < self.max_tokens:
            self.neurons.append(x)
            self.latents.append(codes.to_dense())
            self.count += x.shape[0]

    def metrics(self, windows: Tensor, tokenizer, k: int) -> dict:
        from sae.probes import probe_neurons_vs_latents

        if not self.neurons:
            return {}
        neurons, latents = torch.cat(self.neurons), torch.cat(self.latents)
        n_windows = neurons.shape[0] // (windows.shape[1] - 1)
        tasks = probe_neurons_vs_latents(
            windows[:n_windows], neurons, latents, lambda t: tokenizer.decode([t]), k
        )
        if not tasks:
            return {"sparse_probing": {"k": k, "tasks": {}}}
        mean = lambda key: sum(t[key] for t in tasks.values()) / len(tasks)  # noqa: E731
        return {
            "sparse_probing_latents": mean("latents"),
            "sparse_probing_neurons": mean("neurons"),
            "sparse_probing": {"k": k, "metric": "balanced_accuracy", "tasks": tasks},
        }


class _Totals:
    """Float64 running sums over the eval set (per-latent counts on `device`, the rest Python floats)."""

    def __init__(self, n_latents: int, device: torch.device):
        self.n = 0
        self.sums = {k: 0.0 for k in ("sq_err", "x", "x_sq", "xhat_sq", "xhat_x", "l0")}
        self.x_sum: Tensor | None = None
        self.fires = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.ce = {k: 0.0 for k in ("clean", "sae", "zero", "mean")}
        self.kl = {k: 0.0 for k in ("sae", "zero", "mean")}
        self.positions = 0

    def add_reconstruction(self, x: Tensor, x_hat: Tensor, codes) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sums["sq_err"] += float((x - x_hat).pow(2).sum())
        self.sums["x_sq"] += float(x.pow(2).sum())
        self.sums["xhat_sq"] += float(x_hat.pow(2).sum())
        self.sums["xhat_x"] += float((x_hat * x).sum())
        self.x_sum = x.sum(0) if self.x_sum is None else self.x_sum + x.sum(0)
        active = codes.flat_values() != 0
        self.sums["l0"] += float(active.sum())
        self.fires += torch.bincount(codes.flat_indices()[active], minlength=len(self.fires)).double()
        self.d = x.shape[1]

    def add_logits(self, tokens: Tensor, clean: Tensor, patched: dict[str, Tensor]) -> None:
        targets = tokens[:, 1:].reshape(-1).to(clean.device)
        clean_logp = F.log_softmax(clean[:, :-1].double(), dim=-1).reshape(targets.shape[0], -1)
        self.ce["clean"] += float(F.nll_loss(clean_logp, targets, reduction="sum"))
        for name, logits in patched.items():
            logp = F.log_softmax(logits[:, :-1].double(), dim=-1).reshape(targets.shape[0], -1)
            self.ce[name] += float(F.nll_loss(logp, targets, reduction="sum"))
            self.kl[name] += float((clean_logp.exp() * (clean_logp - logp)).sum())
        self.positions += targets.shape[0]

    def reconstruction_metrics(self) -> dict:
        if self.n == 0:
            raise DictionaryError("the eval set is empty")
        s, n, fires = self.sums, self.n, self.fires.cpu()  # torch.histogram runs on the CPU only
        variance = s["x_sq"] - float(self.x_sum.pow(2).sum()) / n
        fvu = s["sq_err"] / variance if variance > 0 else float("nan")
        density = fires / n
        alive = density[density > 0].log10().clamp(DENSITY_BINS[0].item(), 0)
        histogram = (
            torch.histogram(alive.float(), bins=DENSITY_BINS).hist
            if alive.numel()
            else torch.zeros(len(DENSITY_BINS) - 1)
        )
        return {
            "tokens": n,
            "mse": s["sq_err"] / (n * self.d),
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "l0": s["l0"] / n,
            "dead_fraction": float((fires == 0).double().mean()),
            "relative_reconstruction_bias": s["xhat_sq"] / s["xhat_x"] if s["xhat_x"] else float("nan"),
            "log_density_histogram": {
                "bin_edges": [round(float(b), 2) for b in DENSITY_BINS],
                "counts": [int(c) for c in histogram],
            },
        }

    def metrics(self) -> dict:
        ce = {k: v / self.positions for k, v in self.ce.items()}
        kl = {k: v / self.positions for k, v in self.kl.items()}
        return {
            **self.reconstruction_metrics(),
            "ce_clean": ce["clean"],
            "ce_sae": ce["sae"],
            "ce_zero_ablation": ce["zero"],
            "ce_mean_ablation": ce["mean"],
            "ce_loss_score": _score(ce["zero"], ce["sae"], ce["clean"]),
            "ce_loss_score_mean_ablation": _score(ce["mean"], ce["sae"], ce["clean"]),
            "kl_sae": kl["sae"],
            "kl_zero_ablation": kl["zero"],
            "kl_mean_ablation": kl["mean"],
            "kl_score": _score(kl["zero"], kl["sae"], 0.0),
            "kl_score_mean_ablation": _score(kl["mean"], kl["sae"], 0.0),
        }


def _score(baseline: float, patched: float, clean: float) -> float:
    """(baseline - patched) / (baseline - clean): 1 = as good as clean, 0 = as bad as ablating."""
    gap = baseline - clean
    return (baseline - patched) / gap if gap != 0 else float("nan")
