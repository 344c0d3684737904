"""Devices: one probe of the hardware (workbench.devices), one-line errors, and nothing else asks
torch.cuda (issue 19)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from workbench import devices
from workbench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workbench", "sae", "circuits", "app")
PROBE = Path("workbench/devices.py")


def cuda_reads(source: str) -> list[int]:
    """Lines of `source` that reach torch.cuda: `torch.cuda...`, `import torch.cuda`, `from torch
    import cuda`, `from torch.cuda import ...`, or a `.cuda()` call."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "cuda":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name.startswith("torch.cuda") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("torch.cuda") or (
                module == "torch" and any(a.name == "cuda" for a in node.names)
            ):
                lines.append(node.lineno)
    return lines


def test_the_checker_finds_every_way_in():
    for source in (
        "import torch\ntorch.cuda.is_available()",
        "import torch.cuda",
        "from torch import cuda",
        "from torch.cuda import device_count",
        "x = t.cuda()",
    ):
        assert cuda_reads(source), source
    assert not cuda_reads("import torch\nx = torch.device('cuda')\ny = x.type == 'cuda'")


def test_only_the_probe_reads_torch_cuda():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative == PROBE:
                continue
            offenders += [f"{relative}:{line}" for line in cuda_reads(path.read_text())]
    assert not offenders, f"torch.cuda read outside {PROBE}: {offenders}"
    assert cuda_reads((ROOT / PROBE).read_text()), "the probe itself should be what reads torch.cuda"


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", " CPU "])
def test_device_spellings_are_accepted(spec):
    devices.check_device_spec(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "mps", "", "cpu:0", "cuda0"])
def test_other_spellings_are_one_line_errors(spec):
    with pytest.raises(ConfigError, match="auto .*cpu, cuda or cuda:N") as caught:
        devices.check_device_spec(spec)
    assert "\n" not in str(caught.value)


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(devices.DeviceError, match="no usable CUDA device") as caught:
        devices.resolve_device("cuda")
    assert "\n" not in str(caught.value) and "--device cpu" in str(caught.value)


def test_auto_is_this_ranks_gpu(monkeypatch):
    """With GPUs, auto and cuda mean cuda:LOCAL_RANK (one process per GPU under torchrun)."""
    monkeypatch.setattr(devices, "cuda_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert devices.resolve_device("auto") == torch.device("cuda", 2)
    assert devices.resolve_device("cuda") == torch.device("cuda", 2)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(devices.DeviceError, match="4 CUDA device"):
        devices.resolve_device("cuda:4")
    assert devices.distributed_backend(devices.resolve_device("auto")) == "nccl"
    assert devices.distributed_backend(torch.device("cpu")) == "gloo"


def test_cpu_helpers_are_no_ops():
    cpu = torch.device("cpu")
    devices.synchronize(cpu)
    devices.reset_peak_memory(cpu)
    devices.activate(cpu)
    assert devices.peak_memory(cpu) is None
    assert devices.describe(cpu) == "cpu"
    x = torch.ones(3)
    if devices.cuda_count() == 0:
        assert devices.pin(x) is x


@pytest.mark.parametrize(
    "name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_model_dtype_names(name, dtype):
    assert devices.model_dtype(name) is dtype


def test_unknown_dtype_names_are_one_line_errors():
    with pytest.raises(ConfigError, match="model dtype 'fp16' is not one of float32, bfloat16, float16"):
        devices.model_dtype("fp16")
    with pytest.raises(ConfigError, match="matmul dtype 'float16'"):
        devices.matmul_dtype("float16")


def test_the_model_runs_where_it_was_loaded(tiny_model_dir, device):
    from workbench.models import load_model

    model = load_model(str(tiny_model_dir), device=device)
    assert model.device.type == device
    tokens = torch.tensor([[model.bos_token_id, 5, 6, 7]])  # on the CPU: the model moves them
    assert model(tokens).device.type == device
    hook = model.default_hook
    assert model.run_with_cache(tokens, [hook])[hook].device.type == device


def test_a_bfloat16_model_computes_in_bfloat16(tiny_model_dir):
    from workbench.models import load_model

    model = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert model.dtype is torch.bfloat16
    assert model(torch.tensor([[model.bos_token_id, 5, 6]])).dtype is torch.bfloat16


def test_loading_on_a_missing_gpu_is_one_line(tiny_model_dir, monkeypatch):
    from workbench.models import load_model

    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    with pytest.raises(devices.DeviceError, match="--device cuda: no usable CUDA device"):
        load_model(str(tiny_model_dir), device="cuda")
