"""How long the Steering page's generation takes: `bench_steering(store)` times what the page runs on
Generate (`sae.steering.generate_pair_report`: a baseline and a steered continuation) with the
model and dictionary loaded once, as the explorer's cached resources hold them.

OpenMP reads OMP_WAIT_POLICY when torch loads, so a number for the explorer's server comes from a
process started with the server's environment: `bench_steering_in_explorer_env` (or
`python -m app.bench_steer STORE`, which prints one JSON object per row, run under that env).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from workbench.errors import WorkbenchError


def _median_seconds(run, repeats: int) -> tuple[float, float]:
    """(median, min) seconds of `repeats` calls of `run`, after one call not counted (warm-up)."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times)


def bench_steering(
    store_path: str | os.PathLike,
    tokens: int = 30,
    repeats: int = 3,
    prompt: str = "ROMEO:",
    feature: int | None = None,
    device: str = "cpu",
) -> list[dict]:
    """`bench_generation` on a store's model and dictionary, for `feature` (default: the store's
    most frequent) at 1x its max activation. Raises StoreError for a missing store,
    WorkbenchError when its dictionary is not on this machine."""
    from workbench.store import FeatureStore

    store = FeatureStore(store_path)
    folder = store.meta.get("dictionary_path") or ""
    if not Path(folder).exists():
        raise WorkbenchError(f"{store.path}: its dictionary folder {folder!r} is not on this machine")
    if feature is None:
        feature = int(store.features(limit=1).feature[0])
    scale = store.feature(feature).max_activation or 1.0
    return bench_generation(store.meta["model"], folder, feature, scale, tokens, repeats, prompt, device)


def bench_generation(
    model_spec: str,
    dictionary_folder: str | os.PathLike,
    feature: int = 0,
    strength: float = 1.0,
    tokens: int = 30,
    repeats: int = 3,
    prompt: str = "ROMEO:",
    device: str = "cpu",
) -> list[dict]:
    """Rows {case, tokens, median_s, min_s, repeats}: `load` (model and dictionary, once),
    `generate` (one sampled continuation of `tokens` tokens), and `add` and `clamp` of `feature` at
    `strength` (what Generate runs: a baseline and a steered continuation, `tokens` each). Wall
    seconds on this machine, median of `repeats` after a warm-up call."""
    import sae
    from sae.steering import add, clamp, generate_pair_report
    from workbench.models import load_model

    started = time.perf_counter()
    model = load_model(model_spec, device=device)
    dictionary = sae.load(str(dictionary_folder)).to(model.device)
    loading = round(time.perf_counter() - started, 3)
    rows = [dict(case="load", tokens=0, median_s=loading, min_s=loading, repeats=1)]
    cases = {
        "generate": lambda: model.generate(prompt, max_new_tokens=tokens, do_sample=True, seed=0),
        "add": lambda: generate_pair_report(model, [add(dictionary, feature, strength)], prompt, tokens),
        "clamp": lambda: generate_pair_report(model, [clamp(dictionary, feature, strength)], prompt, tokens),
    }
    for case, run in cases.items():
        median, fastest = _median_seconds(run, repeats)
        rows.append(
            dict(
                case=case, tokens=tokens, median_s=round(median, 3), min_s=round(fastest, 3), repeats=repeats
            )
        )
    return rows


def bench_steering_in_explorer_env(
    store_path: str | os.PathLike, tokens: int = 30, repeats: int = 3
) -> list[dict]:
    """`bench_steering` in a child process with the environment `workbench explore` gives its
    server (`app.explorer.launch.explorer_env`), so the OpenMP settings are the server's."""
    from app.explorer.launch import explorer_env

    env = explorer_env([str(store_path)], "cpu")
    command = [sys.executable, "-m", "app.bench_steer", str(store_path), "--tokens", str(tokens)]
    done = subprocess.run(
        [*command, "--repeats", str(repeats)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise WorkbenchError(f"the steering benchmark failed: {last}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m app.bench_steer", description="Time the Steering page's generation."
    )
    parser.add_argument("store", nargs="?", help="a feature store (its model and dictionary on this machine)")
    parser.add_argument("--model", help="without a store: the model spec (e.g. demo)")
    parser.add_argument("--dictionary", help="without a store: a dictionary folder trained on --model")
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--feature", type=int, default=None)
    args = parser.parse_args(argv)
    if args.store:
        rows = bench_steering(args.store, args.tokens, args.repeats, feature=args.feature)
    elif args.model and args.dictionary:
        rows = bench_generation(
            args.model, args.dictionary, args.feature or 0, 1.0, args.tokens, args.repeats
        )
    else:
        parser.error("give a STORE, or --model and --dictionary")
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
