"""Build an activation cache: run a model over corpus windows and store activations at hooks.

Layout (format_version 1, documented in the README):
    OUT/manifest.json                    written last; its presence means "complete"
    OUT/tokens.safetensors               "tokens": [n_windows, context_length] int64
    OUT/<hook>/shard-NNNNN.safetensors   "activations": [rows, d] for windows_per_shard windows
Row r of a hook's concatenated shards is token position r % context_length of window
r // context_length. Every file is written to a temporary name and renamed; after each shard
(all hooks) `progress.json` records it with its sha256, so a killed run resumes from the last
complete shard. Shards and forward batches are aligned, so a resumed run computes exactly the
batches an uninterrupted one would and the bytes are identical (on the same machine).

On a GPU (`--device`) the model runs there, each batch's activations are cast to the storage
dtype on the device and copied to pinned host memory without blocking, and a shard is checked and
handed to the writer threads (three, so hashing and fsync keep up) only after the next shard's
forward passes are queued, so the device never waits for the host. On the CPU each shard is
computed, checked and handed to one writer thread in turn.
`--device` is where, not what: it is not part of the cache's identity (a cache started on one
device resumes on another); `--model-dtype` is (other than float32, the default, it changes the
activations).

Under torchrun, rank r computes the shards whose index ≡ r (mod world size) and records them
in `progress-rank{r}.json`; rank 0 writes the tokens first and the manifest last, after every
rank is done. The cache is the one a single process writes, byte for byte, and a partial run
resumes with any number of ranks (every progress file counts).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from workbench.cache_reader import FORMAT_VERSION, MANIFEST, PROGRESS, TOKENS_FILE, shard_path
from workbench.cache_shards import BackgroundWriter, Shard, forward_shard, forward_shard_on_device
from workbench.corpus import iter_documents, token_windows
from workbench.devices import MODEL_DTYPES, check_device_spec, check_dtype_name, is_cuda
from workbench.distributed import Ranks, barrier, ranks
from workbench.errors import CacheError, ConfigError
from workbench.files import read_json, remove_stale_temporaries, save_tensors_atomic, write_json_atomic
from workbench.paths import DEFAULT_RUNS_DIR

DEFAULT_CONTEXT = 128
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WRITER_THREADS_ON_DEVICE = 3
"""Shard writers behind a GPU (one on the CPU): hashing and fsync release the GIL, and one thread
can fall behind a GPU's forward passes."""


@dataclass(frozen=True)
class CacheConfig:
    """What to cache; saved in the manifest, and a rerun with the same config resumes."""

    model: str = "demo"
    """Model spec: demo, a local HF folder, gemma-3-270m, minilm, or a hub name."""
    hooks: tuple[str, ...] = ()
    """Hook points to store (several in one pass); empty means the middle residual stream."""
    corpus: str = "default"
    """Corpus spec: default, shakespeare, tiny-shakespeare, kjv, a .txt/.jsonl path, or hf:NAME."""
    split: str = "train"
    """Corpus split to cache: train or validation."""
    tokens: int = 1_000_000
    """Tokens to cache, rounded up to whole windows; 0 means the whole split."""
    context_length: int = 0
    """Tokens per window, BOS included; 0 means min(128, the model's n_ctx)."""
    dtype: str = "float32"
    """Storage dtype: float32, float16 or bfloat16."""
    model_dtype: str = "float32"
    """The model's forward dtype: float32, bfloat16 (the usual choice on GPUs) or float16."""
    batch_size: int = 32
    """Windows per forward pass."""
    shard_tokens: int = 65_536
    """Tokens per shard file (rounded down to whole batches of windows)."""
    seed: int = 0
    """Seeds which windows are taken and their order."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N."""
    validation_fraction: float = 0.02
    """Fraction of the corpus held out as the validation split
    (with --from: of the rows, held out for eval)."""
    out: str = ""
    """Output folder; empty means runs/cache-<model>-<corpus>-<split> (runs/cache-<file> with --from)."""
    from_activations: str = ""
    """Activations you bring instead of a model: FILE.npy, FILE.safetensors or a FOLDER of them,
    rows [N, d]; a cache without token windows (every row is taken, --validation-fraction of them
    held out for eval; see workbench.imported)."""

    FLAG_ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {"from_activations": ("--from",)}

    def __post_init__(self):
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.split not in ("train", "validation"):
            raise ConfigError(f"unknown split {self.split!r}; use train or validation")
        check_device_spec(self.device)
        check_dtype_name(self.model_dtype, MODEL_DTYPES, "model_dtype")
        for name in ("batch_size", "shard_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("tokens", "context_length"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    def context_for(self, model) -> int:
        """The window length for `model`: the configured one, or min(128, n_ctx) by default."""
        context = self.context_length or min(DEFAULT_CONTEXT, model.n_ctx)
        if context > model.n_ctx:
            raise CacheError(f"context length {context} exceeds model {model.spec!r}'s n_ctx {model.n_ctx}")
        if context < 2:
            raise CacheError(f"context length must be at least 2, got {context}")
        return context

    def windows_per_shard(self, context: int) -> int:
        batches = max(1, self.shard_tokens // (context * self.batch_size))
        return batches * self.batch_size

    def output_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        if self.from_activations:
            from workbench.imported import default_output_dir

            return default_output_dir(self.from_activations)
        slug = "-".join(_slug(part) for part in (self.model, self.corpus, self.split))
        return DEFAULT_RUNS_DIR / f"cache-{slug}"

    def identity(self) -> dict:
        """Everything that determines the cache's bytes (not where it is written, nor the device
        that computed them)."""
        fields = asdict(self)
        fields.pop("out")
        fields.pop("device")
        if fields["model_dtype"] == "float32":  # caches written before --model-dtype keep their identity
            fields.pop("model_dtype")
        if not fields["from_activations"]:  # caches written before --from existed keep their identity
            fields.pop("from_activations")
        fields["hooks"] = list(fields["hooks"])
        return fields


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in Path(text).name or text)[:40]


def select_windows(config: CacheConfig, model) -> torch.Tensor:
    """The [n, context_length] windows to cache: a seeded shuffle of the split, first n taken."""
    context = config.context_for(model)
    wanted = math.ceil(config.tokens / context) if config.tokens else None
    limit = None
    if wanted and config.corpus.startswith("hf:"):  # never stream a whole hub dataset
        limit = math.ceil(wanted / (1 - config.validation_fraction)) + 64
    windows = token_windows(
        iter_documents(config.corpus),
        model.tokenizer,
        context,
        model.bos_token_id,
        model.separator_token_ids,
        config.validation_fraction,
        limit,
        corpus_name=f"corpus {config.corpus!r}",
    )
    indices = windows.split(config.split)
    if len(indices) == 0:
        raise CacheError(f"corpus {config.corpus!r} has no {config.split} windows of {context} tokens")
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(config.seed))
    return windows.tokens[indices[order][:wanted]].contiguous()


def build_cache(config: CacheConfig, model=None, progress: bool = True) -> Path:
    """Write (or resume, or confirm complete) the cache `config` describes; return its folder."""
    if config.from_activations:
        from workbench.imported import import_activations, imported_config

        return import_activations(imported_config(config), progress)
    device = None
    if model is None:  # a device this machine lacks is a one-line error, even for a complete cache
        from workbench.devices import activate, resolve_device

        device = resolve_device(config.device)
        activate(device)  # under torchrun: this rank's GPU, before the process group is joined
    out = config.output_dir()
    state = _resume_state(out, config)
    if state == "complete":
        return out
    if model is None:
        from workbench.models import load_model

        model = load_model(config.model, device=device, dtype=config.model_dtype)
    hooks = list(config.hooks) or [model.default_hook]
    model.check_hooks(hooks)
    write_cache(out, config, model, hooks, select_windows(config, model), state, progress)
    return out


def write_cache(
    out: Path,
    config: CacheConfig,
    model,
    hooks: list[str],
    windows: torch.Tensor,
    state: dict | None = None,
    progress: bool = True,
) -> None:
    """Write the cache of `windows` into `out`, continuing from a progress record `state`. Under
    torchrun the ranks join their group on the model's device (NCCL on CUDA, gloo on the CPU)."""
    where = ranks(model.device)
    if where.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        _write_or_check_tokens(out, windows)
    barrier()
    done = state or {"config": config.identity(), "hooks": hooks, "shards": []}
    if done["hooks"] != hooks:
        raise CacheError(
            f"{out} holds a partial cache of hooks {done['hooks']}, not {hooks}; use another --out"
        )
    _write_shards(out, config, model, hooks, windows, done, progress and where.is_main, where)
    barrier()
    if where.is_main:
        merged = _progress_record(out, config) or done
        _write_manifest(out, config, model, hooks, windows, merged)
        for path in _progress_files(out):
            path.unlink(missing_ok=True)
    barrier()


def _progress_name(where: Ranks) -> str:
    return PROGRESS if where.world == 1 else f"progress-rank{where.rank}.json"


def _progress_files(out: Path) -> list[Path]:
    return sorted(p for p in [out / PROGRESS, *out.glob("progress-rank*.json")] if p.exists())


def _resume_state(out: Path, config: CacheConfig) -> dict | str | None:
    """'complete', the progress record of a partial run with this config, or None for a new run."""
    if (out / MANIFEST).exists():
        _check_identity(out, read_json(out / MANIFEST, "cache manifest", CacheError), config)
        return "complete"
    return _progress_record(out, config)


def _progress_record(out: Path, config: CacheConfig) -> dict | None:
    """Every progress file's shards (any number of ranks wrote them), merged by shard index."""
    files = _progress_files(out)
    if not files:
        return None
    shards: dict[int, dict] = {}
    record = None
    for path in files:
        record = read_json(path, "cache progress file", CacheError)
        _check_identity(out, record, config)
        for position, entry in enumerate(record.get("shards", [])):
            index = int(entry.get("index", position))  # files written before ranks recorded no index
            shards.setdefault(index, {**entry, "index": index})
    return {**record, "shards": [shards[i] for i in sorted(shards)]}


def _check_identity(out: Path, record: dict, config: CacheConfig) -> None:
    theirs = record.get("config", {})
    if theirs != config.identity():
        diff = sorted(
            k for k in set(theirs) | set(config.identity()) if theirs.get(k) != config.identity().get(k)
        )
        raise CacheError(
            f"{out} already holds a cache with a different configuration (differs in: {', '.join(diff)}); "
            "choose another --out or delete it"
        )


def _write_or_check_tokens(out: Path, windows: torch.Tensor) -> None:
    from safetensors.torch import load_file

    path = out / TOKENS_FILE
    if path.exists():
        try:
            same = torch.equal(load_file(path)["tokens"], windows)
        except Exception:
            same = False
        if same:
            return
    save_tensors_atomic(path, {"tokens": windows})


def _write_shards(out, config, model, hooks, windows, done, progress, where: Ranks = Ranks()) -> None:
    """Compute this rank's missing shards and write them on the writer thread. On a GPU shard i
    is handed over once shard i+1's forward passes are queued (`Shard`); on the CPU at once."""
    context = windows.shape[1]
    per_shard = config.windows_per_shard(context)
    n_shards = math.ceil(len(windows) / per_shard)
    finished = {e["index"] for e in done["shards"]}
    todo = [i for i in range(n_shards) if i not in finished and where.owns(i)]
    dtype = DTYPES[config.dtype]
    bar = tqdm(
        total=len(windows) * context,
        initial=len(finished) * per_shard * context,
        unit="tok",
        unit_scale=True,
        desc="cache",
        disable=not progress,
    )
    name = _progress_name(where)
    on_device = is_cuda(model.device)
    in_flight: list[tuple[int, Shard]] = []

    def hand_over(index: int, shard: Shard) -> None:
        acts = shard.finish(first_window=index * per_shard)
        writer.submit(lambda: _save_shard(out, index, acts, done, name, writer.lock))
        bar.update(shard.n_tokens * where.world)

    with BackgroundWriter(WRITER_THREADS_ON_DEVICE if on_device else 1) as writer:
        for index in todo:
            shard_windows = windows[index * per_shard : (index + 1) * per_shard]
            start = forward_shard_on_device if on_device else forward_shard
            in_flight.append((index, start(model, hooks, shard_windows, config.batch_size, dtype)))
            if len(in_flight) > int(on_device):
                hand_over(*in_flight.pop(0))
        for item in in_flight:
            hand_over(*item)
    bar.close()


def _save_shard(
    out: Path,
    index: int,
    acts: dict[str, torch.Tensor],
    done: dict,
    progress_name: str = PROGRESS,
    lock: threading.Lock | None = None,
) -> None:
    """Write one shard's files, then record it in the progress file (under `lock`: writer threads
    share `done`, and the file must never lose a shard another thread recorded)."""
    entry = {}
    for hook, x in acts.items():
        sha = save_tensors_atomic(out / shard_path(hook, index), {"activations": x})
        entry[hook] = {"file": shard_path(hook, index), "rows": x.shape[0], "sha256": sha}
    with lock or contextlib.nullcontext():
        done["shards"].append({"index": index, **entry})
        write_json_atomic(out / progress_name, done)


def _write_manifest(out, config, model, hooks, windows, done) -> None:
    from workbench.files import sha256_file

    n_windows, context = windows.shape
    n_shards = math.ceil(n_windows / config.windows_per_shard(context))
    if [e["index"] for e in done["shards"]] != list(range(n_shards)):
        raise CacheError(
            f"{out}: the progress files record {len(done['shards'])} of {n_shards} shards; rerun to finish"
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "workbench.activation_cache",
        "model": config.model,
        "hooks": {h: {"d": model.width(h), "shards": [s[h] for s in done["shards"]]} for h in hooks},
        "dtype": config.dtype,
        "context_length": context,
        "n_windows": n_windows,
        "n_tokens": n_windows * context,
        "windows_per_shard": config.windows_per_shard(context),
        "bos_token_id": model.bos_token_id,
        "tokens_file": TOKENS_FILE,
        "tokens_sha256": sha256_file(out / TOKENS_FILE),
        "config": config.identity(),
    }
    write_json_atomic(out / MANIFEST, manifest)
