"""Read an activation cache: validate the manifest, verify shards, stream shuffled minibatches.

`ActivationCache.batches` streams one exact epoch with memory bounded by `buffer_rows`: shards
are visited in a seeded random order and appended to a pool; whenever the pool holds
`buffer_rows` rows it is shuffled and its first half is emitted as minibatches, so every row is
mixed with rows of several shards; the rest is emitted at the end. The order depends only on
(seed, epoch) and the shard sizes, never on timing. Each shard's sha256 is checked the first
time this object reads it; a mismatch, a truncated file or a non-finite value raises
`CacheError` naming the shard (and row).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple, Optional

import torch
from jaxtyping import Float, Int
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor

from workbench.errors import CacheError
from workbench.files import first_non_finite_row, read_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
TOKENS_FILE = "tokens.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shard_path(hook: str, index: int) -> str:
    return f"{hook}/shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class Shard:
    file: str
    rows: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The validated content of manifest.json (see workbench.activations for the layout)."""

    model: str
    hooks: dict[str, tuple[int, tuple[Shard, ...]]]
    """hook -> (d, shards)."""
    dtype: str
    context_length: int
    n_windows: int
    bos_token_id: int
    tokens_sha256: str
    config: dict
    has_tokens: bool = True
    """False for a cache of activations the user brought (`workbench cache --from`): no token windows."""
    held_out: tuple[float, int] = (0.0, 0)
    """(fraction, seed) of rows held out for evaluation (caches made with --from only)."""

    @classmethod
    def parse(cls, obj: dict, where: str) -> "Manifest":
        get = _Getter(obj, where)
        version = obj.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise CacheError(
                f"{where}: unknown format_version {version!r} (this workbench reads {FORMAT_VERSION})"
            )
        dtype = get("dtype", str)
        if dtype not in _DTYPES:
            raise CacheError(f"{where}: unknown dtype {dtype!r}")
        context, n_windows = get("context_length", int, positive=True), get("n_windows", int, positive=True)
        hooks_obj = get("hooks", dict)
        if not hooks_obj:
            raise CacheError(f"{where}: no hooks")
        hooks = {str(h): _parse_hook(h, spec, context * n_windows, where) for h, spec in hooks_obj.items()}
        has_tokens = obj.get("has_tokens", True)
        if not isinstance(has_tokens, bool) or (not has_tokens and context != 1):
            raise CacheError(f"{where}: field 'has_tokens' must be true, or false with context_length 1")
        held = get("held_out", dict) if not has_tokens else {"fraction": 0.0, "seed": 0}
        fraction, seed = held.get("fraction"), held.get("seed")
        if (
            not isinstance(fraction, (int, float))
            or isinstance(fraction, bool)
            or not 0 <= fraction < 1
            or not isinstance(seed, int)
        ):
            raise CacheError(f"{where}: field 'held_out' must hold a fraction in [0, 1) and an integer seed")
        return cls(
            get("model", str),
            hooks,
            dtype,
            context,
            n_windows,
            get("bos_token_id", int),
            get("tokens_sha256", str),
            get("config", dict),
            has_tokens,
            (float(fraction), seed),
        )


class _Getter:
    def __init__(self, obj: object, where: str):
        if not isinstance(obj, dict):
            raise CacheError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        self.obj, self.where = obj, where

    def __call__(self, key: str, kind: type, positive: bool = False):
        value = self.obj.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (positive and value <= 0):
            raise CacheError(
                f"{self.where}: field {key!r} must be a {'positive ' if positive else ''}{kind.__name__}"
            )
        return value


def _parse_hook(hook: str, spec: object, total_rows: int, where: str) -> tuple[int, tuple[Shard, ...]]:
    get = _Getter(spec, f"{where} hook {hook}")
    d = get("d", int, positive=True)
    shards = []
    for i, item in enumerate(get("shards", list)):
        sget = _Getter(item, f"{where} hook {hook} shard {i}")
        file = sget("file", str)
        if PurePosixPath(file).is_absolute() or ".." in PurePosixPath(file).parts:
            raise CacheError(f"{where}: shard path {file!r} leaves the cache folder")
        shards.append(Shard(file, sget("rows", int, positive=True), sget("sha256", str)))
    if sum(s.rows for s in shards) != total_rows:
        raise CacheError(
            f"{where}: hook {hook} shards hold {sum(s.rows for s in shards)} rows, expected {total_rows}"
        )
    return d, tuple(shards)


class Batch(NamedTuple):
    activations: Float[Tensor, "batch d"]
    """Activations (in the cache's dtype) of the batch's rows."""
    rows: Int[Tensor, " batch"]
    """Global row indices: window = row // context_length, position = row % context_length."""


class ActivationCache:
    """A complete cache folder, opened for reading (nothing is loaded until asked for)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        if not self.path.is_dir():
            raise CacheError(
                f"{self.path}: no activation cache here (run `workbench cache --out {self.path}`)"
            )
        manifest = self.path / MANIFEST
        if not manifest.exists():
            hint = (
                "rerun the same `workbench cache` command to finish it"
                if (self.path / "progress.json").exists()
                else "not a cache folder"
            )
            raise CacheError(f"{self.path}: incomplete cache, no {MANIFEST} ({hint})")
        self.manifest = Manifest.parse(read_json(manifest, "cache manifest", CacheError), str(manifest))
        self._verified: set[str] = set()
        self._tokens: Tensor | None = None

    # --- what is in it ---------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return list(self.manifest.hooks)

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def context_length(self) -> int:
        return self.manifest.context_length

    @property
    def n_rows(self) -> int:
        return self.manifest.n_windows * self.manifest.context_length

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.manifest.dtype]

    def width(self, hook: str) -> int:
        """Width of the activations cached at `hook`."""
        return self._hook(hook)[0]

    def n_shards(self, hook: str) -> int:
        return len(self._hook(hook)[1])

    def expect(self, *, hook: str | None = None, width: int | None = None, model: str | None = None) -> None:
        """Refuse, in one line, a cache that does not fit what a consumer was built for."""
        if model is not None and model != self.model:
            raise CacheError(f"{self.path}: cache is of model {self.model!r}, not {model!r}")
        if hook is not None:
            self._hook(hook)
            if width is not None and width != self.width(hook):
                raise CacheError(f"{self.path}: hook {hook} has d={self.width(hook)}, expected d={width}")

    def _hook(self, hook: str) -> tuple[int, tuple[Shard, ...]]:
        if hook not in self.manifest.hooks:
            raise CacheError(f"{self.path}: no hook {hook!r} in this cache (it has {', '.join(self.hooks)})")
        return self.manifest.hooks[hook]

    # --- reading ---------------------------------------------------------------------------
    @property
    def has_tokens(self) -> bool:
        """False for caches of activations the user brought (`workbench cache --from`)."""
        return self.manifest.has_tokens

    def require_tokens(self, what: str) -> None:
        """Refuse, in one line, a consumer that needs token windows on a cache that has none."""
        if not self.has_tokens:
            raise CacheError(
                f"{self.path}: {what} needs token windows, and this cache holds activations only "
                "(made with `workbench cache --from`)"
            )

    @property
    def training_rows(self) -> int:
        """Rows an epoch of training reads: non-BOS rows, or (--from caches) rows not held out."""
        if self.has_tokens:
            return self.manifest.n_windows * (self.context_length - 1)
        fraction, seed = self.manifest.held_out
        return self.n_rows - sum(
            int(held_out_rows(torch.arange(s, min(s + _HELD_BLOCK, self.n_rows)), fraction, seed).sum())
            for s in range(0, self.n_rows, _HELD_BLOCK)
        )

    @property
    def tokens(self) -> Int[Tensor, "n_windows context"]:
        """The token windows, so every activation row maps back to its text."""
        self.require_tokens("reading its text")
        if self._tokens is None:
            data = self._read_verified(TOKENS_FILE, self.manifest.tokens_sha256)
            self._tokens = data["tokens"]
            if tuple(self._tokens.shape) != (self.manifest.n_windows, self.context_length):
                raise CacheError(
                    f"{self.path / TOKENS_FILE}: shape {tuple(self._tokens.shape)} "
                    "does not match the manifest"
                )
        return self._tokens

    def window_position(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return rows // self.context_length, rows % self.context_length

    def shard(self, hook: str, index: int) -> Float[Tensor, "rows d"]:
        d, shards = self._hook(hook)
        info = shards[index]
        x = self._read_verified(info.file, info.sha256).get("activations")
        if x is None or tuple(x.shape) != (info.rows, d) or x.dtype != self.dtype:
            got = None if x is None else (tuple(x.shape), str(x.dtype).replace("torch.", ""))
            raise CacheError(
                f"{self.path / info.file}: expected activations {(info.rows, d)} {self.manifest.dtype}, "
                f"got {got}"
            )
        bad = first_non_finite_row(x)
        if bad is not None:
            raise CacheError(f"{self.path / info.file}: non-finite activation (NaN/Inf) in row {bad}")
        return x

    def _read_verified(self, file: str, sha256: str) -> dict[str, Tensor]:
        path = self.path / file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CacheError(f"{path}: shard missing") from None
        if file not in self._verified:
            if hashlib.sha256(data).hexdigest() != sha256:
                raise CacheError(f"{path}: sha256 mismatch (corrupt or truncated file); rebuild the cache")
            self._verified.add(file)
        try:
            return load_safetensors_bytes(data)
        except Exception as exc:
            raise CacheError(f"{path}: unreadable safetensors ({str(exc).splitlines()[0]})") from None

    def shard_rows(self, hook: str) -> list[tuple[int, int]]:
        """(first_row, n_rows) of each shard, in order."""
        spans, start = [], 0
        for info in self._hook(hook)[1]:
            spans.append((start, info.rows))
            start += info.rows
        return spans

    def batches(
        self,
        hook: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        buffer_rows: int = 1 << 18,
        skip_bos: bool = True,
        drop_last: bool = False,
        subset: str = "train",
        read_ahead: bool = False,
    ) -> Iterator[Batch]:
        """One epoch of minibatches (see the module docstring); every kept row exactly once.

        Kept rows: all but BOS positions (`skip_bos`); for caches made with --from, which have
        no BOS, `subset` picks "train" (rows not held out), "held_out" or "all". `read_ahead`:
        a thread reads (and verifies) the next shard while this one's batches are made."""
        if subset not in ("train", "held_out", "all"):
            raise CacheError(f"unknown subset {subset!r}: train, held_out or all")
        if batch_size <= 0:
            raise CacheError(f"batch size must be positive, got {batch_size}")
        spans = self.shard_rows(hook)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(spans), generator=generator).tolist() if shuffle else range(len(spans))
        pool: list[Batch] = []
        pooled = 0
        for index, x in self._shards(hook, list(order), read_ahead):
            rows = torch.arange(spans[index][0], spans[index][0] + spans[index][1])
            keep = self._kept(rows, skip_bos, subset)
            if keep is not None:
                x, rows = x[keep], rows[keep]
            pool.append(Batch(x, rows))
            pooled += len(rows)
            if shuffle and pooled >= buffer_rows:
                pool, pooled = yield from _emit(pool, batch_size, generator, keep_fraction=0.5)
            elif not shuffle:
                pool, pooled = yield from _emit(pool, batch_size, None, keep_fraction=0.0)
        yield from _emit(
            pool, batch_size, generator if shuffle else None, keep_fraction=0.0, drop_last=drop_last
        )

    def _shards(self, hook: str, order: list[int], ahead: bool) -> Iterator[tuple[int, Tensor]]:
        """(index, activations) of the shards in `order`; `ahead`: each read by a thread while
        the one before it is used. A shard's error is raised when that shard's turn comes."""
        if not ahead:
            yield from ((index, self.shard(hook, index)) for index in order)
            return
        reader = ThreadPoolExecutor(1, thread_name_prefix="cache-read-ahead")
        try:
            pending = [reader.submit(self.shard, hook, index) for index in order[:1]]
            for position, index in enumerate(order):
                x = pending.pop().result()
                if position + 1 < len(order):
                    pending.append(reader.submit(self.shard, hook, order[position + 1]))
                yield index, x
        finally:
            reader.shutdown(wait=True, cancel_futures=True)

    def _kept(self, rows: Tensor, skip_bos: bool, subset: str) -> Tensor | None:
        """bool mask of `rows` to keep, or None for all of them."""
        if self.has_tokens:
            return rows % self.context_length != 0 if skip_bos else None
        if subset == "all":
            return None
        held = held_out_rows(rows, *self.manifest.held_out)
        keep = held if subset == "held_out" else ~held
        return None if bool(keep.all()) else keep  # all of them: no copy


_HELD_BLOCK = 1 << 16


def held_out_rows(rows: Int[Tensor, " n"], fraction: float, seed: int) -> Tensor:
    """bool [n]: which global rows of a --from cache are held out. Each row draws one uniform
    from a stream of (seed, its block of 65,536 rows), so the answer depends only on the row index."""
    from workbench.seeding import generator

    held = torch.zeros(rows.shape, dtype=torch.bool)
    if fraction <= 0 or rows.numel() == 0:
        return held
    blocks = rows // _HELD_BLOCK
    for block in torch.unique(blocks).tolist():
        draws = torch.rand(_HELD_BLOCK, generator=generator(seed, "held-out rows", block))
        mine = blocks == block
        held[mine] = draws[rows[mine] % _HELD_BLOCK] < fraction
    return held


def _emit(pool: list[Batch], batch_size: int, generator, keep_fraction: float, drop_last: bool = True):
    """Yield whole batches from the pool (shuffled if a generator is given); return the rest.

    A shuffled batch is gathered from the pool when it is yielded (the pool is never copied
    whole into its shuffled order), so a reader ahead of the consumer spends the same time on
    every batch instead of stalling once per pool."""
    if not pool:
        return [], 0
    x = pool[0].activations if len(pool) == 1 else torch.cat([b.activations for b in pool])
    rows = pool[0].rows if len(pool) == 1 else torch.cat([b.rows for b in pool])
    perm = torch.randperm(len(rows), generator=generator) if generator is not None else None

    def take(start: int, stop: Optional[int]) -> Batch:
        if perm is None:
            return Batch(x[start:stop], rows[start:stop])
        picked = perm[start:stop]
        return Batch(x.index_select(0, picked), rows.index_select(0, picked))

    n_out = int(len(rows) * (1 - keep_fraction)) // batch_size * batch_size
    if not drop_last and keep_fraction == 0.0:
        n_out = len(rows)
    for start in range(0, n_out, batch_size):
        yield take(start, start + batch_size)
    rest = take(n_out, None)
    return ([rest] if len(rest.rows) else []), len(rest.rows)
