"""Training on a device (issue 19): the prefetching feed, the run's device and its identity,
exact resume on the device, the bf16 selection matmul, the process group's backend."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from sae import io
from sae.checkpoint import load_checkpoint
from sae.sources import TIMING, FeedClock, Prefetcher
from sae.synthetic import PlantedConfig, PlantedFeatures
from sae.train_config import TrainConfig
from sae.trainee import Trainee
from sae.training import _build_trainees, _plan, train
from tests.conftest import STORE_HOOK
from tests.test_cli import run_cli
from workbench import distributed
from workbench.devices import cuda_count
from workbench.errors import WorkbenchError
from workbench.kernels import (
    encode_at,
    encode_batch_topk,
    encode_feature_choice,
    encode_threshold,
    encode_topk,
    use_kernels,
)
from workbench.kernels.backend import use_matmul_dtype

DATA = PlantedConfig(d_in=16, n_planted=32, samples=2048, seed=3)  # 8 batches of 256 per epoch


def config(out, **overrides) -> TrainConfig:
    settings = dict(
        architectures=("topk",),
        k=(2,),
        n_latents=32,
        batch_size=256,
        tokens=4096,  # 16 steps: two epochs
        log_every=4,
        checkpoint_every=5,
        out=str(out),
    )
    return TrainConfig(**{**settings, **overrides})


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / io.WEIGHTS)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prefetch"]


# --- the feed ----------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_the_prefetcher_yields_every_item_in_order(depth):
    items = [(i, torch.full((3, 2), float(i))) for i in range(20)]
    got = list(Prefetcher(iter(items), "cpu", depth))
    assert [i for i, _ in got] == list(range(20))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, items))
    assert not prefetch_threads()


@pytest.mark.parametrize("depth", [0, 2])
def test_the_prefetcher_applies_its_transform_and_raises_the_sources_error_after_the_items_before_it(depth):
    def source():
        yield torch.ones(4)
        yield torch.ones(4) * 2
        raise ValueError("shard 3 is corrupt")

    feed = Prefetcher(source(), "cpu", depth, transform=lambda t: t[:2])
    assert torch.equal(next(feed), torch.ones(2)) and torch.equal(next(feed), torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="shard 3 is corrupt"):
        next(feed)
    with pytest.raises(StopIteration):
        next(feed)
    assert not prefetch_threads()


@pytest.mark.parametrize("depth", [0, 2])
def test_a_consumer_that_stops_early_stops_the_thread_and_closes_the_source(depth):
    read, closed = [], []

    def source():
        try:
            for i in range(1000):
                read.append(i)
                yield torch.tensor([i])
        finally:
            closed.append(True)

    with Prefetcher(source(), "cpu", depth) as feed:
        assert [int(next(feed)) for _ in range(3)] == [0, 1, 2]
        time.sleep(0.05)  # the thread fills its queue, then waits
    assert closed == [True] and not prefetch_threads()
    assert len(read) <= 3 + depth + 1  # read ahead by at most the queue (and the item in hand)


def small_cache(folder, shards: int = 4, rows: int = 300, d: int = 8):
    """A --from style cache (no tokens) of `shards` float16 shards, written directly."""
    from workbench.files import save_tensors_atomic

    entries = []
    for i in range(shards):
        file = f"h/shard-{i:05d}.safetensors"
        x = torch.randn(rows, d, generator=torch.Generator().manual_seed(i)).half()
        entries.append(
            {"file": file, "rows": rows, "sha256": save_tensors_atomic(folder / file, {"activations": x})}
        )
    manifest = {
        "format_version": 1,
        "model": "",
        "has_tokens": False,
        "hooks": {"h": {"d": d, "shards": entries}},
    }
    manifest.update(dtype="float16", context_length=1, n_windows=rows * shards, bos_token_id=-1)
    manifest.update(tokens_sha256="", held_out={"fraction": 0.0, "seed": 0}, config={})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_reading_shards_ahead_gives_the_same_batches_and_the_same_errors(tmp_path):
    from workbench.cache_reader import ActivationCache
    from workbench.errors import CacheError

    cache = ActivationCache(small_cache(tmp_path))
    read = lambda ahead: list(cache.batches("h", 64, buffer_rows=500, read_ahead=ahead))  # noqa: E731
    plain, ahead = read(False), read(True)
    assert len(plain) == len(ahead) == 19
    assert all(
        torch.equal(a.activations, b.activations) and torch.equal(a.rows, b.rows)
        for a, b in zip(plain, ahead)
    )
    third = tmp_path / "h" / "shard-00002.safetensors"  # the last shard read in epoch 0's order
    third.write_bytes(third.read_bytes()[:-8])
    for ahead in (False, True):
        fresh, got = ActivationCache(tmp_path), []
        with pytest.raises(CacheError, match="shard-00002"):
            got.extend(fresh.batches("h", 64, buffer_rows=500, read_ahead=ahead))
        assert len(got) == 9  # the batches made before the corrupt shard's turn
    assert not [t for t in threading.enumerate() if t.name.startswith("cache-read-ahead")]


def test_the_feed_clock_counts_waiting_against_wall_time():
    clock = FeedClock()

    def slow():
        while True:
            time.sleep(0.02)
            yield 0

    feed = slow()
    for _ in range(3):
        clock.waiting(feed)
        time.sleep(0.02)  # the "step"
        clock.count(100)
    lap = clock.lap()
    assert set(lap) == set(TIMING) and 0.3 < lap["data_wait_fraction"] < 0.7
    assert 2000 < lap["tokens_per_s"] < 7500 and set(clock.totals()) == set(TIMING)
    assert FeedClock().totals() == {}


def test_prefetched_training_is_bit_for_bit_the_synchronous_one(tmp_path):
    """The reading thread (here on the CPU, depth 2) feeds the same batches in the same order,
    across the epoch boundary, as the loop reading them itself."""
    data = PlantedFeatures(DATA)
    plain = train(config(tmp_path / "plain"), source=data, progress=False)[0]
    ahead = train(config(tmp_path / "ahead"), source=data, progress=False, prefetch=2)[0]
    assert (plain / io.WEIGHTS).read_bytes() == (ahead / io.WEIGHTS).read_bytes()
    assert not prefetch_threads()
    metrics = json.loads((ahead / io.CONFIG).read_text())["metrics"]
    assert metrics["tokens_per_s"] > 0 and 0 <= metrics["data_wait_fraction"] <= 1
    record = [json.loads(line) for line in (ahead / "log.jsonl").read_text().splitlines()][-1]
    assert set(TIMING) <= set(record)


# --- the run's device --------------------------------------------------------------------
def test_training_runs_on_the_device_and_resumes_exactly(device, tmp_path, monkeypatch):
    data = PlantedFeatures(DATA)
    kind = torch.device(device).type
    seen: set[str] = set()
    step = Trainee.step

    def watched(self, x, *args):
        seen.update({x.device.type, *(p.device.type for p in self.dictionary.parameters())})
        seen.update(v.device.type for s in self.optimizer.state.values() for v in s.values())
        seen.update({self.tokens_since_fired.device.type, self.firing_rate.device.type})
        return step(self, x, *args)

    monkeypatch.setattr(Trainee, "step", watched)
    grid = dict(architectures=("topk", "jumprelu"), device=device)
    whole = train(config(tmp_path / "whole", **grid), source=data, progress=False)
    assert seen == {kind}
    assert train(config(tmp_path / "cut", **grid), source=data, progress=False, stop_after_step=7) == []
    trainees = _build_trainees(_plan(config(tmp_path / "cut", **grid), data), torch.device(device))
    state = load_checkpoint(tmp_path / "cut", trainees)
    assert state is not None and state.step == 5
    for trainee in trainees:  # the checkpoint loads onto the device, Adam moments included
        assert {t.device.type for k, t in trainee.state_tensors().items() if k != "resampling"} == {kind}
    resumed = train(config(tmp_path / "cut", **grid), source=data, progress=False)
    for a, b in zip(whole, resumed):
        wa, wb = weights(a), weights(b)
        if kind == "cpu":
            assert all(torch.equal(wa[name], wb[name]) for name in wa), a.name
        else:  # CUDA's float atomics (index_add_) may reorder sums between any two runs
            assert all(torch.allclose(wa[name], wb[name], rtol=1e-4, atol=1e-5) for name in wa), a.name


def test_the_device_is_not_part_of_the_run_but_the_matmul_dtype_is(tmp_path):
    data = PlantedFeatures(DATA)
    folders = train(config(tmp_path, device="cpu"), source=data, progress=False)
    stamp = (folders[0] / io.WEIGHTS).stat().st_mtime_ns
    assert train(config(tmp_path, device="auto"), source=data, progress=False) == folders
    assert (folders[0] / io.WEIGHTS).stat().st_mtime_ns == stamp  # found finished, not retrained
    with pytest.raises(
        WorkbenchError, match=r"holds a different training run \(train-config.json differs in: matmul_dtype\)"
    ):
        train(config(tmp_path, matmul_dtype="bfloat16"), source=data, progress=False)


def test_train_configs_written_before_the_device_fields_read_them_as_defaults():
    from tests.test_sae_training import FIXTURES

    for name in ("train-config-v1.json", "train-config-v2.json"):
        loaded = TrainConfig.from_json(json.loads((FIXTURES / name).read_text()))
        assert loaded.device == "auto" and loaded.matmul_dtype == "float32"
    saved = config("x", device="cuda:1", matmul_dtype="bfloat16").to_json()
    assert saved["format_version"] == 3 and TrainConfig.from_json(saved).device == "cuda:1"
    for bad, message in (({"device": "gpu"}, "device 'gpu'"), ({"matmul_dtype": "float16"}, "matmul_dtype")):
        with pytest.raises(WorkbenchError, match=message):
            config("x", **bad)


def test_workbench_train_on_device_cpu_writes_the_default_runs_bytes(tiny_cache, tmp_path, capsys):
    argv = ["train", "--cache", str(tiny_cache), "--hook", STORE_HOOK, "--arch", "topk", "--k", "4"]
    argv += ["--expansion", "2", "--batch-size", "256", "--tokens", "2048", "--quiet", "--json"]
    code, out, _ = run_cli(capsys, *argv, "--out", str(tmp_path / "default"))
    assert code == 0 and "data_wait_%" in out and "tokens_per_s" in out
    assert run_cli(capsys, *argv, "--out", str(tmp_path / "cpu"), "--device", "cpu")[0] == 0
    default, cpu = tmp_path / "default" / "topk-k4-x2", tmp_path / "cpu" / "topk-k4-x2"
    assert (default / io.WEIGHTS).read_bytes() == (cpu / io.WEIGHTS).read_bytes()


@pytest.mark.skipif(cuda_count() > 0, reason="this machine has a CUDA device")
def test_workbench_train_on_a_missing_gpu_is_a_one_line_error(capsys, tmp_path):
    for device in ("cuda", "cuda:1"):
        code, _, err = run_cli(capsys, "train", "--device", device, "--out", str(tmp_path), "--nproc", "2")
        assert code == 2 and err.startswith(f"error: --device {device}: no usable CUDA device here")
        assert err.strip().count("\n") == 0
    assert not any(tmp_path.iterdir())  # refused before anything was read or written


def test_ranks_join_the_backend_of_their_device(monkeypatch):
    joined, activated = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", joined.append)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.devices, "activate", activated.append)
    assert distributed.ranks() == distributed.Ranks(1, 2)
    distributed.ranks(torch.device("cpu"))
    distributed.ranks(torch.device("cuda", 1))
    assert joined == ["gloo", "gloo", "nccl"] and activated[-1] == torch.device("cuda", 1)
    assert distributed.check_rank_devices("cpu", 4) == torch.device("cpu")


# --- the bf16 selection matmul -----------------------------------------------------------
ENCODERS = {
    "topk": lambda x, w, b, s: encode_topk(
        x, w, b, 16, shift=s, aux_k=8, aux_mask=torch.arange(512) % 3 == 0
    ),
    "batchtopk": lambda x, w, b, s: encode_batch_topk(x, w, b, 16, shift=s),
    "threshold": lambda x, w, b, s: encode_threshold(x, w, b, torch.full((512,), 4.0), window=0.5, shift=s),
    "feature_choice": lambda x, w, b, s: encode_feature_choice(x, w, b, 10, shift=s),
}


def encoder_inputs(device: str):
    """x [300, 64]; encoder weight [512, 64], bias [512] and shift [64], which take gradients."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(300, 64, generator=g), torch.randn(512, 64, generator=g)
    b, s = torch.randn(512, generator=g), torch.randn(64, generator=g)
    return [x.to(device), *(t.to(device).requires_grad_() for t in (w, b, s))]


def entries(codes) -> set[tuple[int, int]]:
    return set(zip(codes.row_ids().tolist(), codes.flat_indices().tolist()))


@pytest.mark.parametrize("name", ENCODERS)
def test_a_bf16_selection_keeps_most_entries_with_exact_values_and_gradients(name, device):
    x, w, b, s = encoder_inputs(device)
    encode = ENCODERS[name]
    exact = encode(x, w, b, s)
    with use_matmul_dtype(torch.bfloat16):
        codes = encode(x, w, b, s)
        with use_kernels("eager"):
            twin = encode(x, w, b, s)
    chosen = entries(codes)
    assert len(chosen & entries(exact)) >= 0.97 * len(entries(exact))  # only entries near a cut move
    assert chosen == entries(twin) and codes.values.dtype == torch.float32
    if codes.extra is not None:
        assert entries(codes.extra) == entries(twin.extra)
    dense = ((x - s) @ w.t() + b).detach()  # the fp32 pre-activations
    at = dense[codes.row_ids(), codes.flat_indices()]
    torch.testing.assert_close(codes.flat_values().detach(), at, rtol=1e-5, atol=1e-5)
    g = torch.randn(codes.flat_values().shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad((codes.flat_values() * g).sum(), (w, b, s))
    eager = torch.autograd.grad((twin.flat_values() * g).sum(), (w, b, s))
    for got, want in zip(grads, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_float32_matmul_dtype_is_the_default_path_bit_for_bit(device):
    x, w, b, s = encoder_inputs(device)
    for encode in ENCODERS.values():
        plain = encode(x, w, b, s)
        with use_matmul_dtype(torch.float32):
            same = encode(x, w, b, s)
        assert torch.equal(plain.flat_indices(), same.flat_indices())
        assert torch.equal(plain.flat_values(), same.flat_values())
    codes = encode_topk(x, w, b, 8)
    with use_matmul_dtype(torch.bfloat16):  # encode_at chooses nothing: exact as ever
        assert torch.equal(encode_at(x, w, b, codes).values, encode_at(x, w, b, codes).values)
    with pytest.raises(WorkbenchError, match="matmul dtype"):
        with use_matmul_dtype(torch.float16):
            pass


def test_training_with_a_bf16_selection_matmul_reaches_the_fp32_fvu(tmp_path):
    data = PlantedFeatures(DATA)
    fvu = {}
    for dtype in ("float32", "bfloat16"):
        folder = train(config(tmp_path / dtype, matmul_dtype=dtype), source=data, progress=False)[0]
        meta = json.loads((folder / io.CONFIG).read_text())
        assert meta["config"]["matmul_dtype"] == dtype
        fvu[dtype] = meta["metrics"]["fvu"]
    assert fvu["bfloat16"] == pytest.approx(fvu["float32"], rel=0.05, abs=0.01)
