"""Dictionaries run where the model is (issue 19): eval, analyze, probe, codebook-finetune and the
benches of analyze/codebook take --device (a device this machine lacks is a one-line error before
anything loads); splice/steer/sweep move a dictionary held elsewhere to the model's device instead
of refusing it, and a bfloat16 model runs a float32 dictionary. Parametrized over the `device`
fixture: the CPU here, CUDA in the GPU check."""

from __future__ import annotations

import pytest
import torch

from sae.splicing import on_device, splice
from sae.steering import add, clamp, steer
from tests.conftest import STORE_HOOK, tiny_dictionary
from workbench.devices import DeviceError, cuda_count

NO_CUDA = pytest.mark.skipif(cuda_count() > 0, reason="this machine has a CUDA device")
TEXT = "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?"


@NO_CUDA
@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "no-such-run"],
        ["analyze", "no-such-run"],
        ["probe", "--cache", "no-such-cache"],
        ["codebook-finetune", "--model", "no-such-model"],
        ["bench", "analyze", "--tokens", "64"],
        ["bench", "codebook", "--model-steps", "1"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_device_cuda_without_one_is_a_one_line_error_before_anything_loads(argv, capsys):
    from app.cli import main

    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: no usable CUDA device here") and err.count("\n") == 1


def test_configs_record_the_device_and_refuse_bad_spellings():
    from sae.analyze import AnalyzeConfig
    from sae.bench_analyze import AnalyzeBenchConfig
    from sae.codebook_finetune import FinetuneConfig
    from sae.evals import EvalConfig
    from sae.probes import ProbeConfig
    from sae.tokfsm import CodebookBenchConfig
    from workbench.errors import ConfigError

    for cls in (
        EvalConfig,
        AnalyzeConfig,
        ProbeConfig,
        FinetuneConfig,
        AnalyzeBenchConfig,
        CodebookBenchConfig,
    ):
        assert cls().device == "auto" and cls(device="cuda:1").device == "cuda:1"
        with pytest.raises(ConfigError, match="gpu"):
            cls(device="gpu")
    for cls in (EvalConfig, AnalyzeConfig, FinetuneConfig, CodebookBenchConfig):
        assert cls().model_dtype == "float32" and cls(model_dtype="bfloat16").model_dtype == "bfloat16"
        with pytest.raises(ConfigError, match="model_dtype 'fp16'"):
            cls(model_dtype="fp16")


def test_load_puts_the_dictionary_on_the_device(tiny_run, device):
    from sae.io import load

    assert load(tiny_run, device=device).W_dec.device.type == device
    assert load(tiny_run).W_dec.device.type == "cpu"  # the default stays the CPU


@NO_CUDA
def test_load_on_a_missing_gpu_is_a_device_error(tiny_run):
    from sae.io import load

    with pytest.raises(DeviceError, match="no usable CUDA device"):
        load(tiny_run, device="cuda")


def test_on_device_copies_only_when_the_device_differs(tiny_cache, device):
    dictionary = tiny_dictionary("jumprelu", tiny_cache)
    moved = on_device(dictionary, torch.device(device) if device == "cpu" else torch.device(device, 0))
    assert dictionary.W_dec.device.type == "cpu"  # the caller's object stays where it was
    assert all(t.device.type == device for t in [*moved.parameters(), *moved.buffers()])
    assert (moved is dictionary) == (device == "cpu") and moved.meta == dictionary.meta
    torch.testing.assert_close(moved.W_dec.cpu(), dictionary.W_dec)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """One tiny model per (device, dtype) asked for, loaded once."""
    from workbench.models import load_model

    loaded: dict = {}

    def get(device: str, dtype: str = "float32"):
        if (device, dtype) not in loaded:
            loaded[device, dtype] = load_model(str(tiny_model_dir), device=device, dtype=dtype)
        return loaded[device, dtype]

    return get


def test_splice_moves_a_dictionary_held_elsewhere(models, tiny_cache, device):
    model, reference = models(device), models("cpu")
    dictionary = tiny_dictionary("topk", tiny_cache)  # on the CPU whatever the model's device
    tokens = model.tokenize(TEXT)
    with torch.no_grad():
        with splice(reference, dictionary):
            expected = reference(tokens)
        with splice(model, dictionary):
            spliced = model(tokens)
        with splice(model, dictionary, error_term=True):
            routed = model(tokens)
        clean = model(tokens)
    assert spliced.device.type == device and dictionary.W_dec.device.type == "cpu"
    torch.testing.assert_close(spliced.cpu(), expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(routed, clean, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(spliced, clean, atol=1e-3)


def test_steer_moves_its_edits_to_the_model(models, tiny_cache, device):
    model, reference = models(device), models("cpu")
    dictionary = tiny_dictionary("jumprelu", tiny_cache)
    tokens = model.tokenize(TEXT)
    mask = torch.zeros(tokens.shape[1], dtype=torch.bool)
    mask[3:7] = True  # a host mask steers a model on any device
    edits = [add(dictionary, 5, 6.0), clamp(dictionary, 7, 2.0)]
    with torch.no_grad():
        with steer(reference, edits, positions=mask):
            expected = reference(tokens)
        with steer(model, edits, positions=mask) as report:
            steered = model(tokens)
        with steer(model, edits, positions="prompt"):
            model.generate("ROMEO:", max_new_tokens=3)
    assert report.positions_edited[STORE_HOOK] == 4
    assert edits[0].direction.device.type == "cpu" and edits[1].dictionary is dictionary
    torch.testing.assert_close(steered.cpu(), expected, atol=1e-3, rtol=1e-3)


def test_sweep_runs_on_the_models_device(models, tiny_cache, device):
    from sae.dose_response import sweep

    dictionary = tiny_dictionary("topk", tiny_cache)
    rows = sweep(
        models(device), clamp(dictionary, 5, 0.0), [0.0, 8.0], ["ROMEO:"], ["the"], TEXT, max_new_tokens=3
    )
    assert [r.strength for r in rows] == [0.0, 8.0] and all(r.kl_neutral >= 0 for r in rows)


@pytest.mark.parametrize("arch", ["topk", "codebook"])
def test_a_bfloat16_model_runs_a_float32_dictionary(models, tiny_cache, device, arch):
    """Activations are cast to the dictionary's dtype to encode and the edits come back in the
    activation's dtype, so the bf16 forward carries on (no dtype errors, bf16 downstream)."""
    model = models(device, "bfloat16")
    dictionary = tiny_dictionary("topk", tiny_cache)
    if arch == "codebook":
        from sae.base import create
        from sae.config import DictionaryConfig

        dictionary = create(DictionaryConfig(architecture="codebook", d_in=64, n_latents=32, k=2))
        dictionary.meta = {"hook": STORE_HOOK}
    assert model.dtype == torch.bfloat16 and dictionary.W_dec.dtype == torch.float32
    tokens = model.tokenize(TEXT)
    seen: list = []
    grab = ("blocks.1.hook_resid_pre", lambda a, hook=None: seen.append(a.dtype))
    with torch.no_grad():
        clean = model(tokens)
        with splice(model, dictionary), model.hooks([grab]):
            spliced = model(tokens)
        with splice(model, dictionary, error_term=True):
            routed = model(tokens)
        with steer(model, [add(dictionary, 3, 4.0), clamp(dictionary, 5, 1.0)]), model.hooks([grab]):
            steered = model(tokens)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert spliced.dtype == steered.dtype == torch.bfloat16
    assert torch.isfinite(spliced).all() and torch.isfinite(steered).all()
    torch.testing.assert_close(routed, clean, atol=0.05, rtol=0.02)


def test_eval_runs_on_the_models_device(models, tiny_model_dir, device):
    from sae.evals import EvalConfig, evaluate
    from tests.test_sae_evals import relu_dictionary

    model = models(device)
    dictionary = relu_dictionary(tiny_model_dir, model.width(STORE_HOOK), exact=True)
    metrics = evaluate(
        dictionary, EvalConfig(tokens=128, batch_size=4, probe_tokens=124), model=model, progress=False
    )
    assert dictionary.W_dec.device.type == "cpu"
    assert metrics["fvu"] < 1e-10 and metrics["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)
    assert (
        metrics["device"] == str(model.device) and metrics["model_dtype"] == "float32"
    )  # what made eval.json
    assert "sparse_probing_latents" in metrics or metrics.get("sparse_probing", {}).get("tasks") == {}


def test_eval_rows_runs_on_the_configs_device(tiny_cache, device):
    from sae.evals import EvalConfig, evaluate_rows

    dictionary = tiny_dictionary("topk", tiny_cache)
    here = evaluate_rows(dictionary, EvalConfig(tokens=1024, cache=str(tiny_cache), device="cpu"), False)
    there = evaluate_rows(dictionary, EvalConfig(tokens=1024, cache=str(tiny_cache), device=device), False)
    assert there["tokens"] == here["tokens"] == 1024
    assert there["fvu"] == pytest.approx(here["fvu"], rel=1e-4)
    assert there["l0"] == pytest.approx(here["l0"], abs=0.05)
    from sae.evals import evaluate
    from workbench.errors import ConfigError

    no_model = EvalConfig(tokens=1024, cache=str(tiny_cache), model_dtype="bfloat16")
    with pytest.raises(ConfigError, match="eval on cache rows runs no model; drop --model-dtype bfloat16"):
        evaluate(dictionary, no_model, progress=False)


def test_analyze_runs_on_the_models_device(models, tiny_cache, tmp_path, device):
    from sae.analyze import AnalyzeConfig, analyze
    from workbench.store import FeatureStore

    dictionary = tiny_dictionary("topk", tiny_cache)
    config = AnalyzeConfig(
        cache=str(tiny_cache), top=3, quantile_bins=2, per_bin=2, context_before=2, context_after=1
    )
    stores = {}
    for where in dict.fromkeys(("cpu", device)):
        out = tmp_path / f"{where}.duckdb"
        analyze(
            dictionary,
            AnalyzeConfig(**{**config.__dict__, "out": str(out)}),
            model=models(where),
            progress=False,
        )
        stores[where] = FeatureStore(out)
    here, there = stores["cpu"], stores[device]
    assert there.meta["tokens_analyzed"] == here.meta["tokens_analyzed"]
    a = here.features(order_by="feature", descending=False, limit=10_000)
    b = there.features(order_by="feature", descending=False, limit=10_000)
    assert abs(int(a.fired.sum()) - int(b.fired.sum())) <= 0.01 * int(a.fired.sum())
    assert dictionary.W_dec.device.type == "cpu"
    for store in stores.values():
        store.close()


def test_probe_sweep_ranks_on_the_device_and_fits_on_the_host(device):
    from sae.probes import sweep

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=generator)
    y = x[:, 4] + 0.3 * torch.randn(400, generator=generator) > 0
    here = sweep(x[:300], y[:300], x[300:], y[300:], (1, 3))
    there = sweep(x[:300].to(device), y[:300], x[300:].to(device), y[300:], (1, 3))
    assert here[0]["features_chosen"] == [4] and [r["features_chosen"] for r in there] == [
        r["features_chosen"] for r in here
    ]
    assert [r["balanced_accuracy"] for r in there] == pytest.approx([r["balanced_accuracy"] for r in here])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_codebook_finetune_trains_on_the_models_device(models, device, dtype):
    from sae.codebook_finetune import FinetuneConfig, finetune_codebook

    model = models(device, dtype)
    windows = model.tokenize(["ROMEO: But soft, what light through yonder window breaks?"] * 4)
    config = FinetuneConfig(codes=16, k=2, steps=3, batch_size=2)
    codebook, losses = finetune_codebook(model, STORE_HOOK, windows, config, progress=False)
    assert codebook.W_dec.device.type == device and codebook.W_dec.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    for param in model.bridge.parameters():
        param.requires_grad_(False)
