"""Imports flow one way: workbench -> sae -> circuits -> app, with no cycle among the modules'
top-level imports, and no module reaches into another's `_private` names. Nothing runs at
import time."""

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
    names = [module_name(p) for p in modules() if p not in SCRIPTS]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'transformer_lens' not in sys.modules, 'transformer_lens imported at import time'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_no_module_imports_a_page_script():
    scripts = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in SCRIPTS}
    importers = [
        str(p.relative_to(ROOT))
        for p in modules()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module in scripts
    ]
    assert len(SCRIPTS) >= 6 and not importers, importers


def test_importing_workbench_is_cheap():
    code = "import sys, workbench; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


OURS = {module_name(p): p for p in modules()}


def resolve(module: str | None, level: int, importer: str) -> str | None:
    """The absolute name `from <level dots><module> import ...` refers to inside `importer`."""
    if level == 0:
        return module
    package = importer if OURS[importer].name == "__init__.py" else importer.rpartition(".")[0]
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{module}" if module else base


def import_nodes(tree: ast.AST, module_level: bool):
    """Import statements; with `module_level`, only those run when the module is imported (not
    inside functions)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        skip = module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if not skip:
            stack.extend(ast.iter_child_nodes(node))


def imported_modules(name: str, module_level: bool = True) -> set[str]:
    """Our modules `name` imports: `from pkg import mod` counts as mod when that is a module."""
    found = set()
    for node in import_nodes(ast.parse(OURS[name].read_text()), module_level):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        else:
            source = resolve(node.module, node.level, name)
            found |= {f"{source}.{a.name}" if f"{source}.{a.name}" in OURS else source for a in node.names}
    return found & set(OURS)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert resolve("base", 1, "sae.peers") == "sae.base" and resolve(None, 2, "sae.io") == "sae"


def test_no_module_level_import_cycle():
    """A cycle makes what a module sees depend on which one was imported first."""
    graph = {name: imported_modules(name) - {name} for name in OURS}
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(name: str, text: str) -> list[str]:
    """Where module `name` (source `text`) reaches another of our modules' `_private` names:
    `from m import _x`, or `m._x` with `m` bound to one of our modules by an import (anywhere in
    the file). Private attributes of objects (`obj._x`) are not followed."""
    tree, uses = ast.parse(text), []
    bound = {}  # local name -> our module it refers to
    for node in import_nodes(tree, module_level=False):
        if isinstance(node, ast.Import):
            bound |= {
                alias.asname or alias.name.split(".")[0]: alias.name
                if alias.asname
                else alias.name.split(".")[0]
                for alias in node.names
            }
            continue
        source = resolve(node.module, node.level, name)
        for alias in node.names:
            if f"{source}.{alias.name}" in OURS:
                bound[alias.asname or alias.name] = f"{source}.{alias.name}"
            if source in OURS and source != name and is_private(alias.name):
                uses.append(f"{name}:{node.lineno} imports {alias.name} from {source}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                target = ".".join([bound[value.id], *chain])
                if target in OURS and target != name:
                    uses.append(f"{name}:{node.lineno} uses {target}.{node.attr}")
    return uses


def test_the_private_name_check_finds_imports_and_module_attributes():
    text = (
        "from sae.analyze import _stream, AnalyzeConfig\nfrom . import io as sae_io\nimport sae.base\n"
        "def f(x):\n    from workbench import files\n"
        "    return sae_io._load_ours, sae.base._REGISTRY, files._x, x._y, __name__\n"
    )
    assert [use.split(" ", 1)[1] for use in private_uses("sae.peers", text)] == [
        "imports _stream from sae.analyze",
        "uses sae.io._load_ours",
        "uses sae.base._REGISTRY",
        "uses workbench.files._x",
    ]


def test_no_module_uses_another_modules_private_names():
    """`_name` is private to the module that defines it; what others need is made public."""
    uses = [use for name, path in OURS.items() for use in private_uses(name, path.read_text())]
    assert not uses, uses
