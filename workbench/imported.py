"""Caches of activations the user brings: `workbench cache --from FILE.npy|FILE.safetensors|FOLDER`.

Rows [N, d] made elsewhere (a vision model's embeddings, another framework's hooks) become an
activation cache with no token windows: context_length 1, one row per "window", no BOS rows, no
tokens file (`has_tokens: false` in the manifest). Row r of the cache is row r of the input, so
your own metadata still lines up. Inputs:
    FILE.npy            one array [N, d]; its hook is the file's stem (or the one --hook given)
    FILE.safetensors    every 2-D tensor [N, d] is a hook named by its key (--hook selects keys)
    FOLDER              every .npy / .safetensors file in it, as above
All hooks need the same N. Pickle files (.pt, .pth, .pkl) are refused: they can run code.

A seeded fraction of the rows (`--validation-fraction`, by row index, the same on every read)
is held out: training never sees it, and `workbench eval` scores a dictionary on it (FVU, MSE,
L0, dead, density) when there is no model to splice into. Shards are written atomically and the
manifest last; a rerun with the same config and unchanged input finds the cache complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.cache_reader import FORMAT_VERSION, MANIFEST, shard_path
from workbench.errors import CacheError
from workbench.files import (
    first_non_finite_row,
    read_json,
    remove_stale_temporaries,
    save_tensors_atomic,
    write_json_atomic,
)

SUFFIXES = (".npy", ".safetensors")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
_FLOAT_KINDS = "f"


@dataclass(frozen=True)
class Array:
    """One input array: where it is, its key inside the file, and its shape."""

    file: Path
    key: str
    rows: int
    width: int

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a float tensor (copied out of the file)."""
        if self.file.suffix == ".npy":
            block = np.load(self.file, mmap_mode="r")[start:stop]
            native = (
                np.float64 if block.dtype.itemsize > 8 else block.dtype.newbyteorder("=")
            )  # big-endian, float128
            return torch.from_numpy(np.array(block, dtype=native))
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as handle:
            return handle.get_slice(self.key)[start:stop]


def find_arrays(source: str, hooks: tuple[str, ...] = ()) -> dict[str, Array]:
    """hook name -> Array for `source` (a file or folder), checked: 2-D float, same row count."""
    path = Path(source)
    if not path.exists():
        raise CacheError(f"--from {source}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise CacheError(f"--from {source}: no .npy or .safetensors files in this folder")
    arrays: dict[str, Array] = {}
    for file in files:
        for array in _arrays_in(file):
            name = array.key if file.suffix == ".safetensors" else file.stem
            if name in arrays:
                raise CacheError(
                    f"--from {source}: two arrays are named {name!r} ({arrays[name].file.name}, {file.name})"
                )
            arrays[name] = array
    arrays = _select(arrays, hooks, source)
    counts = {name: a.rows for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise CacheError(
            f"--from {source}: the arrays have different row counts {counts}; every hook needs the same rows"
        )
    return arrays


def _arrays_in(file: Path) -> list[Array]:
    if file.suffix in PICKLE_SUFFIXES:
        raise CacheError(
            f"{file}: pickle files can run code and are not read; "
            "save the tensor with numpy.save or safetensors"
        )
    if file.suffix == ".npy":
        try:
            array = np.load(file, mmap_mode="r")
        except Exception as exc:
            raise CacheError(f"{file}: unreadable .npy ({str(exc).splitlines()[0]})") from None
        return [_checked(file, "", tuple(array.shape), array.dtype.kind, str(array.dtype))]
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                found = []
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    kind = "f" if piece.get_dtype() in ("F16", "BF16", "F32", "F64") else "other"
                    found.append(_checked(file, key, tuple(piece.get_shape()), kind, piece.get_dtype()))
                return found
        except CacheError:
            raise
        except Exception as exc:
            raise CacheError(f"{file}: unreadable safetensors ({str(exc).splitlines()[0]})") from None
    raise CacheError(f"{file}: expected a .npy or .safetensors file")


def _checked(file: Path, key: str, shape: tuple, kind: str, dtype: str) -> Array:
    where = f"{file}" + (f" tensor {key!r}" if key else "")
    if len(shape) != 2 or min(shape) <= 0:
        raise CacheError(f"{where}: expected activations [N, d] with N, d > 0, got shape {list(shape)}")
    if kind not in _FLOAT_KINDS:
        raise CacheError(f"{where}: expected floating-point activations, got {dtype}")
    return Array(file, key, shape[0], shape[1])


def _select(arrays: dict[str, Array], hooks: tuple[str, ...], source: str) -> dict[str, Array]:
    if not hooks:
        chosen = arrays
    elif len(arrays) == 1 and len(hooks) == 1:
        chosen = {hooks[0]: next(iter(arrays.values()))}  # one array, named as the user says
    else:
        missing = [h for h in hooks if h not in arrays]
        if missing:
            raise CacheError(
                f"--from {source}: no array named {', '.join(map(repr, missing))} "
                f"(it has {', '.join(arrays)})"
            )
        chosen = {h: arrays[h] for h in hooks}
    for name in chosen:
        parts = PurePosixPath(name).parts
        if not name or name.startswith(".") or len(parts) != 1 or ".." in parts or "\\" in name:
            raise CacheError(
                f"--from {source}: {name!r} cannot name a hook (it becomes a folder name); pass --hook NAME"
            )
    return chosen


def import_activations(config, progress: bool = True) -> Path:
    """Write (or find complete) the cache of `config.from_activations`; return its folder."""
    arrays = find_arrays(config.from_activations, config.hooks)
    out = config.output_dir()
    signature = _signature(arrays)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        old = read_json(manifest_path, "cache manifest", CacheError)
        if old.get("config") != config.identity():
            raise CacheError(
                f"{out} already holds a cache with a different configuration; "
                "choose another --out or delete it"
            )
        if old.get("source") == signature:
            return out
        manifest_path.unlink()  # the input changed since: import it again
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    n_rows = next(iter(arrays.values())).rows
    per_shard = max(1, config.shard_tokens)
    n_shards = math.ceil(n_rows / per_shard)
    shards: dict[str, list[dict]] = {hook: [] for hook in arrays}
    dtype = _dtype(config.dtype)
    bar = tqdm(total=n_rows, unit="row", unit_scale=True, desc="import", disable=not progress)
    for index in range(n_shards):
        start, stop = index * per_shard, min(n_rows, (index + 1) * per_shard)
        for hook, array in arrays.items():
            x = _read_checked(array, start, stop).to(dtype)
            sha = save_tensors_atomic(out / shard_path(hook, index), {"activations": x.contiguous()})
            shards[hook].append({"file": shard_path(hook, index), "rows": stop - start, "sha256": sha})
        bar.update(stop - start)
    bar.close()
    write_json_atomic(manifest_path, _manifest(config, arrays, shards, n_rows, signature))
    return out


def _read_checked(array: Array, start: int, stop: int) -> torch.Tensor:
    x = array.read(start, stop)
    bad = first_non_finite_row(x)
    if bad is not None:
        name = f"{array.file}" + (f" tensor {array.key!r}" if array.key else "")
        raise CacheError(f"{name}: non-finite activation (NaN/Inf) in row {start + bad}")
    return x


def _dtype(name: str) -> torch.dtype:
    from workbench.activations import DTYPES

    return DTYPES[name]


def _signature(arrays: dict[str, Array]) -> dict:
    """What identifies the input: each array's file, key, shape, size and modification time."""
    return {
        hook: {
            "file": str(a.file.resolve()),
            "key": a.key,
            "shape": [a.rows, a.width],
            "bytes": a.file.stat().st_size,
            "mtime_ns": a.file.stat().st_mtime_ns,
        }
        for hook, a in arrays.items()
    }


def _manifest(
    config, arrays: dict[str, Array], shards: dict[str, list[dict]], n_rows: int, signature: dict
) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "kind": "workbench.activation_cache",
        "model": "",
        "has_tokens": False,
        "hooks": {hook: {"d": arrays[hook].width, "shards": shards[hook]} for hook in arrays},
        "dtype": config.dtype,
        "context_length": 1,
        "n_windows": n_rows,
        "n_tokens": n_rows,
        "bos_token_id": -1,
        "tokens_file": None,
        "tokens_sha256": "",
        "held_out": {"fraction": config.validation_fraction, "seed": config.seed},
        "source": signature,
        "config": config.identity(),
    }


def default_output_dir(source: str) -> Path:
    from workbench.paths import DEFAULT_RUNS_DIR

    stem = Path(source).stem or Path(source).name
    return DEFAULT_RUNS_DIR / f"cache-{''.join(c if c.isalnum() or c in '._' else '_' for c in stem)[:40]}"


def imported_config(config):
    """The config as an import records it: the model, corpus, split and model dtype do not apply."""
    return replace(config, model="", corpus="", split="train", model_dtype="float32")
