"""The (graph model, task) pairs `workbench circuits` can run: built-in tasks and user task files.

Built in: `induction` on any GPT-2-architecture model; `trained-induction` on the two-layer
model the project trained (shipped in `circuits/assets/induction-2l`; `python -m
circuits.trained_induction` retrains it), with
ground truth read off its heads; `planted-induction`, `or-gate`, `and-gate` and
`or-gate-saturated` on their hand-set models. The real-model tasks (`ioi`, `greater-than`,
`repeat-tokens`, `repeat-name`, built from the model's tokenizer by `circuits.real_tasks`)
run at head level (`circuits.heads`) on any model (`load_head_task` also builds induction and
task files for it); the edge graph converts only GPT-2-architecture models. A user task is a
JSON file:

    {"name": "capitals",
     "clean":     ["The capital of France is", ...]      (texts, or lists of token ids),
     "corrupted": ["The capital of Spain is", ...],      (same count; every prompt one length)
     "metric": "logit_diff" | "logprob" | "kl",
     "answers": [" Paris", ...], "wrong": [" Madrid", ...]   (tokens or ids; logit_diff, logprob)}

The metric is read at each prompt's last position: logit(answer) − logit(wrong), or
log p(answer), or minus the KL divergence from the clean output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from circuits.gates import gate_model, gate_task
from circuits.induction import induction_model, planted_induction_task
from circuits.real_tasks import REAL_TASKS, real_task
from circuits.tasks import Task, TaskError, induction_task, kl_to, widen
from circuits.transformer import GraphTransformer, from_gpt2
from workbench.devices import resolve_device
from workbench.files import read_json


def _trained_induction(n: int, seed: int) -> tuple[GraphTransformer, Task]:
    from circuits.trained_induction import load_or_train, trained_induction_task
    from workbench.paths import user_cache_dir

    model = load_or_train(user_cache_dir() / "circuits" / "induction-2l")
    return model, trained_induction_task(model, n=n, seed=seed + 1)


GROUND_TRUTH_TASKS: dict[str, Callable[[int, int], tuple[GraphTransformer, Task]]] = {
    "trained-induction": _trained_induction,
    "planted-induction": lambda n, seed: (induction_model(), planted_induction_task(n, seed)),
    "or-gate": lambda n, seed: (gate_model("or"), gate_task("or", n, seed)),
    "and-gate": lambda n, seed: (gate_model("and"), gate_task("and", n, seed)),
    "or-gate-saturated": lambda n, seed: (gate_model("or"), gate_task("or", n, seed, saturated=True)),
}
TASKS = ("induction", *GROUND_TRUTH_TASKS, *REAL_TASKS)
METRICS = ("logit_diff", "logprob", "kl")


def load_task(
    task: str,
    model_spec: str = "",
    prompts: int = 32,
    length: int = 33,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
) -> tuple[GraphTransformer, Task]:
    """The graph model (on `device`, a `--device` value or torch.device) and task for a built-in
    task name or a task JSON file; the task's prompts stay on the CPU. `dtype` (a `--model-dtype`
    name) is the loaded model's; the ground-truth tasks' hand-set models are built (or trained) on
    the CPU in float32, as everywhere, then moved. Raises TaskError, DeviceError."""
    if task in GROUND_TRUTH_TASKS:
        if model_spec:
            raise TaskError(f"task {task!r} runs on its own built-in model; drop --model")
        if dtype != "float32":
            raise TaskError(f"task {task!r} runs on its own float32 model; drop --model-dtype {dtype}")
        model, built = GROUND_TRUTH_TASKS[task](prompts, seed)
        return model.to(resolve_device(device)), built
    if task in REAL_TASKS:
        raise TaskError(f"task {task!r} runs at head level: use load_head_task")
    if task != "induction" and not task.endswith(".json"):
        raise TaskError(f"unknown task {task!r} (one of {', '.join(TASKS)}, or a task .json file)")
    from workbench.models import load_model

    model = load_model(model_spec or "demo", device=device, dtype=dtype)
    return from_gpt2(model), model_task(task, model, prompts, length, seed)


def is_gpt2(model) -> bool:
    """Whether `from_gpt2` converts the loaded workbench `model` (the edge-level graph)."""
    return getattr(model.bridge.original_model.config, "model_type", "") == "gpt2"


def load_head_task(
    task: str,
    model_spec: str = "",
    prompts: int = 16,
    length: int = 17,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
):
    """(the loaded workbench Model, the task) for head-level circuits: a real-model task (see
    circuits.real_tasks), `induction` or a task .json file, on `model_spec` (default demo).
    Raises TaskError for the ground-truth tasks (they bring hand-set graph models)."""
    if task in GROUND_TRUTH_TASKS:
        raise TaskError(f"task {task!r} runs on its own built-in graph model, not at head level")
    if task not in REAL_TASKS and task != "induction" and not task.endswith(".json"):
        raise TaskError(f"unknown task {task!r} (one of {', '.join(TASKS)}, or a task .json file)")
    from workbench.models import load_model

    model = load_model(model_spec or "demo", device=device, dtype=dtype)
    if task in REAL_TASKS:
        return model, real_task(task, model, prompts, seed, length)
    return model, model_task(task, model, prompts, length, seed)


def model_task(task: str, model, prompts: int = 32, length: int = 33, seed: int = 0) -> Task:
    """`induction` or a task file's task on a loaded workbench Model (any architecture)."""
    if task == "induction":
        length = min(length, model.n_ctx)
        return induction_task(model.d_vocab, n=prompts, length=length, bos=model.bos_token_id, seed=seed)
    if not task.endswith(".json"):
        raise TaskError(
            f"task {task!r} needs a hand-set model; "
            "with a model or dictionaries use induction or a task .json file"
        )
    return task_from_file(task, model)


def task_from_file(path: str | Path, model) -> Task:
    spec = read_json(path, "task file", TaskError)
    where = f"task file {path}"
    for key in ("clean", "corrupted"):
        if not isinstance(spec.get(key), list) or not spec[key]:
            raise TaskError(f"{where}: {key!r} must be a non-empty list of prompts")
    clean, corrupted = (_prompts(spec[k], model, f"{where}: {k!r}") for k in ("clean", "corrupted"))
    if clean.shape != corrupted.shape:
        raise TaskError(
            f"{where}: clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} "
            "prompts differ in shape"
        )
    vocab = model.d_vocab
    if int(clean.max()) >= vocab or int(corrupted.max()) >= vocab or clean.shape[1] > model.n_ctx:
        raise TaskError(
            f"{where}: token ids or prompt length exceed the model (vocab {vocab}, n_ctx {model.n_ctx})"
        )
    metric = spec.get("metric", "logit_diff")
    if metric not in METRICS:
        raise TaskError(f"{where}: unknown metric {metric!r} (one of {', '.join(METRICS)})")
    name = spec.get("name", Path(path).stem)
    if metric == "kl":
        with torch.no_grad():
            return Task(name, clean, corrupted, kl_to(model(clean).float()))
    answers = _answer_ids(spec.get("answers"), model, len(clean), vocab, f"{where}: 'answers'")
    wrong = (
        _answer_ids(spec.get("wrong"), model, len(clean), vocab, f"{where}: 'wrong'")
        if metric == "logit_diff"
        else None
    )
    return Task(name, clean, corrupted, last_position_metric(answers, wrong))


def last_position_metric(answers: Tensor, wrong: Tensor | None) -> Callable[[Tensor, slice], Tensor]:
    """logit(answer) − logit(wrong) at the last position, or log p(answer) when `wrong` is None.
    `rows` may be a slice or a LongTensor of prompt indices (head-level patching repeats prompts)."""

    def metric(logits: Tensor, rows: slice = slice(None)) -> Tensor:
        last = widen(logits[:, -1])
        right = answers[rows].to(last.device).unsqueeze(1)
        if wrong is None:
            return last.log_softmax(-1).gather(1, right).squeeze(1)
        return (last.gather(1, right) - last.gather(1, wrong[rows].to(last.device).unsqueeze(1))).squeeze(1)

    metric.last_position_only = True  # type: ignore[attr-defined]  # circuits.heads unembeds that position only
    return metric


def _prompts(items: list, model, where: str) -> Tensor:
    if all(isinstance(item, str) for item in items):
        rows = [model.tokenize(item)[0] for item in items]
    elif all(
        isinstance(item, list) and item and all(isinstance(t, int) and t >= 0 for t in item) for item in items
    ):
        rows = [torch.tensor(item) for item in items]
    else:
        raise TaskError(f"{where} must be all texts or all lists of non-negative token ids")
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise TaskError(
            f"{where}: prompts tokenize to different lengths {lengths}; every prompt needs one length"
        )
    return torch.stack(rows)


def _answer_ids(items, model, n: int, vocab: int, where: str) -> Tensor:
    if not isinstance(items, list) or len(items) != n:
        raise TaskError(f"{where} must list one answer per prompt ({n})")
    return torch.tensor([_one_token(item, model, vocab, where) for item in items])


def _one_token(item, model, vocab: int, where: str) -> int:
    if isinstance(item, str):
        ids = model.tokenize(item, prepend_bos=False)[0].tolist()
        item = ids[0] if len(ids) == 1 else None
    if not isinstance(item, int) or not 0 <= item < vocab:
        raise TaskError(f"{where}: {item!r} is not a single token of the model")
    return item
