"""Atomic writes and our streaming safetensors writer."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save

from workbench.errors import WorkbenchError
from workbench.files import atomic_open, first_non_finite_row, remove_stale_temporaries, save_tensors_atomic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_streamed_safetensors_equal_the_library(tmp_path, dtype):
    tensors = {
        "a": (torch.randn(7, 5) * 10).to(dtype),
        "b": torch.arange(3).to(dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
    }
    path = tmp_path / "x.safetensors"
    sha = save_tensors_atomic(path, tensors, metadata={"k": "v"})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], tensor)
    assert path.read_bytes()[8:].startswith(b"{") and len(path.read_bytes()) == len(
        save(tensors, metadata={"k": "v"})
    )


def test_non_contiguous_input_is_stored_as_its_values(tmp_path):
    x = torch.randn(6, 8)[:, ::2]
    save_tensors_atomic(tmp_path / "x.safetensors", {"x": x})
    assert torch.equal(load_file(tmp_path / "x.safetensors")["x"], x)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "f.bin") as handle:
            handle.write(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_removed_below_the_folder_too(tmp_path):
    """A writer killed mid-shard leaves `.shard-00003.safetensors.x.tmp` in a hook's subfolder."""
    (tmp_path / "hook").mkdir()
    stale = [tmp_path / ".a.json.1.tmp", tmp_path / "hook" / ".shard-00003.safetensors.x.tmp"]
    kept = [tmp_path / "hook" / "shard-00000.safetensors", tmp_path / "notes.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    remove_stale_temporaries(tmp_path)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


def test_unwritable_place_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkbenchError, match="cannot write"):
        save_tensors_atomic(tmp_path / "file" / "below.safetensors", {"x": torch.zeros(1)})


def test_first_non_finite_row():
    x = torch.randn(50, 3)
    assert first_non_finite_row(x) is None
    assert first_non_finite_row(torch.full((4, 4), 3e38)) is None  # the sum overflows, the values do not
    x[31, 2], x[40, 0] = float("nan"), float("inf")
    assert first_non_finite_row(x) == 31
