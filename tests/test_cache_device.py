"""Caching on a device (issue 19): `--device cpu` writes today's bytes, the GPU path (pinned,
non-blocking copies handed over one shard late) writes the same cache, the device is not part of
a cache's identity and the model dtype is, and `--device cuda` without one is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch

from app.cli import main
from workbench import activations
from workbench.activations import CacheConfig, build_cache, write_cache
from workbench.cache_reader import ActivationCache
from workbench.errors import CacheError

HOOK = "blocks.0.hook_resid_post"


def _flags(model_dir, out) -> list[str]:
    return [
        "cache",
        "--model",
        str(model_dir),
        "--corpus",
        "tiny-shakespeare",
        "--tokens",
        "384",
        "--context-length",
        "32",
        "--batch-size",
        "4",
        "--shard-tokens",
        "128",
        "--hook",
        HOOK,
        "--out",
        str(out),
        "--quiet",
        "--json",
    ]


def _manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_device_cpu_writes_the_cache_written_without_the_flag(tiny_model_dir, tmp_path, capsys):
    assert main(_flags(tiny_model_dir, tmp_path / "plain")) == 0
    assert main([*_flags(tiny_model_dir, tmp_path / "cpu"), "--device", "cpu"]) == 0
    capsys.readouterr()
    plain, cpu = _manifest(tmp_path / "plain"), _manifest(tmp_path / "cpu")
    assert plain == cpu  # every shard's sha256, the tokens' and the recorded config
    assert [s["sha256"] for s in plain["hooks"][HOOK]["shards"]] == [
        s["sha256"] for s in cpu["hooks"][HOOK]["shards"]
    ]
    assert "device" not in plain["config"] and "model_dtype" not in plain["config"]
    # found complete whatever the device: rerunning with another --device rebuilds nothing
    shard = tmp_path / "cpu" / plain["hooks"][HOOK]["shards"][0]["file"]
    before = shard.stat().st_mtime_ns
    assert main([*_flags(tiny_model_dir, tmp_path / "cpu"), "--device", "auto"]) == 0
    assert shard.stat().st_mtime_ns == before
    # --config of the manifest reruns it (the device is the default, auto)
    manifest = str(tmp_path / "cpu" / "manifest.json")
    assert main(["cache", "--config", manifest, "--out", str(tmp_path / "cpu"), "--quiet", "--json"]) == 0
    assert shard.stat().st_mtime_ns == before
    # a model dtype other than float32 is another cache
    assert main([*_flags(tiny_model_dir, tmp_path / "cpu"), "--model-dtype", "bfloat16"]) == 2
    assert "differs in: model_dtype" in capsys.readouterr().err


def test_identity_leaves_out_the_device_and_keeps_the_model_dtype():
    assert (
        CacheConfig(device="cpu").identity()
        == CacheConfig(device="cuda:1").identity()
        == CacheConfig().identity()
    )
    assert "device" not in CacheConfig().identity()
    assert CacheConfig(model_dtype="bfloat16").identity()["model_dtype"] == "bfloat16"


def test_device_cuda_without_one_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    if torch.version.cuda is not None:
        pytest.skip("this torch build has CUDA")
    assert main([*_flags(tiny_model_dir, tmp_path / "c"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: no usable CUDA device here") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_a_cache_built_on_the_device(tiny_model, tiny_model_dir, tmp_path, device):
    """build_cache loads the model on `device`; the activations are those of the CPU (bit for bit there)."""
    settings = dict(
        hooks=(HOOK,),
        corpus="tiny-shakespeare",
        tokens=384,
        context_length=32,
        batch_size=4,
        shard_tokens=128,
    )
    reference = build_cache(
        CacheConfig(model="tiny", out=str(tmp_path / "ref"), **settings), model=tiny_model, progress=False
    )
    config = CacheConfig(model=str(tiny_model_dir), device=device, out=str(tmp_path / "dev"), **settings)
    on_device = ActivationCache(build_cache(config, progress=False))
    expected = ActivationCache(reference)
    assert on_device.n_shards(HOOK) == expected.n_shards(HOOK) == 3
    for index in range(3):
        got, want = on_device.shard(HOOK, index), expected.shard(HOOK, index)
        assert got.device.type == "cpu"
        if device == "cpu":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


class _Stub:
    """A model whose activations are functions of the tokens; token 13 gives a NaN row."""

    device = torch.device("cpu")
    bos_token_id = 0

    def width(self, hook: str) -> int:
        return 3

    def run_with_cache(self, tokens: torch.Tensor, hooks) -> dict[str, torch.Tensor]:
        t = tokens.float()
        x = torch.stack([t, 2 * t + 0.5, -t / 3], dim=-1)
        x[tokens == 13] = float("nan")
        return {hook: x + i for i, hook in enumerate(hooks)}


def _stub_cache(folder, windows, on_device: bool, monkeypatch) -> None:
    monkeypatch.setattr(activations, "is_cuda", lambda device: on_device)
    config = CacheConfig(
        model="stub", tokens=windows.numel(), batch_size=2, shard_tokens=4 * windows.shape[1]
    )
    write_cache(folder, config, _Stub(), ["a", "b"], windows, progress=False)


def test_the_gpu_path_writes_the_same_bytes(tmp_path, monkeypatch):
    """The device path (one upload per shard, pinned buffers, a shard handed over after the next
    is queued) run on the CPU: the same files as the CPU path."""
    windows = torch.arange(1, 14 * 8 + 1).reshape(14, 8) % 97 + 20  # 4 shards, the last one short
    _stub_cache(tmp_path / "cpu", windows, False, monkeypatch)
    _stub_cache(tmp_path / "gpu", windows, True, monkeypatch)
    assert _manifest(tmp_path / "cpu") == _manifest(tmp_path / "gpu")
    assert len(_manifest(tmp_path / "gpu")["hooks"]["a"]["shards"]) == 4


@pytest.mark.parametrize("on_device", [False, True])
def test_a_non_finite_row_is_named_on_either_path(tmp_path, monkeypatch, on_device):
    windows = torch.full((12, 8), 30)
    windows[9, 5] = 13  # shard 2 (windows 8..11)
    with pytest.raises(CacheError, match="hook a, window 9, position 5"):
        _stub_cache(tmp_path / "c", windows, on_device, monkeypatch)
    progress = json.loads((tmp_path / "c" / "progress.json").read_text())
    # the shards before it are kept (behind a GPU, three writer threads may finish them in any order)
    assert sorted(s["index"] for s in progress["shards"]) == [0, 1]
