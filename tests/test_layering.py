"""Imports flow one way: workbench -> sae -> circuits -> app. Nothing runs at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["workbench", "sae", "circuits", "app"]


def modules() -> list[Path]:
    return [p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))]


def imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_there_is_code_to_check():
    assert len(modules()) >= 10


def test_no_upward_imports():
    upward = []
    for path in modules():
        layer = path.relative_to(ROOT).parts[0]
        for name in imported_top_levels(path) & set(LAYERS):
            if LAYERS.index(name) > LAYERS.index(layer):
                upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, upward


def test_only_the_model_adapter_imports_transformer_lens():
    importers = [str(p.relative_to(ROOT)) for p in modules() if "transformer_lens" in imported_top_levels(p)]
    assert importers == ["workbench/models.py"]


# Streamlit page scripts: Streamlit executes them (that is their job); nothing imports them.
SCRIPTS = [ROOT / "app" / "explorer" / "main.py", *sorted((ROOT / "app" / "explorer" / "views").glob("*.py"))]


def test_importing_every_module_prints_nothing_and_loads_no_model_library():
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in modules() if p not in SCRIPTS]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'transformer_lens' not in sys.modules, 'transformer_lens imported at import time'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_no_module_imports_a_page_script():
    scripts = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in SCRIPTS}
    importers = [str(p.relative_to(ROOT)) for p in modules() for node in ast.walk(ast.parse(p.read_text()))
                 if isinstance(node, ast.ImportFrom) and node.module in scripts]
    assert len(SCRIPTS) >= 6 and not importers, importers


def test_importing_workbench_is_cheap():
    code = "import sys, workbench; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
