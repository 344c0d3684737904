"""Circuits and the explorer's live model on a device (issue 19): every method runs where the model
is and gives the CPU's scores; `--device cpu` is today's output; bfloat16 models run; a missing GPU
is a one-line error before anything loads."""

from __future__ import annotations

import json

import pytest
import torch

from circuits.attribution import ablated_outputs, eap_scores, exact_scores
from circuits.catalog import load_task
from circuits.config import METHODS
from circuits.discover import discover, to_circuit
from circuits.evaluate import faithfulness_all
from circuits.features import _activations, feature_circuit
from circuits.tasks import induction_task
from circuits.transformer import from_gpt2
from tests.sae_cases import small
from tests.test_cli import run_cli
from workbench.devices import cuda_count

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
no_gpu_here = pytest.mark.skipif(cuda_count() > 0, reason="a CUDA device is usable here")


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """CUDA float32 against the CPU: the same numbers up to summation order."""
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-4, rtol=1e-3)


def gate_circuits(device: str) -> dict[str, dict]:
    """Every method on the or-gate (8 prompts): the circuit JSON of each."""
    model, task = load_task("or-gate", prompts=8, device=device)
    assert model.device.type == device and model.full_mask().device.type == device
    out = {}
    for method in METHODS:
        found = discover(model, task, method, steps=2)
        assert found.scores.device.type == "cpu" and found.kept.device.type == "cpu"
        faithful = faithfulness_all(model, task, found.mask(model))
        out[method] = to_circuit(model, task, found, metrics={"faithfulness": faithful}).to_json()
    return out


def test_every_method_runs_where_the_graph_model_is(device):
    here = gate_circuits(device)
    reference = here if device == "cpu" else gate_circuits("cpu")
    for method, circuit in here.items():
        scores = torch.tensor([e["score"] for e in circuit["edges"]])
        close(scores, torch.tensor([e["score"] for e in reference[method]["edges"]]))
        for ablation, value in circuit["metrics"]["faithfulness"].items():
            assert value == pytest.approx(reference[method]["metrics"]["faithfulness"][ablation], abs=1e-4)


def test_eap_and_exact_patching_on_the_tiny_gpt2(tiny_model, device):
    """EAP's and exact patching's scores on the device equal the CPU's (exact patching, a forward
    per edge, runs on the CPU in tests/test_circuits_attribution.py; here only where it is compared)."""
    graph = from_gpt2(tiny_model).to(device)
    task = induction_task(tiny_model.d_vocab, n=2, length=9, bos=tiny_model.bos_token_id, seed=2)
    ablated = ablated_outputs(graph, task)
    assert ablated.device.type == device
    eap = eap_scores(graph, task, ablated)
    assert eap.device.type == "cpu" and bool(eap.abs().max() > 0)
    if device != "cpu":
        exact = exact_scores(graph, task, ablated)
        assert exact.device.type == "cpu"
        cpu = from_gpt2(tiny_model)
        cpu_ablated = ablated_outputs(cpu, task)
        close(exact, exact_scores(cpu, task, cpu_ablated))
        close(eap, eap_scores(cpu, task, cpu_ablated))


def test_a_bfloat16_model_runs_eap_eap_ig_and_exact_patching(tiny_model_dir, device):
    from workbench.models import load_model

    model = load_model(str(tiny_model_dir), device=device, dtype="bfloat16")
    graph = from_gpt2(model)
    assert graph.dtype == torch.bfloat16 and graph.device.type == device
    task = induction_task(model.d_vocab, n=2, length=9, bos=model.bos_token_id, seed=2)
    for method in (
        ("eap", "eap-ig", "exact") if device != "cpu" else ("eap", "eap-ig")
    ):  # bf16 is slow on CPUs
        found = discover(graph, task, method, steps=1)
        assert found.scores.dtype == torch.float32 and bool(found.scores.isfinite().all()), method
        assert found.scores.abs().max() > 0, method
    task = induction_task(model.d_vocab, n=4, length=12, bos=model.bos_token_id, seed=3)
    dictionaries = {hook: _dictionary(model, task, hook, seed) for seed, hook in enumerate(HOOKS)}
    circuit = feature_circuit(model, task, dictionaries, steps=2, per_hook=3)
    assert all(isinstance(n.score, float) and n.score == n.score for n in circuit.nodes)


def _dictionary(model, task, hook: str, seed: int):
    """A small TopK dictionary whose latents point at the hook's centred activations, on the
    model's device."""
    sample = _activations(model, task.clean, [hook])[hook][:, 1:].reshape(-1, model.width(hook)).cpu()
    dictionary = small("topk", seed=seed, d_in=sample.shape[1], n_latents=24, k=4, aux_k=0)
    picks = sample[torch.randperm(len(sample), generator=torch.Generator().manual_seed(seed))[:24]]
    picks = picks - sample.mean(0)
    with torch.no_grad():
        dictionary.W_enc.copy_(picks / picks.norm(dim=1, keepdim=True))
        dictionary.W_dec.copy_(dictionary.W_enc)
        dictionary.b_dec.copy_(sample.mean(0))
    return dictionary.to(model.device)


def test_a_feature_circuit_runs_where_the_model_is(tiny_model, tiny_model_dir, device):
    from workbench.models import load_model

    model = tiny_model if device == "cpu" else load_model(str(tiny_model_dir), device=device)
    task = induction_task(model.d_vocab, n=4, length=12, bos=model.bos_token_id, seed=3)
    dictionaries = {hook: _dictionary(model, task, hook, seed) for seed, hook in enumerate(HOOKS)}
    circuit = feature_circuit(model, task, dictionaries, steps=2, per_hook=3)
    if device != "cpu":
        cpu_dicts = {hook: _dictionary(tiny_model, task, hook, seed) for seed, hook in enumerate(HOOKS)}
        reference = feature_circuit(tiny_model, task, cpu_dicts, steps=2, per_hook=3)
        # the same nodes (up to near-ties in the ranking) with the same effects
        mine = {n.id: n.score for n in circuit.nodes}
        for node in reference.nodes:
            if node.id in mine:
                assert mine[node.id] == pytest.approx(node.score, rel=1e-3, abs=1e-4)


def _circuit(capsys, *flags) -> dict:
    code, _, err = run_cli(capsys, "circuits", *flags, "--json")
    assert code == 0, err
    out = flags[flags.index("--out") + 1]
    saved = json.loads(open(out).read())
    saved["metrics"].pop("seconds")
    return saved


GATE = ("--task", "or-gate", "--prompts", "8", "--steps", "2", "--edges", "5")


def test_device_cpu_gives_the_default_circuit_and_old_files_rerun(capsys, tmp_path):
    default = _circuit(capsys, *GATE, "--out", str(tmp_path / "a.json"))
    on_cpu = _circuit(capsys, *GATE, "--device", "cpu", "--out", str(tmp_path / "b.json"))
    assert default["config"].pop("device") == "auto" and on_cpu["config"].pop("device") == "cpu"
    assert default == on_cpu
    # a circuit JSON written before the two fields existed reruns with their defaults
    old = json.loads((tmp_path / "a.json").read_text())
    del old["config"]["device"], old["config"]["model_dtype"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    again = _circuit(capsys, "--config", str(tmp_path / "old.json"), "--out", str(tmp_path / "c.json"))
    assert again["config"].pop("device") == "auto" and again["config"]["model_dtype"] == "float32"
    assert again == default


def test_cli_feature_circuit_moves_the_dictionaries_to_the_model(
    capsys, tiny_model, tiny_model_dir, tmp_path, device
):
    from sae.io import save

    task = induction_task(tiny_model.d_vocab, n=3, length=10, bos=tiny_model.bos_token_id, seed=1)
    folders = []
    for seed, hook in enumerate(HOOKS):
        folders.append(tmp_path / f"d{seed}")
        save(_dictionary(tiny_model, task, hook, seed), folders[-1], hook=hook, model=str(tiny_model_dir))
    flags = ["--dictionary", *map(str, folders), "--prompts", "3", "--length", "10", "--steps", "2"]
    saved = _circuit(
        capsys, *flags, "--features-per-hook", "3", "--device", device, "--out", str(tmp_path / "f.json")
    )
    assert saved["config"]["device"] == device and saved["method"] == "feature-ig"


def test_the_benchmark_runs_on_the_device(device):
    from circuits.benchmark import run_benchmark

    rows = list(run_benchmark(["or-gate"], ("exact", "eap"), prompts=8, device=device))
    assert [r["method"] for r in rows] == ["exact", "eap"] and rows[1]["roc_auc"] > 0.5


def test_bfloat16_is_refused_for_the_hand_set_models(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "circuits", *GATE, "--model-dtype", "bfloat16", "--out", str(tmp_path / "x")
    )
    assert code == 2 and err.count("\n") == 1 and "float32 model" in err
    code, _, err = run_cli(
        capsys, "circuits", *GATE, "--model-dtype", "float64", "--out", str(tmp_path / "x")
    )
    assert code == 2 and "model_dtype 'float64'" in err


@no_gpu_here
def test_circuits_device_cuda_is_a_one_line_error_before_anything_loads(capsys, tmp_path):
    for flags in (GATE, ("--model", str(tmp_path / "no-such-model")), ("--benchmark",)):
        code, out, err = run_cli(capsys, "circuits", *flags, "--device", "cuda", "--out", str(tmp_path / "x"))
        assert code == 2 and err.startswith("error: --device cuda: no usable CUDA device here")
        assert err.count("\n") == 1 and not list(tmp_path.iterdir())


# --- the explorer -----------------------------------------------------------------------------------------
@pytest.fixture
def launched(monkeypatch, tmp_path):
    """`workbench explore` up to the server start: the command line and environment it would run."""
    import app.explorer.launch as launch

    started = []

    class Done:
        status = 0

    monkeypatch.setattr(launch, "find_stores", lambda roots: [tmp_path / "features.duckdb"])
    monkeypatch.setattr(launch, "run_child", lambda command, env: started.append((command, env)) or Done())
    return started


def test_explore_passes_the_device_to_the_live_model(capsys, launched, monkeypatch):
    from app.explorer.launch import DEVICE_ENV

    code, _, err = run_cli(capsys, "explore", "somewhere", "--device", "cpu")
    assert code == 0 and launched[0][1][DEVICE_ENV] == "cpu", err
    from app.explorer.data import live_device

    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert live_device() == torch.device("cpu")
    monkeypatch.delenv(DEVICE_ENV)
    assert live_device().type == ("cuda" if cuda_count() else "cpu")  # unset: auto


@no_gpu_here
def test_explore_device_cuda_is_a_one_line_error_before_streamlit_starts(capsys, launched, monkeypatch):
    code, _, err = run_cli(capsys, "explore", "somewhere", "--device", "cuda")
    assert code == 2 and err.startswith("error: --device cuda: no usable CUDA device here")
    assert err.count("\n") == 1 and launched == []
    from app.explorer.data import live_device
    from app.explorer.launch import DEVICE_ENV
    from workbench.devices import DeviceError

    monkeypatch.setenv(DEVICE_ENV, "cuda:0")
    with pytest.raises(DeviceError):
        live_device()
