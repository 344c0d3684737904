"""Explanations file: natural-language explanations of a store's features, beside the store.

`<dir>/<stem>.explanations.json` sits beside the read-only store `<dir>/<stem>.duckdb` and is
written by `workbench explain` (`sae.explain`), read by the explorer. Format (`format_version` 1):

    {"format_version": 1,
     "runs": [{"endpoint", "model", "scorer_model", "prompt_version", "seed", ..., "time"}],
     "features": {"12": {"explanation": str, "source": "summary" | "llm", "explainer": str,
                         "detection": {"scorer", "accuracy", "precision", "recall", "f1", "n", ...}
                                      | null,
                         "run": int}}}

`runs` lists the settings of every run that wrote entries (never an API key, only the name of
the environment variable that held it), and each entry's `run` is its index there. Writing
merges: entries of other features are kept, those given replace theirs, and the file is
replaced atomically (temporary name + rename), so a reader never sees half a file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from workbench.errors import WorkbenchError
from workbench.files import read_json, write_json_atomic
from workbench.labels import companion_path

EXPLANATIONS_SUFFIX = ".explanations.json"
FORMAT_VERSION = 1
SOURCES = ("summary", "llm")


class ExplanationsError(WorkbenchError):
    """An explanations file that cannot be read or an entry that cannot be written."""


def explanations_path(store_path: str | os.PathLike) -> Path:
    """`<dir>/<stem>.explanations.json` for the store `<dir>/<stem>.duckdb` (or a folder holding
    `features.duckdb`)."""
    from workbench.store import STORE_FILE

    path = Path(store_path)
    return companion_path(path / STORE_FILE if path.is_dir() else path, EXPLANATIONS_SUFFIX)


def read_explanations(store_path: str | os.PathLike) -> dict[int, dict]:
    """{feature: entry} from the store's explanations file; {} when there is none. Each entry has
    `explanation` (str), `source` ("summary" | "llm"), `explainer` (model name or ""),
    `detection` (dict with accuracy, precision, recall, f1, n; or None) and `run` (index into
    `read_runs`). Raises ExplanationsError (one line, naming the file) for a damaged file."""
    return _features(_load(explanations_path(store_path)))


def read_runs(store_path: str | os.PathLike) -> list[dict]:
    """The settings of each run that wrote entries, oldest first ([] when there is no file)."""
    return list(_load(explanations_path(store_path)).get("runs", []))


def write_explanations(
    store_path: str | os.PathLike, entries: Mapping[int, Mapping[str, Any]], meta: Mapping[str, Any]
) -> Path:
    """Merge `entries` ({feature: entry}) into the store's explanations file, recording `meta`
    (the run's settings) as a new run, or adding to the run recorded with the same `meta["id"]`
    (a run that writes as it goes); returns the file's path. Entries given replace those of
    the same feature; others are kept. Raises ExplanationsError for a malformed entry or a
    damaged existing file, WorkbenchError when the folder is not writable."""
    path = explanations_path(store_path)
    current = _load(path)
    runs = list(current.get("runs", []))
    features = {str(k): v for k, v in _features(current).items()}
    if entries:
        ids = [run.get("id") for run in runs]
        if meta.get("id") is None or meta["id"] not in ids:  # a run writing again adds to its record
            runs.append({**dict(meta), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        index = len(runs) - 1 if meta.get("id") is None else [r.get("id") for r in runs].index(meta["id"])
        for feature, entry in entries.items():
            features[str(int(feature))] = {**_checked(int(feature), entry), "run": index}
    ordered = dict(sorted(features.items(), key=lambda item: int(item[0])))
    write_json_atomic(path, {"format_version": FORMAT_VERSION, "runs": runs, "features": ordered})
    return path


def _load(path: Path) -> dict:
    if not path.exists():
        return {}
    obj = read_json(path, "explanations file", ExplanationsError)
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise ExplanationsError(
            f"{path}: explanations format_version {version!r}, this workbench reads {FORMAT_VERSION}"
        )
    if not isinstance(obj.get("features", {}), dict) or not isinstance(obj.get("runs", []), list):
        raise ExplanationsError(f"{path}: 'features' must be an object and 'runs' a list")
    for key, entry in obj.get("features", {}).items():
        if not (key.isdigit() and isinstance(entry, dict)):
            raise ExplanationsError(f"{path}: feature {key!r} must be an integer key with an object")
    return obj


def _features(obj: dict) -> dict[int, dict]:
    return {int(key): dict(entry) for key, entry in obj.get("features", {}).items()}


def _checked(feature: int, entry: Mapping[str, Any]) -> dict:
    """The entry's known fields, checked: what the explorer reads must be there and typed."""
    if feature < 0:
        raise ExplanationsError(f"feature {feature} is negative")
    explanation, source = entry.get("explanation"), entry.get("source")
    if not isinstance(explanation, str):
        raise ExplanationsError(f"feature {feature}: explanation must be a string")
    if source not in SOURCES:
        raise ExplanationsError(f"feature {feature}: source must be one of {SOURCES}, not {source!r}")
    detection = entry.get("detection")
    if detection is not None and not (
        isinstance(detection, Mapping) and {"accuracy", "f1", "precision", "recall", "n"} <= set(detection)
    ):
        raise ExplanationsError(f"feature {feature}: detection must hold accuracy, f1, precision, recall, n")
    return {
        **dict(entry),
        "explanation": explanation,
        "source": source,
        "explainer": str(entry.get("explainer") or ""),
        "detection": None if detection is None else dict(detection),
    }
