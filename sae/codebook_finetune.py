"""Codebook features inserted into a model and trained end to end with the language-modelling
loss (Tamkin et al. 2023): the hook's activation is replaced by the sum of its k most similar
codes; the model is frozen and the codes learn from the next-token loss of the whole network.
With `unfreeze`, the model's weights train too (at a tenth of the codes' learning rate; layers
before the hook learn through the straight-through gradient) and the fine-tuned model is saved
beside the codebook (`<out>/model`, which the codebook's folder then names as its model). The
codes start at k-means centres of the hook's activations, and unused or duplicated codes move to
badly reconstructed activations as in `sae.dictionaries.codebook`.

The codebook trains where the model is (`--device`; `--model-dtype bfloat16` runs the model's
forward in bf16 while the codes, their search and the loss stay float32); windows are drawn on
the host and the model moves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from sae.base import StepContext, create
from sae.config import DictionaryConfig
from sae.dictionaries.codebook import Codebook
from workbench.devices import MODEL_DTYPES, check_device_spec, check_dtype_name, resolve_device
from workbench.errors import ConfigError


@dataclass(frozen=True)
class FinetuneConfig:
    model: str = "demo"
    """Model spec."""
    hook: str = ""
    """Hook to insert the codebook at; empty means the model's default hook."""
    corpus: str = "default"
    """Corpus whose training windows feed the fine-tuning."""
    codes: int = 1024
    """Number of codes."""
    k: int = 8
    """Active codes per token."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Windows per step."""
    context_length: int = 0
    """Tokens per window; 0 means min(128, the model's n_ctx)."""
    lr: float = 1e-3
    """Adam learning rate of the codes."""
    seed: int = 0
    """Seeds the codes' start and the window order."""
    unfreeze: bool = False
    """Also fine-tune the model's weights (lr / 10) and save the fine-tuned model in <out>/model."""
    out: str = ""
    """Output folder; empty means runs/codebook-<hook>-c<codes>-k<k>."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N."""
    model_dtype: str = "float32"
    """The model's forward dtype: float32, bfloat16 (the usual choice on GPUs) or float16."""

    def __post_init__(self):
        check_device_spec(self.device)
        check_dtype_name(self.model_dtype, MODEL_DTYPES, "model_dtype")
        if min(self.codes, self.k, self.steps, self.batch_size) <= 0 or self.k > self.codes:
            raise ConfigError("codes, k, steps and batch_size must be positive, and k <= codes")


def insert_codebook(model, codebook: Codebook, hook: str, straight_through: bool = False):
    """A context manager: `model` runs with the hook's activation replaced by the codebook's
    output (all positions but BOS), differentiably in the codes (and, straight through, in the
    activation)."""

    def replace(activation: Tensor, hook=None) -> Tensor:
        x = activation[:, 1:].reshape(-1, codebook.d_in)
        x_hat = codebook.lookup(x.to(codebook.W_dec.dtype), straight_through)[0]
        return torch.cat([activation[:, :1], x_hat.view_as(activation[:, 1:]).to(activation.dtype)], dim=1)

    return model.hooks([(hook, replace)])


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy (float32, on the logits' device) of logits [B, T, V] for
    tokens [B, T] (any device)."""
    targets = tokens[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets)


def finetune_codebook(
    model, hook: str, windows: Tensor, config: FinetuneConfig, progress: bool = True
) -> tuple[Codebook, dict]:
    """Train a codebook at `hook` on `windows` [n, T] (any device) with the frozen model's
    next-token loss, on the model's device."""
    for param in model.bridge.parameters():
        param.requires_grad_(config.unfreeze)
    sample = model.run_with_cache(windows[: max(1, 4096 // windows.shape[1] + 1)], [hook])[hook][:, 1:]
    d = sample.shape[-1]
    codebook = create(
        DictionaryConfig(architecture="codebook", d_in=d, n_latents=config.codes, k=config.k),
        seed=config.seed,
    ).to(sample.device)
    codebook.initialize_from(sample.reshape(-1, d).float())
    groups = [{"params": list(codebook.parameters()), "lr": config.lr}]
    if config.unfreeze:
        groups.append(
            {"params": [p for p in model.bridge.parameters() if p.requires_grad], "lr": config.lr / 10}
        )
    optimizer = torch.optim.Adam(groups)
    order = torch.randint(
        0,
        len(windows),
        (config.steps, config.batch_size),
        generator=torch.Generator().manual_seed(config.seed),
    )
    history = []
    for step in tqdm(range(config.steps), disable=not progress, desc="codebook", unit="step"):
        tokens = windows[order[step]]
        with insert_codebook(model, codebook, hook, straight_through=config.unfreeze):
            loss = lm_loss(model(tokens), tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # dead / duplicate code replacement from this batch's activations
            x = model.run_with_cache(tokens[:4], [hook])[hook][:, 1:].reshape(-1, d).float()
            codebook.training_step(x, StepContext(None, step / config.steps))
            codebook.after_optimizer_step()
        history.append(float(loss.detach()))
    return codebook, {"lm_loss_first": history[0], "lm_loss_last": sum(history[-10:]) / len(history[-10:])}


class FinetuneResult(NamedTuple):
    folder: Path
    """The codebook's dictionary folder (and, with `unfreeze`, the fine-tuned model in `<folder>/model`)."""
    metrics: dict
    """LM loss: lm_loss_first / lm_loss_last (training), lm_loss_clean / lm_loss_with_codebook (held out)."""


def run_finetune(config: FinetuneConfig, progress: bool = True) -> FinetuneResult:
    """`workbench codebook-finetune`: windows of the corpus's train split, the codebook trained
    in the model, saved as a dictionary folder with the LM loss with and without it."""
    from sae import io
    from workbench.activations import CacheConfig, select_windows
    from workbench.models import load_model
    from workbench.paths import DEFAULT_RUNS_DIR

    device = resolve_device(config.device)
    model = load_model(config.model, device=device, dtype=config.model_dtype)
    hook = config.hook or model.default_hook
    model.check_hooks([hook])
    cache_config = CacheConfig(
        model=config.model,
        corpus=config.corpus,
        tokens=config.steps * config.batch_size * 128,
        context_length=config.context_length,
        seed=config.seed,
    )
    windows = select_windows(cache_config, model)
    codebook, losses = finetune_codebook(model, hook, windows, config, progress=progress)
    held_out = select_windows(
        CacheConfig(
            model=config.model,
            corpus=config.corpus,
            split="validation",
            tokens=8192,
            context_length=config.context_length,
        ),
        model,
    )
    with torch.no_grad():
        clean = float(lm_loss(model(held_out), held_out))
        with insert_codebook(model, codebook, hook):
            coded = float(lm_loss(model(held_out), held_out))
    out = (
        Path(config.out) if config.out else DEFAULT_RUNS_DIR / f"codebook-{hook}-c{config.codes}-k{config.k}"
    )
    metrics = {**losses, "lm_loss_clean": clean, "lm_loss_with_codebook": coded}
    model_spec = config.model
    if config.unfreeze:  # the codes only make sense with the weights they were trained with
        model_spec = save_hf_model(model, out / "model", held_out[:2])
    io.save(
        codebook,
        out,
        hook=hook,
        model=model_spec,
        corpus=config.corpus,
        context_length=int(windows.shape[1]),
        trained_in_model=True,
        metrics=metrics,
        finetune_config=_as_json(config),
    )
    return FinetuneResult(out, metrics)


def save_hf_model(model, folder, check_tokens: Tensor) -> str:
    """Save the bridge's (fine-tuned) HF model as a plain HF folder and check that it reloads
    to the same logits (reloaded on its device, in its dtype); return the folder as a model spec."""
    from transformers import AutoModelForCausalLM

    from workbench.errors import WorkbenchError
    from workbench.models import load_model

    hf_model = model.bridge.original_model
    plain = AutoModelForCausalLM.from_config(hf_model.config)
    # The bridge wraps each HF module ("<name>._original_component"); strip the wrappers.
    weights = {
        name.replace("._original_component", ""): t.detach().contiguous().clone()
        for name, t in hf_model.state_dict().items()
    }
    expected = plain.state_dict()
    missing = [n for n in expected if n not in weights and n != "lm_head.weight"]
    if missing:
        raise WorkbenchError(f"cannot save the fine-tuned model: no weights for {', '.join(missing[:3])}")
    plain.load_state_dict({n: weights[n] for n in expected if n in weights}, strict=False)
    plain.tie_weights()
    plain.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    reloaded = load_model(str(folder), device=model.device, dtype=model.dtype)
    with torch.no_grad():
        if not torch.allclose(reloaded(check_tokens), model(check_tokens), atol=1e-4, rtol=1e-4):
            raise WorkbenchError(
                f"{folder}: the saved fine-tuned model does not reproduce the trained one's logits"
            )
    return str(Path(folder).resolve())


def _as_json(config: FinetuneConfig) -> dict:
    from dataclasses import asdict

    return asdict(config)
