"""Where the project keeps files it derives once and reuses (dequantized models, tokenized corpora)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_RUNS_DIR = Path("runs")


def user_cache_dir() -> Path:
    """`$WORKBENCH_HOME`, else `$XDG_CACHE_HOME/workbench`, else `~/.cache/workbench`."""
    if home := os.environ.get("WORKBENCH_HOME"):
        return Path(home)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "workbench"


def assets_dir() -> Path:
    return Path(__file__).resolve().parent / "assets"
