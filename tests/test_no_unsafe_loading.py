"""No pickle anywhere in the project's code: tensors go through safetensors, the rest through JSON.

Parsed with `ast`, so comments and strings that mention pickle do not count, and aliases
(`import pickle as p`, `from torch import load`) do."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "circuits", "sae", "workbench")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLING_METHODS = {"read_pickle", "to_pickle"}  # pandas
EVALUATORS = {"eval", "exec"}  # the builtins (module.eval() switches a torch module to inference)


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def problems(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append(f"from {node.module} import ...")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append("from torch import load")
        elif isinstance(node, ast.Call):
            found += _unsafe_call(node)
    return found


def _unsafe_call(call: ast.Call) -> list[str]:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    keywords = {k.arg: k.value for k in call.keywords}
    if name in PICKLING_METHODS or (isinstance(func, ast.Name) and name in EVALUATORS):
        return [f"{name}(...)"]
    if name == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch":
        safe = keywords.get("weights_only")
        if not (isinstance(safe, ast.Constant) and safe.value is True):
            return ["torch.load without weights_only=True"]
    if name == "load" and getattr(getattr(func, "value", None), "id", "") in ("np", "numpy"):
        allow = keywords.get("allow_pickle")
        if isinstance(allow, ast.Constant) and allow.value is True:
            return ["np.load(allow_pickle=True)"]
    return []


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_loading(path):
    assert problems(ast.parse(path.read_text(), str(path))) == []


def test_the_checker_catches_what_it_should():
    bad = """
import pickle
import joblib as jl
from dill import loads
from torch import load
import torch
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
numpy_array = np.load("a.npy", allow_pickle=True)
frame = pd.read_pickle("f")
eval("1 + 1")
model.eval()
"""
    assert len(problems(ast.parse(bad))) == 9  # every line but `import torch` and `model.eval()`
    fine = 'import torch\ntorch.load("x.pt", weights_only=True)\n# pickle in a comment\ntext = "pickle"\n'
    assert problems(ast.parse(fine)) == []
