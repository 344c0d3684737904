"""Training checkpoints: every trainee's state at one step, written so a kill never leaves a
mix of steps. Each trainee's tensors go to `<name>-<step>.safetensors`; `state.json`, written
last and atomically, names the files of the step it describes; older files are then removed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from safetensors.torch import load_file

from sae.trainee import Trainee
from workbench.errors import WorkbenchError
from workbench.files import read_json, save_tensors_atomic, write_json_atomic

FORMAT_VERSION = 1
FOLDER = "checkpoint"
STATE = "state.json"


def save_checkpoint(out: Path, position: dict, trainees: list[Trainee]) -> None:
    folder = out / FOLDER
    step = position["step"]
    files = {}
    for trainee in trainees:
        files[trainee.name] = f"{trainee.name}-{step:09d}.safetensors"
        save_tensors_atomic(folder / files[trainee.name], trainee.state_tensors())
    write_json_atomic(folder / STATE, {"format_version": FORMAT_VERSION, **position, "files": files})
    keep = set(files.values()) | {STATE}
    for path in folder.iterdir():
        if path.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def load_checkpoint(out: Path, trainees: list[Trainee]) -> dict | None:
    """Restore the trainees from the last checkpoint; return its position, or None if none."""
    state_path = out / FOLDER / STATE
    if not state_path.exists():
        return None
    state = read_json(state_path, "training checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise WorkbenchError(f"{state_path}: unknown checkpoint format_version {state.get('format_version')!r}")
    files = state.get("files", {})
    for trainee in trainees:
        if trainee.name not in files:
            raise WorkbenchError(f"{state_path}: no state for {trainee.name} (the run's grid changed; use another --out)")
        path = out / FOLDER / files[trainee.name]
        try:
            trainee.load_state_tensors(load_file(path))
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise WorkbenchError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]}); delete {out / FOLDER} to restart") from None
    return state
