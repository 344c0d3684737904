"""Mechanical gates: ruff (pyflakes, import order, line length, and `ruff format`) over the code,
pyright (basedpyright, basic mode) over the files pyproject.toml names, and the lazy `sae` exports
as type checkers see them."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import need

ROOT = Path(__file__).resolve().parents[1]
LINTED = ("workbench", "sae", "circuits", "app", "tests", "benchmarks")


def _sae_exports() -> list[str]:
    import sae

    return sorted(sae._EXPORTS)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_finds_no_unused_or_undefined_names_unsorted_imports_or_long_lines():
    need("ruff", "dev")
    result = _run("ruff", "check", "--output-format", "concise", "--no-cache", *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_the_code_unchanged():
    need("ruff", "dev")
    result = _run("ruff", "format", "--check", "--no-cache", *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pyright_finds_no_errors_in_the_checked_files():
    need("basedpyright", "dev")
    result = _run("basedpyright", "--pythonpath", sys.executable)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr


def test_pyright_checks_files_that_exist():
    """A moved module would otherwise leave pyright checking nothing, and passing."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pyright"]["include"]
    assert include and all((ROOT / path).exists() for path in include), include


def test_lazy_sae_exports_are_the_names_type_checkers_see():
    """`sae/__init__.py` resolves names at run time from _EXPORTS; type checkers read the
    `if TYPE_CHECKING:` imports and __all__. The three must name the same objects."""
    import sae

    tree = ast.parse((ROOT / "sae" / "__init__.py").read_text())
    static: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imported in node.body:
                assert isinstance(imported, ast.ImportFrom) and imported.module, ast.dump(imported)
                static.update({alias.asname or alias.name: imported.module for alias in imported.names})
    assert static == sae._EXPORTS
    assert sorted(sae.__all__) == sorted(sae._EXPORTS)
    assert all(hasattr(importlib.import_module(module), name) for name, module in sae._EXPORTS.items())


# The import system binds a loaded submodule sae.X to the attribute X of `sae`: an export named
# like its own module would become the module once anything imported that module (sae.train was).
@pytest.mark.parametrize("name", _sae_exports())
def test_lazy_sae_export_is_still_the_export_after_its_module_loads(name):
    import sae

    module = importlib.import_module(sae._EXPORTS[name])
    assert getattr(sae, name) is getattr(module, name)
