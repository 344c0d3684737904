"""TokFSM (Tamkin et al. 2023): ground truth for codebook features.

A random finite-state machine with S states; each state has `out_degree` successors chosen at
random and is written as its number in `digits` decimal digits, one token per digit. A
sequence is a random walk written out digit by digit after BOS, so a model must infer the
state from several tokens. A small GPT-2 trained on such sequences (with this project's own
recipe) gets a codebook inserted at a hook; each state's best code (by F1 over token
positions) is scored by precision (of positions where the code is active, the share in that
state) and recall. The model's training, the fine-tuning and the scoring pass run on
`--device` (the sequences are drawn on the host, the same on any device).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.devices import MODEL_DTYPES, check_device_spec, check_dtype_name, resolve_device
from workbench.errors import ConfigError

BOS = 10  # token ids 0-9 are the digits


@dataclass(frozen=True)
class FSMConfig:
    """A random finite-state machine and the length of the walks sampled from it."""

    states: int = 100
    """States of the machine."""
    out_degree: int = 10
    """Successors of each state (chosen at random)."""
    digits: int = 2
    """Decimal digits (tokens) that spell a state."""
    steps_per_sequence: int = 31
    """States in a sampled walk (each written in `digits` tokens after BOS)."""
    seed: int = 0
    """Seed of the successor table (and of the model and codebook the benchmark trains)."""


@dataclass(frozen=True)
class CodebookBenchConfig:
    """What `workbench bench codebook` runs (its flags derive from it; the machine is `bench_fsm`)."""

    states: int = 12
    """FSM states."""
    codes: int = 96
    """Codes in the codebook."""
    model_steps: int = 1200
    """Training steps of the FSM model."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N."""
    model_dtype: str = "float32"
    """The model's forward dtype: float32, bfloat16 (the usual choice on GPUs) or float16."""

    def __post_init__(self):
        check_device_spec(self.device)
        check_dtype_name(self.model_dtype, MODEL_DTYPES, "model_dtype")
        if min(self.states, self.codes, self.model_steps) <= 0:
            raise ConfigError("states, codes and model_steps must be positive")


def bench_fsm(config: CodebookBenchConfig) -> FSMConfig:
    """The benchmark's machine: `states` states, 3 successors each, walks of 15 states."""
    digits = len(str(config.states - 1))
    return FSMConfig(states=config.states, out_degree=3, digits=digits, steps_per_sequence=15)


class TokFSM:
    def __init__(self, config: FSMConfig):
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        self.successors = torch.stack(
            [
                torch.randperm(config.states, generator=generator)[: config.out_degree]
                for _ in range(config.states)
            ]
        )
        powers = 10 ** torch.arange(config.digits - 1, -1, -1)
        self.spelling = (torch.arange(config.states)[:, None] // powers) % 10  # [S, digits]

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """(tokens [n, 1 + steps * digits] with BOS first, state of every position [same], -1 at BOS)."""
        c = self.config
        generator = torch.Generator().manual_seed(seed)
        state = torch.randint(0, c.states, (n,), generator=generator)
        walk = [state]
        for _ in range(c.steps_per_sequence - 1):
            choice = torch.randint(0, c.out_degree, (n,), generator=generator)
            state = self.successors[state, choice]
            walk.append(state)
        states = torch.stack(walk, dim=1)  # [n, steps]
        tokens = self.spelling[states].reshape(n, -1)
        per_position = states.repeat_interleave(c.digits, dim=1)
        bos = torch.full((n, 1), BOS)
        return torch.cat([bos, tokens], dim=1), torch.cat([torch.full((n, 1), -1), per_position], dim=1)


def train_fsm_model(
    fsm: TokFSM,
    folder: Path,
    *,
    d_model: int = 32,
    n_layers: int = 2,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> float:
    """Train a small GPT-2 on the FSM's sequences on `device` (initialised on the host) and save
    it (with a digit tokenizer) as a HF folder that `load_model` opens; return its final
    next-token loss on fresh sequences."""
    from transformers import GPT2Config, GPT2LMHeadModel

    length = 1 + fsm.config.steps_per_sequence * fsm.config.digits
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=11,
            n_positions=length,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=4,
            n_inner=4 * d_model,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=BOS,
            eos_token_id=BOS,
        )
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        tokens = fsm.sample(batch_size, seed=seed * 100_003 + step)[0].to(device)
        logits = model(tokens).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _digit_tokenizer().save_pretrained(folder)
    with torch.no_grad():
        tokens = fsm.sample(256, seed=10**9 + seed)[0].to(device)
        logits = model(tokens).logits
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1)))


def _digit_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(10)} | {"<bos>": BOS}
    core = Tokenizer(WordLevel(vocab, unk_token="<bos>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<bos>", unk_token="<bos>", pad_token="<bos>"
    )


def code_state_scores(active: Tensor, states: Tensor, n_states: int) -> list[dict]:
    """For each state, its best code by F1: precision and recall over token positions.
    active: bool [positions, codes]; states: [positions] (state of each position)."""
    active = active.float()
    in_state = F.one_hot(states, n_states).float()  # [P, S]
    both = in_state.t() @ active  # [S, C]: positions in state s with code c active
    code_count = active.sum(0).clamp_min(1)  # [C]
    state_count = in_state.sum(0).clamp_min(1)  # [S]
    precision = both / code_count
    recall = both / state_count[:, None]
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    best = f1.argmax(dim=1)
    rows = torch.arange(n_states)
    return [
        {
            "state": int(s),
            "code": int(best[s]),
            "precision": float(precision[s, best[s]]),
            "recall": float(recall[s, best[s]]),
        }
        for s in rows.tolist()
    ]


def last_digit_mask(n_sequences: int, length: int, digits: int) -> Tensor:
    """bool [n * (length - 1)]: the non-BOS positions that end a state's spelling (where the
    state is fully written, so the model can know it)."""
    return (torch.arange(length - 1) % digits == digits - 1).repeat(n_sequences)


def run_tokfsm_benchmark(
    fsm_config: FSMConfig = FSMConfig(states=12, out_degree=3, digits=2, steps_per_sequence=15),
    *,
    model_steps: int = 1200,
    codes: int = 96,
    k: int = 1,
    finetune_steps: int = 200,
    folder: Path | None = None,
    progress: bool = False,
    device: str = "auto",
    model_dtype: str = "float32",
) -> dict:
    """Train a model on the FSM, fine-tune a codebook into its last residual stream, score codes
    against states at state-final positions on fresh sequences; on `device`, the fine-tuned
    model's forward in `model_dtype`. Raises DeviceError for a device this machine lacks."""
    import tempfile

    from sae.codebook_finetune import FinetuneConfig, finetune_codebook
    from workbench.models import load_model

    where = resolve_device(device)
    fsm = TokFSM(fsm_config)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = folder or Path(scratch) / "tokfsm-model"
        model_loss = train_fsm_model(fsm, model_dir, steps=model_steps, seed=fsm_config.seed, device=where)
        model = load_model(str(model_dir), device=where, dtype=model_dtype)
        hook = f"blocks.{model.n_layers - 1}.hook_resid_post"
        tokens, _ = fsm.sample(512, seed=5)
        config = FinetuneConfig(
            codes=codes, k=k, steps=finetune_steps, batch_size=32, lr=3e-3, seed=fsm_config.seed
        )
        codebook, losses = finetune_codebook(model, hook, tokens, config, progress=progress)
        test_tokens, test_states = fsm.sample(256, seed=77)
        acts = model.run_with_cache(test_tokens, [hook])[hook][:, 1:].reshape(-1, codebook.d_in)
    active = (codebook.encode(acts).to_dense() > 0).cpu()
    keep = last_digit_mask(len(test_tokens), test_tokens.shape[1], fsm_config.digits)
    rows = code_state_scores(active[keep], test_states[:, 1:].reshape(-1)[keep], fsm_config.states)
    precise = sum(r["precision"] >= 0.9 for r in rows)
    return {
        "states": fsm_config.states,
        "codes": codes,
        "k": k,
        "model_loss": model_loss,
        **losses,
        "states_with_precision_0.9": precise,
        "mean_precision": sum(r["precision"] for r in rows) / len(rows),
        "mean_recall": sum(r["recall"] for r in rows) / len(rows),
        "per_state": rows,
    }
