"""User labels and notes per feature, in a writable JSON file beside the read-only feature store.

`<dir>/<stem>.labels.json` next to `<dir>/<stem>.duckdb`:

    {"version": 1, "labels": {"12": {"label": "KING speaker tag", "notes": "fires on ..."}}}

Every write re-reads the file, changes one entry and replaces the file atomically (temporary
name + rename), so a reader never sees half a file and two writers lose at most a race, never
the file. A file that does not parse is refused in one line and never overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.files import write_json_atomic

LABELS_SUFFIX = ".labels.json"
LABELS_VERSION = 1


class LabelsError(WorkbenchError):
    """An unreadable labels file, or a label that cannot be stored."""


def companion_path(store_path: str | os.PathLike, suffix: str) -> Path:
    """`<dir>/<stem><suffix>` beside the store file `<dir>/<stem>.duckdb`."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.stem + suffix)


class Labels:
    """The labels file of one store. Reads are cached until the file changes on disk."""

    def __init__(self, store_path: str | os.PathLike):
        self.path = companion_path(store_path, LABELS_SUFFIX)
        self._seen: tuple[int, int] | None = None
        self._entries: dict[int, dict] = {}

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _read(self) -> dict[int, dict]:
        """Every entry, {feature: {"label", "notes"}}; raises LabelsError on a corrupt file."""
        stamp = self._stamp()
        if stamp is None:
            self._seen, self._entries = None, {}
            return self._entries
        if stamp == self._seen:
            return self._entries
        try:
            obj = json.loads(self.path.read_text(encoding="utf-8"))
            entries = {int(k): _entry(v) for k, v in obj["labels"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LabelsError(
                f"{self.path}: not a readable labels file ({reason}); fix or move it (it is not overwritten)"
            ) from None
        self._seen, self._entries = stamp, entries
        return entries

    def all(self) -> dict[int, dict]:
        """{feature: {"label": str, "notes": str}} for every labelled feature (a copy)."""
        return {k: dict(v) for k, v in self._read().items()}

    def get(self, feature: int) -> dict:
        """{"label": str, "notes": str} of `feature` (both empty when it has none)."""
        return dict(self._read().get(int(feature), {"label": "", "notes": ""}))

    def set(self, feature: int, label: str, notes: str = "") -> None:
        """Store `label` (one line; newlines become spaces) and `notes` for `feature`; both empty
        removes the entry. Atomic; raises LabelsError on a corrupt file (left as it is) or a bad
        feature id, WorkbenchError when the folder is not writable."""
        if isinstance(feature, bool) or not isinstance(feature, int) and not hasattr(feature, "__index__"):
            raise LabelsError(f"feature must be an integer, got {feature!r}")
        feature = int(feature)
        if feature < 0:
            raise LabelsError(f"feature must be >= 0, got {feature}")
        entries = dict(self._read())
        entry = _entry({"label": label, "notes": notes})
        if entry["label"] or entry["notes"]:
            entries[feature] = entry
        else:
            entries.pop(feature, None)
        obj = {
            "version": LABELS_VERSION,
            "labels": {str(k): entries[k] for k in sorted(entries)},
        }
        write_json_atomic(self.path, obj)
        self._seen, self._entries = self._stamp(), entries


def _entry(value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"an entry is {type(value).__name__}, not an object")
    label, notes = value.get("label", ""), value.get("notes", "")
    if not isinstance(label, str) or not isinstance(notes, str):
        raise TypeError("label and notes must be strings")
    return {"label": " ".join(label.split()), "notes": notes.strip()}


def match_text(
    needle: str, summaries: list[tuple[int, str]], labels: dict[int, dict], explained: dict[int, dict]
) -> tuple[dict[int, list[str]], list[int]]:
    """({feature: fields containing the casefolded `needle`: label, notes, explanation, summary},
    the matched features ordered labels first, then explanations, then summaries, then by id).
    `summaries` are (feature, casefolded summary) pairs."""
    matched: dict[int, list[str]] = {}
    for feature, entry in labels.items():
        for name in ("label", "notes"):
            if needle in entry[name].casefold():
                matched.setdefault(feature, []).append(name)
    for feature, entry in explained.items():
        if needle in str(entry.get("explanation", "")).casefold():
            matched.setdefault(feature, []).append("explanation")
    for feature, folded in summaries:
        if needle in folded:
            matched.setdefault(feature, []).append("summary")
    rank = {"label": 0, "notes": 0, "explanation": 1, "summary": 2}
    return matched, sorted(matched, key=lambda f: (rank[matched[f][0]], f))
