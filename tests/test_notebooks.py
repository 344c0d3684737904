"""The notebooks are stored without outputs and check what they show (pytest --nbmake runs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_steering.ipynb",
        "03_circuits.ipynb",
        "04_codebooks_and_probes.ipynb",
        "05_attribution_graphs.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_and_asserts(path):
    notebook = json.loads(path.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), "outputs must be stripped"
    assert (
        sum("assert " in "".join(c["source"]) for c in code) >= len(code) - 1
    )  # (nearly) every cell checks itself
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
