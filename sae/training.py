"""One training loop for a grid of dictionaries, all fed by one read of the activation cache.

Each batch is scaled so that E|x| = sqrt(d) (the factor is measured once on a sample and
folded into the saved weights), then every dictionary of the grid takes an Adam step on it.
The data order depends only on (seed, epoch): a checkpoint records (epoch, batch) and a resumed
run replays the epoch up to there, so a killed run resumed with the same command ends with the
same weights, bit for bit on the CPU, as one never interrupted. Metrics go to each
dictionary's `log.jsonl` (and to W&B with --wandb); the progress bar shows FVU / L0 / dead %.

On a GPU (--device) the dictionaries, Adam state and steps live there, fed by a thread that
reads and pins batches ahead (`sae.sources.Prefetcher`); logs record `tokens_per_s` and the
`data_wait_fraction`. --matmul-dtype bfloat16: bf16 selection matmul, all else fp32. A run
resumes on another device (the device is not part of its identity; bit for bit on the same kind).

Under torchrun every rank reads the same batches and trains on its contiguous share of each;
gradients are averaged and firing counts summed across ranks (`sae.trainee`), so the weights
stay identical on every rank and equal, to float rounding, single-process training on the same
global batch. Rank 0 alone writes the folder, the checkpoints, the logs and the final weights;
a checkpoint holds the global position, so a run resumes with any number of ranks.
JumpReLU's L0 controller reads the rank-mean L0 and MSE; BatchTopK's and Feature Choice's
selections and thresholds are global (`workbench.kernels.select`); resampling and codebooks'
dead-code replacement count firings over every rank and draw from the whole (gathered) batch.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from sae import io
from sae.base import create
from sae.calibrate import inference_l0
from sae.checkpoint import TrainState, load_checkpoint, save_checkpoint
from sae.sources import (
    BatchSource,
    FeedClock,
    Prefetcher,
    draw,
    input_scale,
    open_cache_source,
    training_order,
)
from sae.train_config import TrainConfig, auto_batch_size, lr_at
from sae.trainee import Trainee
from workbench import devices, seeding
from workbench.distributed import Ranks, alone, barrier, ranks
from workbench.errors import ConfigError, MissingExtraError, WorkbenchError
from workbench.files import write_bytes_atomic, write_json_atomic
from workbench.kernels.backend import use_matmul_dtype
from workbench.logs import JsonlLogger, read_jsonl
from workbench.paths import DEFAULT_RUNS_DIR

RUN_CONFIG = "train-config.json"
INIT_SAMPLE_ROWS = 16_384
CALIBRATION_ROWS = 16_384
PREFETCH_DEPTH = 16
"""Batches a thread keeps ready on CUDA (on the CPU the loop reads them): they cover the reader's
pause per half pool at GPU step times of a few ms (16 x 4,096 x 768 bf16 rows: 100 MB pinned)."""


@dataclass
class Plan:
    config: TrainConfig
    source: BatchSource
    out: Path
    batch_size: int
    """--batch-size, or the auto size for the token budget."""
    total_steps: int
    dead_after_tokens: int
    checkpoint_every: int
    warmup_steps: int


def train(
    config: TrainConfig,
    *,
    source: Optional[BatchSource] = None,
    progress: bool = True,
    stop_after_step: Optional[int] = None,
    prefetch: Optional[int] = None,
) -> list[Path]:
    """Train (or resume, or find finished) every dictionary of `config` on `config.device`;
    return their folders.

    `stop_after_step` ends the run after that step without saving anything beyond the last
    checkpoint, as a kill would (used to test resumption). `prefetch`: batches a reading thread
    keeps ready (None: PREFETCH_DEPTH on CUDA, 0 on the CPU: no thread). Raises DeviceError
    (one line) for a device this machine lacks, before any data is read."""
    device = devices.resolve_device(config.device)
    source = source or open_cache_source(
        config.cache, config.hook, seed=config.seed, out_hook=config.out_hook
    )
    where = ranks(device)
    plan = _plan(config, source, where.world)
    check_data_parallel(plan.batch_size, where)
    folders = [plan.out / name for name in _names(config)]
    if all((f / io.CONFIG).exists() for f in folders) and _same_run(plan):
        return folders
    trainees = _build_trainees(plan, device)  # an invalid grid (--arch) fails before the folder is claimed
    if where.is_main:
        _claim_folder(plan)
    barrier()
    state = load_checkpoint(plan.out, trainees)
    if state is None:
        state = _initialize(plan, trainees)
    elif state.batch_size and state.batch_size != plan.batch_size:  # auto size under another rank count
        raise ConfigError(
            f"{plan.out} was checkpointed at batch {state.batch_size}, this run would use {plan.batch_size}; "
            f"resume with --batch-size {state.batch_size}"
        )
    loggers = _open_logs(plan, trainees, state.step) if where.is_main else {}
    depth = prefetch if prefetch is not None else PREFETCH_DEPTH if devices.is_cuda(device) else 0
    clock = FeedClock()
    try:
        finished = _loop(
            plan, trainees, state, loggers, progress and where.is_main, stop_after_step, where, depth, clock
        )
    finally:
        for logger in loggers.values():
            logger.close()
    if not finished:
        return []
    timing = clock.totals()
    saved = [_save_final(plan, t, state, timing) for t in trainees] if where.is_main else folders
    barrier()  # every rank returns once the weights are on disk
    return saved


def check_data_parallel(batch_size: int, where: Ranks) -> None:
    if where.world == 1:
        return
    if batch_size % where.world:
        raise ConfigError(f"--batch-size {batch_size} must split evenly over {where.world} ranks")


def _names(config: TrainConfig) -> list[str]:
    return [config.name_of(*g) for g in config.grid()]


def _plan(config: TrainConfig, source: BatchSource, world: int = 1) -> Plan:
    tokens = config.tokens or source.rows_per_epoch
    batch = config.batch_size or -(-auto_batch_size(tokens) // world) * world  # auto: a multiple of the ranks
    total = tokens // batch
    if source.rows_per_epoch < batch or total < 1:
        advice = (
            "lower --batch-size" if config.batch_size else "train on more rows (--tokens, or a larger cache)"
        )
        raise ConfigError(
            f"{source.rows_per_epoch} rows per epoch and {tokens} tokens give no full batch of {batch}; "
            f"{advice}"
        )
    out = default_output_dir(config, source.describe().get("hook", "synthetic"))
    dead = config.dead_after_tokens or min(10_000_000, max(batch, tokens // 10))
    every = config.checkpoint_every or max(1, total // 10)
    warmup = config.warmup_steps if config.warmup_steps >= 0 else min(1000, total // 20)
    return Plan(config, source, out, batch, total, dead, every, warmup)


def default_output_dir(config: TrainConfig, hook: str = "") -> Path:
    """--out, else runs/sae-<hook> (runs/transcoder-<hook> for a transcoder of --out-hook)."""
    if config.out:
        return Path(config.out)
    hook = config.hook or hook
    kind = "transcoder" if config.out_hook else "sae"
    return DEFAULT_RUNS_DIR / (f"{kind}-{hook}" if hook else kind)


def _d_out(source: BatchSource) -> int:
    """The width a transcoder's source predicts (0: an SAE's source)."""
    return int(getattr(source, "d_out", 0) or 0)


def _split(source: BatchSource, rows: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(x, y) of a transcoder source's [x, y] rows; (rows, None) for an SAE's."""
    if not _d_out(source):
        return rows, None
    d_in = source.d_in
    return rows[:, :d_in], rows[:, d_in:]


def _same_run(plan: Plan) -> bool:
    return _run_differences(plan) == []


def _run_differences(plan: Plan) -> Optional[list[str]]:
    """The top-level fields in which the run recorded in the folder (in any format_version) differs
    from this one; fields added since it was written count at their defaults, and the device does
    not count: it is where the run computes. None when the folder records no run this version reads."""
    path = plan.out / RUN_CONFIG
    if not path.exists():
        return None
    try:
        saved = TrainConfig.from_json(json.loads(path.read_text())).to_json()
    except ConfigError:  # fields this version does not know: another run
        return None
    ours = plan.config.to_json()
    return [k for k in ours if k != "device" and saved.get(k) != ours[k]]


def _claim_folder(plan: Plan) -> None:
    """Refuse an output folder that holds a different run (naming what differs); record ours."""
    path = plan.out / RUN_CONFIG
    if path.exists() and (differences := _run_differences(plan)) != []:
        named = f" in: {', '.join(differences)}" if differences else ""
        raise WorkbenchError(
            f"{plan.out} holds a different training run ({RUN_CONFIG} differs{named}); choose another --out"
        )
    write_json_atomic(path, plan.config.to_json())


def _build_trainees(plan: Plan, device: torch.device) -> list[Trainee]:
    """The grid's dictionaries, drawn on the CPU (the same on every device), then moved to
    `device` before their optimizers are built."""
    trainees = []
    for architecture, k, expansion in plan.config.grid():
        dict_config = plan.config.dictionary_config(
            architecture, k, expansion, plan.source.d_in, _d_out(plan.source)
        )
        name = plan.config.name_of(architecture, k, expansion)
        dictionary = create(dict_config, seed=plan.config.seed, salt=name).to(device)
        lr = plan.config.lr_for(dict_config.n_latents)
        trainees.append(
            Trainee(
                name,
                dictionary,
                lr,
                plan.config.clip_grad,
                plan.dead_after_tokens,
                plan.config.starving_below,
            )
        )
    return trainees


def _initialize(plan: Plan, trainees: list[Trainee]) -> TrainState:
    sample, target = _split(plan.source, plan.source.sample(INIT_SAMPLE_ROWS))
    scale = input_scale(sample)
    device = trainees[0].dictionary.W_dec.device
    scaled = (sample * scale).to(device)
    out_scale = (
        input_scale(target) if target is not None else 0.0
    )  # a transcoder's targets: E|y| = sqrt(d_out)
    scaled_target = None if target is None else (target * out_scale).to(device)
    for trainee in trainees:
        if scaled_target is None:
            trainee.dictionary.initialize_from(scaled)
        else:
            trainee.dictionary.initialize_from(scaled, scaled_target)
    return TrainState(
        step=0,
        epoch=0,
        batch_in_epoch=0,
        tokens=0,
        input_scale=scale,
        batch_size=plan.batch_size,
        output_scale=out_scale,
    )


def _open_logs(plan: Plan, trainees: list[Trainee], step: int) -> dict[str, JsonlLogger]:
    loggers = {}
    for trainee in trainees:
        path = plan.out / trainee.name / "log.jsonl"
        if path.exists():  # drop records past the checkpoint we resume from
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
            write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        loggers[trainee.name] = JsonlLogger(path)
    return loggers


def _loop(
    plan: Plan,
    trainees: list[Trainee],
    state: TrainState,
    loggers: dict,
    progress: bool,
    stop_after_step: Optional[int],
    where: Ranks = Ranks(),
    prefetch: int = 0,
    clock: Optional[FeedClock] = None,
) -> bool:
    config, total = plan.config, plan.total_steps
    clock = clock or FeedClock()
    wandb_run = _wandb(plan) if config.wandb and where.is_main else None
    bar = tqdm(total=total, initial=state.step, disable=not progress, unit="step", desc="train")
    scale = state.input_scale
    batches = training_order(plan.source, plan.batch_size, state.epoch, state.batch_in_epoch)
    share = None
    if where.world > 1:  # this rank's contiguous share of the global batch
        share = lambda item: (*item[:2], item[2].chunk(where.world)[where.rank])  # noqa: E731
    feed = Prefetcher(batches, trainees[0].dictionary.W_dec.device, prefetch, share)
    try:
        with feed, use_matmul_dtype(devices.matmul_dtype(config.matmul_dtype)):
            while state.step < total:
                epoch, index, batch = clock.waiting(feed)
                x, y = _split(plan.source, batch.float())  # a 16-bit cache's rows travel as stored
                x = x * scale
                y = None if y is None else y * state.output_scale
                _train_step(plan, trainees, x, state, loggers, wandb_run, bar, where.world, clock, y)
                state.epoch, state.batch_in_epoch = epoch, index + 1
                if state.step % plan.checkpoint_every == 0 or state.step == total:
                    for trainee in trainees:  # no diverged weights reach a checkpoint
                        trainee.check_loss()
                    if where.is_main:
                        save_checkpoint(plan.out, state, trainees)
                if stop_after_step is not None and state.step >= stop_after_step:
                    return False
            for trainee in trainees:
                trainee.check_loss()
    finally:
        bar.close()
        if wandb_run is not None:
            wandb_run.finish()
    return True


def _train_step(
    plan: Plan,
    trainees: list[Trainee],
    x: torch.Tensor,
    state: TrainState,
    loggers,
    wandb_run,
    bar,
    world: int = 1,
    clock: Optional[FeedClock] = None,
    y: Optional[torch.Tensor] = None,
) -> None:
    """One step of every trainee on rows x (a transcoder's: predicting y)."""
    step, total, config = state.step, plan.total_steps, plan.config
    progress = step / total
    records = {}
    for trainee in trainees:
        lr = lr_at(step, total, trainee.base_lr, plan.warmup_steps, config.decay_fraction)
        out = trainee.step(x, lr, progress, step) if y is None else trainee.step(x, lr, progress, step, y)
        resample = _resample_due(plan, step + 1) and trainee.can_resample
        if resample or (step + 1) % config.log_every == 0 or step + 1 == total:
            trainee.check_loss()  # these read the step's results anyway: a diverged one stops here
        if resample:
            moved = trainee.resample(
                x,
                out,
                config.resample_below,
                config.resample_duplicate_cosine,
                seeding.generator(config.seed, "resample", trainee.name, step),
                y,
            )
            if trainee.name in loggers:  # every resampling is recorded, however many it moved
                loggers[trainee.name].log(step=step + 1, event="resample", latents=moved)
        if (step + 1) % config.log_every == 0 or step + 1 == total:
            records[trainee.name] = {
                "step": step + 1,
                "tokens": state.tokens + x.shape[0] * world,
                "lr": lr,
                **trainee.metrics(x, out, y),
            }
    state.step = step + 1
    state.tokens += x.shape[0] * world
    if clock is not None:
        clock.count(x.shape[0] * world)
        if records:  # the throughput since the previous record
            timing = clock.lap()
            records = {name: {**record, **timing} for name, record in records.items()}
    for name, record in records.items():
        if name in loggers:
            loggers[name].log(**record)
    if records:
        first = records[trainees[0].name]
        bar.set_postfix_str(
            f"fvu {first['fvu']:.3f} l0 {first['l0']:.1f} dead {100 * first['dead_fraction']:.1f}%"
        )
        if wandb_run is not None:
            wandb_run.log(
                {f"{name}/{k}": v for name, r in records.items() for k, v in r.items()}, step=step + 1
            )
    bar.update(1)


def _resample_due(plan: Plan, step: int) -> bool:
    every = plan.config.resample_every
    return every > 0 and step % every == 0 and step <= plan.config.resample_until * plan.total_steps


def _wandb(plan: Plan):
    try:
        import wandb
    except ImportError:
        raise MissingExtraError("--wandb needs the wandb package: pip install wandb") from None
    # Never block on a login prompt: without an explicit mode or a key, log offline.
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(
        project=plan.config.wandb_project,
        name=plan.out.name,
        dir=str(plan.out),
        config=plan.config.to_json(),
        mode=mode,
        reinit="finish_previous",
    )


def _save_final(plan: Plan, trainee: Trainee, state: TrainState, timing: Optional[dict] = None) -> Path:
    """Write the dictionary's folder; `timing` (tokens_per_s, data_wait_fraction of the steps
    this process ran) joins its metrics."""
    folder = plan.out / trainee.name
    architecture, k, expansion = next(
        g for g in plan.config.grid() if plan.config.name_of(*g) == trainee.name
    )
    metrics = {
        **final_metrics(folder / "log.jsonl"),
        **trainee.totals(),
        **_calibrate(plan, trainee, state),
        **(timing or {}),
    }
    io.save(
        trainee.dictionary,
        folder,
        input_scale=state.input_scale,
        output_scale=state.output_scale if trainee.dictionary.is_transcoder else None,
        **plan.source.describe(),
        config=plan.config.for_one(architecture, k, expansion).to_json(),
        metrics=metrics,
        tokens_trained=state.tokens,
        batch_size=plan.batch_size,
    )
    return folder


def _calibrate(plan: Plan, trainee: Trainee, state: TrainState) -> dict:
    """Set the inference thresholds from rows drawn apart from training (`sae.calibrate`) and
    measure the saved dictionary's inference L0 on other such rows."""
    scale, device = state.input_scale, trainee.dictionary.W_dec.device
    with alone():  # rank 0 alone saves: no selection may wait for the other ranks
        rows = _split(plan.source, draw(plan.source, CALIBRATION_ROWS, "calibrate"))[0]
        trainee.dictionary.calibrate(rows.to(device) * scale)
        check = (
            _split(plan.source, draw(plan.source, CALIBRATION_ROWS // 2, "inference L0"))[0].to(device)
            * scale
        )
        return {"inference_l0": round(inference_l0(trainee.dictionary, check, min(plan.batch_size, 4096)), 4)}


def final_metrics(log_path: Path, last: int = 10) -> dict:
    """Means of the last `last` logged records (training batches) of the headline metrics."""
    records = [r for r in read_jsonl(log_path) if "event" not in r][-last:] if log_path.exists() else []
    keys = ("fvu", "l0", "dead_fraction", "loss")
    return {
        k: round(statistics.fmean(r[k] for r in records), 6)
        for k in keys
        if records and all(k in r for r in records)
    }
