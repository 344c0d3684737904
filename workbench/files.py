"""Atomic file writes and checksums: every file the project writes appears whole or not at all.

A file is written under a temporary name in its destination folder, flushed and fsync'ed,
then renamed over the final name (rename is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import IO, Iterator

import torch


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success rename it to `path`, else delete it."""
    from workbench.errors import WorkbenchError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WorkbenchError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # disk full, read-only, quota: one line, nothing left behind
            raise WorkbenchError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    with atomic_open(path, "w") as handle:
        handle.write(text)


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_tensors_atomic(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Write tensors as a safetensors file, atomically; return the sha256 of its bytes.

    The file is streamed straight from the tensors' memory (header, then each tensor's bytes)
    and hashed on the way, instead of first serialising a copy: the cache writer's main cost
    after the forward pass. The layout is the safetensors spec; readers use the safetensors library.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"cannot store dtype {tensor.dtype} in safetensors")
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + flat.nbytes],
        }
        blobs.append(flat)
        offset += flat.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the spec aligns the data to 8 bytes
    digest = hashlib.sha256()
    with atomic_open(path, "wb") as handle:
        for part in (struct.pack("<Q", len(encoded)), encoded, *blobs):
            digest.update(part)
            handle.write(part)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete temporaries a killed writer left behind in `folder` or below (they are never read)."""
    for tmp in Path(folder).rglob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_json(path: str | os.PathLike, what: str = "JSON file", error: type[Exception] | None = None) -> dict:
    """A JSON object from `path`, or a one-line `error` (WorkbenchError) saying what is wrong and where."""
    from workbench.errors import WorkbenchError

    WorkbenchError = error or WorkbenchError  # noqa: N806 - the class to raise
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkbenchError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{path}: {what} is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise WorkbenchError(f"{path}: {what} must hold a JSON object, not {type(obj).__name__}")
    return obj


def first_non_finite_row(x: torch.Tensor) -> int | None:
    """Index of the first row holding a NaN/Inf, or None. One cheap reduction decides the
    common case (NaN and Inf propagate into a sum); rows are searched only if it fails."""
    if torch.isfinite(x.sum()):
        return None
    bad = (~torch.isfinite(x)).flatten(1).any(dim=1).nonzero()
    return int(bad[0]) if len(bad) else None
