"""Training checkpoints: every trainee's state at one step, written so a kill never leaves a
mix of steps. Each trainee's tensors go to `<name>-<step>.safetensors`; `state.json`, written
last and atomically, names the files of the step it describes; older files are then removed.
Tensors load onto the device of the trainee's parameters, whatever device wrote them.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from safetensors.torch import load_file

from sae.trainee import Trainee
from workbench.errors import WorkbenchError
from workbench.files import read_json, save_tensors_atomic, write_json_atomic

FORMAT_VERSION = 1
FOLDER = "checkpoint"
STATE = "state.json"


@dataclass
class TrainState:
    """Where a run is: what a checkpoint records beside the trainees' tensors (`state.json`).
    Mutable, unlike the configs: the training loop advances it in place."""

    step: int
    """Optimizer steps taken."""
    epoch: int
    """The epoch being read (the data order depends only on the seed and the epoch)."""
    batch_in_epoch: int
    """Batches of this epoch already trained on; a resumed run skips them."""
    tokens: int
    """Rows trained on, over all ranks."""
    input_scale: float
    """The factor that makes E|x| = sqrt(d), measured once at the start (`sae.sources.input_scale`)."""
    batch_size: int = 0
    """Global batch size; 0 in checkpoints written before it was recorded."""
    output_scale: float = 0.0
    """A transcoder's factor for its targets (E|y| = sqrt(d_out)); 0 for an SAE."""


def save_checkpoint(out: Path, state: TrainState, trainees: list[Trainee]) -> None:
    folder = out / FOLDER
    step = state.step
    files = {}
    for trainee in trainees:
        files[trainee.name] = f"{trainee.name}-{step:09d}.safetensors"
        save_tensors_atomic(folder / files[trainee.name], trainee.state_tensors())
    write_json_atomic(folder / STATE, {"format_version": FORMAT_VERSION, **asdict(state), "files": files})
    keep = set(files.values()) | {STATE}
    for path in folder.iterdir():
        if path.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def load_checkpoint(out: Path, trainees: list[Trainee]) -> TrainState | None:
    """Restore the trainees from the last checkpoint (onto each one's device: Adam moments
    included); return its state, or None if none."""
    state_path = out / FOLDER / STATE
    if not state_path.exists():
        return None
    state = read_json(state_path, "training checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise WorkbenchError(
            f"{state_path}: unknown checkpoint format_version {state.get('format_version')!r}"
        )
    files = state.get("files", {})
    for trainee in trainees:
        if trainee.name not in files:
            raise WorkbenchError(
                f"{state_path}: no state for {trainee.name} (the run's grid changed; use another --out)"
            )
        path = out / FOLDER / files[trainee.name]
        try:
            trainee.load_state_tensors(load_file(path, device=str(trainee.dictionary.W_dec.device)))
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise WorkbenchError(
                f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]}); "
                f"delete {out / FOLDER} to restart"
            ) from None
    try:
        return TrainState(**{f.name: state[f.name] for f in fields(TrainState) if f.name in state})
    except TypeError as exc:
        raise WorkbenchError(
            f"{state_path}: incomplete checkpoint ({exc}); delete {out / FOLDER} to restart"
        ) from None
