"""The built-in `demo` model: a small GPT-2 trained by `workbench demo-model train`.

Recipe: a byte-level BPE vocabulary trained with `tokenizers` on the corpus, a GPT-2
(pre-LayerNorm, learned positions, GELU MLP, tied embeddings) trained from a fixed seed with
AdamW, linear warm-up and cosine decay on the corpus's training windows; validation loss on
its held-out windows. The folder it writes (config.json, model.safetensors, tokenizer files,
training.json) is an ordinary HuggingFace folder, committed under workbench/assets/demo-model.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from workbench.corpus import iter_documents, token_windows
from workbench.errors import ConfigError
from workbench.files import write_json_atomic
from workbench.logs import JsonlLogger
from workbench.paths import assets_dir

END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class DemoModelConfig:
    """How the demo model is made; saved as training.json beside the weights."""

    corpus: str = "default"
    """Corpus spec to train the tokenizer and the model on."""
    vocab_size: int = 4096
    """BPE vocabulary size (including the end-of-text token)."""
    context_length: int = 128
    """Tokens per training window (BOS included); also the model's n_ctx."""
    d_model: int = 256
    """Residual stream width."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads per block."""
    batch_size: int = 32
    """Windows per optimizer step."""
    steps: int = 3000
    """Optimizer steps."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 200
    """Linear warm-up steps before cosine decay to 10% of the peak."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    eval_every: int = 250
    """Evaluate validation loss every this many steps."""
    seed: int = 0
    """Seeds initialisation and batch order."""
    out: str = ""
    """Output folder; empty means the packaged assets folder (workbench/assets/demo-model)."""

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        for name in (
            "vocab_size",
            "context_length",
            "d_model",
            "n_layers",
            "batch_size",
            "steps",
            "eval_every",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def upgrade_json(cls, obj: dict) -> dict:
        """A config saved before `lr` was renamed (issue 18; the committed model's training.json
        says `learning_rate`), in today's names."""
        return {("lr" if k == "learning_rate" else k): v for k, v in obj.items()}


def demo_model_dir() -> Path:
    return assets_dir() / "demo-model"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on `texts`, wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT
    )


def build_model(config: DemoModelConfig, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.context_length,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=4 * config.d_model,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(config.seed)
    return GPT2LMHeadModel(gpt2)


def lr_at(step: int, config: DemoModelConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats/token) over `windows`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = model(batch).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    model.train()
    return total / count


def _optimizer(model, config: DemoModelConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def _batch_order(n_train: int, config: DemoModelConfig) -> torch.Tensor:
    """Seeded epochs of shuffled window indices, concatenated, one row per step."""
    generator = torch.Generator().manual_seed(config.seed)
    needed = config.steps * config.batch_size
    epochs = [torch.randperm(n_train, generator=generator) for _ in range(math.ceil(needed / n_train))]
    return torch.cat(epochs)[:needed].view(config.steps, config.batch_size)


def train_demo_model(config: DemoModelConfig, progress: bool = True) -> dict:
    """Train tokenizer and model, write the folder atomically, return the training summary."""
    started = time.time()
    out = Path(config.out) if config.out else demo_model_dir()
    documents = list(iter_documents(config.corpus))
    tokenizer = train_tokenizer([d.text for d in documents], config.vocab_size)
    eos = tokenizer.eos_token_id
    windows = token_windows(
        documents,
        tokenizer,
        config.context_length,
        bos_id=eos,
        separator_ids=[eos],
        corpus_name=f"corpus {config.corpus!r}",
    )
    train, validation = windows.tokens[windows.split("train")], windows.tokens[windows.split("validation")]
    model = build_model(config, len(tokenizer))
    optimizer = _optimizer(model, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    history = []
    with JsonlLogger(staging / "training-log.jsonl") as log:
        bar = tqdm(_batch_order(len(train), config), desc="demo-model", disable=not progress)
        for step, rows in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            batch = train[rows]
            loss = model(batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            record = {"step": step + 1, "train_loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                record["validation_loss"] = mean_loss(model, validation)
                history.append({"step": step + 1, "validation_loss": record["validation_loss"]})
            log.log(**record)
    summary = _summary(config, model, tokenizer, windows, validation, history, time.time() - started)
    _write_folder(staging, out, model, tokenizer, summary)
    return summary


def greedy_sample(model, tokenizer, prompt: str = "ROMEO:", new_tokens: int = 60) -> str:
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    new_tokens = min(new_tokens, model.config.n_positions - ids.shape[1])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, 1:])


def _summary(config, model, tokenizer, windows, validation, history, seconds) -> dict:
    n_train = int((~windows.is_validation).sum())
    return {
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_windows": n_train,
        "validation_windows": len(validation),
        "train_tokens_seen": config.steps * config.batch_size * config.context_length,
        "epochs": config.steps * config.batch_size / n_train,
        "final_validation_loss": history[-1]["validation_loss"],
        "validation_history": history,
        "greedy_sample": greedy_sample(model, tokenizer),
        "train_seconds": round(seconds, 1),
        "torch_version": torch.__version__,
    }


def _write_folder(staging: Path, out: Path, model, tokenizer, summary: dict) -> None:
    """Fill the staging folder, then swap it into place so `out` is never half-written."""
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_json_atomic(staging / "training.json", summary)
    for path in [staging, *staging.iterdir()]:  # mkdtemp and some writers make owner-only modes
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def read_training_summary(folder: Path | None = None) -> dict:
    return json.loads(((folder or demo_model_dir()) / "training.json").read_text())
