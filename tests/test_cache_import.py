"""Activations the user brings (issue 16): `workbench cache --from FILE|FOLDER` writes a cache with
no token windows; training reads every row but the held-out ones (no BOS row is dropped);
`workbench eval` scores on the held-out rows alone; commands that need text say so in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tests.test_cli import run_cli
from workbench.activations import CacheConfig, build_cache
from workbench.cache_reader import ActivationCache
from workbench.errors import CacheError

N, D = 6000, 12


def rows(seed: int = 0, n: int = N, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def imported(tmp_path, source, **settings) -> ActivationCache:
    out = tmp_path / "cache"
    build_cache(
        CacheConfig(from_activations=str(source), out=str(out), shard_tokens=1000, **settings), progress=False
    )
    return ActivationCache(out)


def test_an_npy_file_becomes_a_cache_whose_rows_are_the_files_rows(tmp_path):
    x = rows()
    np.save(tmp_path / "emb.npy", x)
    cache = imported(tmp_path, tmp_path / "emb.npy")
    assert cache.hooks == ["emb"] and cache.width("emb") == D and cache.n_rows == N and not cache.has_tokens
    assert cache.n_shards("emb") == 6 and cache.model == ""
    train = list(cache.batches("emb", 500, shuffle=False, subset="train"))
    held = list(cache.batches("emb", 500, shuffle=False, subset="held_out"))
    train_rows, held_rows = torch.cat([b.rows for b in train]), torch.cat([b.rows for b in held])
    assert sorted(torch.cat([train_rows, held_rows]).tolist()) == list(
        range(N)
    )  # row 0 of every "window" too
    assert 0.01 <= len(held_rows) / N <= 0.03 and cache.training_rows == len(train_rows)
    for batch in train + held:  # row r of the cache is row r of the file
        assert torch.equal(batch.activations, torch.from_numpy(x[batch.rows.numpy()]))
    with pytest.raises(CacheError, match="needs token windows.*activations only"):
        cache.tokens


def test_safetensors_tensors_and_folders_become_hooks(tmp_path):
    save_file({"resid": rows(1), "mlp_out": rows(2, d=5)}, str(tmp_path / "acts.safetensors"))
    cache = imported(tmp_path, tmp_path / "acts.safetensors", hooks=("mlp_out",))
    assert cache.hooks == ["mlp_out"] and cache.width("mlp_out") == 5
    folder = tmp_path / "many"
    folder.mkdir()
    np.save(folder / "a.npy", rows(3))
    save_file({"b": rows(4, d=3)}, str(folder / "more.safetensors"))
    both = imported(tmp_path / "f", folder)
    assert sorted(both.hooks) == ["a", "b"] and both.width("b") == 3
    np.save(tmp_path / "one.npy", rows(5))
    renamed = imported(tmp_path / "r", tmp_path / "one.npy", hooks=("blocks.3.hook_resid_post",))
    assert renamed.hooks == ["blocks.3.hook_resid_post"]


def test_a_rerun_finds_the_cache_complete_and_a_changed_input_is_imported_again(tmp_path):
    np.save(tmp_path / "emb.npy", rows())
    cache = imported(tmp_path, tmp_path / "emb.npy")
    stamp = (cache.path / "manifest.json").stat().st_mtime_ns
    assert imported(tmp_path, tmp_path / "emb.npy").path == cache.path
    assert (cache.path / "manifest.json").stat().st_mtime_ns == stamp
    np.save(tmp_path / "emb.npy", rows(9))
    again = imported(tmp_path, tmp_path / "emb.npy")
    first = next(again.batches("emb", 10, shuffle=False, subset="all")).activations
    assert torch.equal(first, torch.from_numpy(rows(9)[:10]))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: np.save(p / "x.npy", rows()[:, :, None]), "expected activations \\[N, d\\]"),
        (lambda p: np.save(p / "x.npy", np.arange(12).reshape(3, 4)), "expected floating-point activations"),
        (
            lambda p: np.save(p / "x.npy", np.where(np.arange(N)[:, None] == 4321, np.nan, rows())),
            "non-finite.*row 4321",
        ),
        (lambda p: (p / "x.pt").write_bytes(b"\x80\x04"), "pickle files can run code"),
        (lambda p: (p / "x.npy").write_bytes(b"not numpy"), "unreadable .npy"),
    ],
)
def test_bad_input_is_one_line_and_writes_no_manifest(tmp_path, make, message):
    make(tmp_path)
    source = next(tmp_path.iterdir())
    with pytest.raises(CacheError, match=message):
        imported(tmp_path / "out", source)
    assert not (tmp_path / "out" / "cache" / "manifest.json").exists()


def test_hooks_of_different_lengths_are_refused(tmp_path):
    save_file({"a": rows(), "b": rows(n=N - 1)}, str(tmp_path / "acts.safetensors"))
    with pytest.raises(CacheError, match="different row counts"):
        imported(tmp_path, tmp_path / "acts.safetensors")


def test_train_eval_and_analyze_on_activations_without_a_model(capsys, tmp_path):
    np.save(tmp_path / "emb.npy", rows(n=20_000))
    cache = tmp_path / "cache"
    code, out, _ = run_cli(
        capsys, "cache", "--from", str(tmp_path / "emb.npy"), "--out", str(cache), "--json"
    )
    assert code == 0 and json.loads(out)["rows"] == 20_000
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys,
        "train",
        "--cache",
        str(cache),
        "--n-latents",
        "48",
        "--k",
        "4",
        "--out",
        str(run),
        "--quiet",
        "--json",
    )
    assert code == 0, err
    trained = json.loads(out.splitlines()[0])
    assert (
        trained["tokens"] == (ActivationCache(cache).training_rows // 256) * 256
    )  # auto batch: 256 for this budget
    code, out, err = run_cli(capsys, "eval", str(run / "topk-k4-m48"), "--quiet", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["rows"] == "held_out" and 0 < metrics["fvu"] < 1 and metrics["l0"] == pytest.approx(4.0)
    assert 200 <= metrics["tokens"] <= 600 and "ce_loss_score" not in metrics  # ~2% of 20,000 rows, no model
    code, _, err = run_cli(capsys, "analyze", str(run / "topk-k4-m48"))
    assert code == 2 and err.count("\n") == 1 and "needs token windows" in err
