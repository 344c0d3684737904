"""The activation cache: bit-exact round trip, refusal of bad files, streaming reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workbench.activations import CacheConfig, build_cache, select_windows
from workbench.cache_reader import ActivationCache
from workbench.errors import CacheError, ConfigError

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.mlp.hook_post")


def small_config(folder: Path, **overrides) -> CacheConfig:
    settings = dict(
        model="tiny",
        hooks=HOOKS,
        corpus="tiny-shakespeare",
        tokens=6000,
        context_length=32,
        batch_size=8,
        shard_tokens=1024,
        out=str(folder),
    )
    settings.update(overrides)
    return CacheConfig(**settings)


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory):
    config = small_config(tmp_path_factory.mktemp("cache") / "c")
    return config, build_cache(config, model=tiny_model, progress=False)


def test_round_trip_is_bit_exact(built, tiny_model):
    config, folder = built
    cache = ActivationCache(folder)
    windows = select_windows(config, tiny_model)
    assert torch.equal(cache.tokens, windows)
    assert cache.n_rows == windows.numel() and cache.n_rows >= config.tokens
    per_shard = config.windows_per_shard(32)
    for hook in HOOKS:
        assert cache.width(hook) == tiny_model.width(hook)
        for index in range(cache.n_shards(hook)):
            chunk = windows[index * per_shard : (index + 1) * per_shard]
            expected = torch.cat(
                [
                    tiny_model.run_with_cache(chunk[i : i + config.batch_size], [hook])[hook].flatten(0, 1)
                    for i in range(0, len(chunk), config.batch_size)
                ]
            )
            assert torch.equal(cache.shard(hook, index), expected)


def test_manifest_records_what_the_readme_promises(built):
    _, folder = built
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in (
        "format_version",
        "model",
        "hooks",
        "dtype",
        "context_length",
        "n_tokens",
        "n_windows",
        "config",
    ):
        assert key in manifest
    shard = manifest["hooks"][HOOKS[0]]["shards"][0]
    assert set(shard) == {"file", "rows", "sha256"} and shard["rows"] % manifest["context_length"] == 0
    assert not (folder / "progress.json").exists()


def test_rows_map_back_to_their_text(built, tiny_model):
    _, folder = built
    cache = ActivationCache(folder)
    batch = next(cache.batches(HOOKS[0], 16, seed=3))
    window, position = cache.window_position(batch.rows)
    for row in range(4):  # recompute each sampled row from its own window prefix
        prefix = cache.tokens[window[row], : position[row] + 1].unsqueeze(0)
        direct = tiny_model.run_with_cache(prefix, [HOOKS[0]])[HOOKS[0]][0, -1]
        torch.testing.assert_close(batch.activations[row], direct, atol=1e-5, rtol=1e-5)


def test_rerun_of_a_complete_cache_does_nothing(built, tiny_model):
    config, folder = built
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    build_cache(config, model=tiny_model, progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_different_config_in_same_folder_is_refused(built, tiny_model):
    config, folder = built
    with pytest.raises(CacheError, match="differs in: tokens"):
        build_cache(small_config(folder, tokens=4000), model=tiny_model, progress=False)


def test_float16_storage(tiny_model, tmp_path):
    folder = build_cache(
        small_config(tmp_path / "c16", dtype="float16", tokens=1000), model=tiny_model, progress=False
    )
    x = ActivationCache(folder).shard(HOOKS[0], 0)
    assert x.dtype == torch.float16


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_named(built, tmp_path, damage):
    import shutil

    _, folder = built
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shard = copy / HOOKS[1] / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    cache = ActivationCache(copy)
    cache.shard(HOOKS[1], 0)  # an intact shard still reads
    with pytest.raises(CacheError) as info:
        list(cache.batches(HOOKS[1], 64, shuffle=False))
    assert "shard-00001" in str(info.value) and "\n" not in str(info.value)


def test_manifest_problems_are_refused(built, tmp_path):
    import shutil

    _, folder = built
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    cases = {
        "format_version": {**manifest, "format_version": 99},
        "dtype": {**manifest, "dtype": "int3"},
        "rows": {**manifest, "n_windows": manifest["n_windows"] + 1},
        "leaves": {
            **manifest,
            "hooks": {HOOKS[0]: {"d": 64, "shards": [{"file": "../x", "rows": 1, "sha256": ""}]}},
        },
    }
    for expected, broken in cases.items():
        (copy / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(CacheError, match=expected if expected != "rows" else "rows"):
            ActivationCache(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        ActivationCache(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache(copy)


def test_expect_refuses_mismatched_consumers(built):
    _, folder = built
    cache = ActivationCache(folder)
    cache.expect(hook=HOOKS[0], width=64, model="tiny")
    with pytest.raises(CacheError, match="d=64, expected d=128"):
        cache.expect(hook=HOOKS[0], width=128)
    with pytest.raises(CacheError, match="not 'gpt2'"):
        cache.expect(model="gpt2")
    with pytest.raises(CacheError, match="no hook"):
        cache.expect(hook="blocks.5.hook_resid_post")


def test_non_finite_activations_are_refused_when_writing(tiny_model_dir, tmp_path):
    from workbench.models import load_model

    model = load_model(str(tiny_model_dir))
    with torch.no_grad():
        model.bridge.original_model.transformer.h[0].mlp.c_proj.bias[3] = float("nan")
    config = small_config(tmp_path / "nan", tokens=500)
    with pytest.raises(CacheError, match="non-finite .* window 0, position 0"):
        build_cache(config, model=model, progress=False)
    assert not (tmp_path / "nan" / "manifest.json").exists()


def test_bad_config_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown dtype"):
        CacheConfig(dtype="float8")
    with pytest.raises(ConfigError, match="split"):
        CacheConfig(split="test")


# --- the streaming reader --------------------------------------------------------------------


def test_shuffled_epoch_yields_every_non_bos_row_once(built):
    _, folder = built
    cache = ActivationCache(folder)
    batches = list(cache.batches(HOOKS[0], 100, seed=1, buffer_rows=2000))
    rows = torch.cat([b.rows for b in batches])
    expected = torch.arange(cache.n_rows)
    expected = expected[expected % cache.context_length != 0]
    assert torch.equal(rows.sort().values, expected)
    assert all(len(b.rows) == 100 for b in batches[:-1])
    assert not torch.equal(rows, expected)  # actually shuffled


def test_order_is_a_function_of_seed_and_epoch(built):
    _, folder = built
    first = [b.rows for b in ActivationCache(folder).batches(HOOKS[0], 64, seed=5, epoch=2, buffer_rows=1500)]
    again = [b.rows for b in ActivationCache(folder).batches(HOOKS[0], 64, seed=5, epoch=2, buffer_rows=1500)]
    other = [b.rows for b in ActivationCache(folder).batches(HOOKS[0], 64, seed=5, epoch=3, buffer_rows=1500)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.cat(first), torch.cat(other))


def test_activations_follow_their_rows(built):
    _, folder = built
    cache = ActivationCache(folder)
    sequential = torch.cat([cache.shard(HOOKS[1], i) for i in range(cache.n_shards(HOOKS[1]))])
    for batch in cache.batches(HOOKS[1], 77, seed=0, skip_bos=False, buffer_rows=1000):
        assert torch.equal(batch.activations, sequential[batch.rows])


def test_memory_is_bounded_by_the_buffer(built):
    """The first batch is emitted once the pool reaches the buffer, so it can only hold rows of
    the first few shards read, never of the whole cache."""
    _, folder = built
    cache = ActivationCache(folder)
    shard_rows = cache.shard_rows(HOOKS[0])[0][1]
    first = next(cache.batches(HOOKS[0], 256, seed=0, buffer_rows=2 * shard_rows))
    shards_seen = (first.rows // shard_rows).unique()
    assert len(shards_seen) <= 3 < cache.n_shards(HOOKS[0])


def test_sequential_drop_last(built):
    _, folder = built
    cache = ActivationCache(folder)
    kept = list(cache.batches(HOOKS[0], 1000, shuffle=False, drop_last=True))
    assert all(len(b.rows) == 1000 for b in kept)
    assert torch.equal(
        torch.cat([b.rows for b in kept]),
        torch.cat([b.rows for b in cache.batches(HOOKS[0], 1000, shuffle=False)])[: 1000 * len(kept)],
    )


def test_full_disk_is_one_line(tiny_model, tmp_path, monkeypatch):
    import workbench.files as files
    from workbench.errors import WorkbenchError

    real_fsync = files.os.fsync
    calls = {"n": 0}

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] > 3:  # tokens and a shard or two succeed, then the disk is full
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    out = tmp_path / "full"
    with pytest.raises(WorkbenchError, match="No space left on device") as info:
        build_cache(small_config(out, tokens=3000), model=tiny_model, progress=False)
    assert "\n" not in str(info.value)
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()
    monkeypatch.setattr(files.os, "fsync", real_fsync)
    build_cache(small_config(out, tokens=3000), model=tiny_model, progress=False)  # resumes
    assert (out / "manifest.json").exists()


def test_non_finite_activations_are_refused_when_reading(built, tmp_path):
    import hashlib
    import shutil

    from safetensors.torch import save

    _, folder = built
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    cache = ActivationCache(copy)
    x = cache.shard(HOOKS[0], 2).clone()
    x[17, 5] = float("inf")
    data = save({"activations": x})
    (copy / HOOKS[0] / "shard-00002.safetensors").write_bytes(data)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["hooks"][HOOKS[0]]["shards"][2]["sha256"] = hashlib.sha256(data).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="shard-00002.safetensors: non-finite .* row 17"):
        ActivationCache(copy).shard(HOOKS[0], 2)
