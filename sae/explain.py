"""`workbench explain`: explain a store's features in words and score each explanation by detection.

Per feature (Bills et al. 2023; EleutherAI delphi, Paulo et al. 2024):
  1. split its examples (`sae.explain_contexts.split_examples`): shown to the explainer, or held out;
  2. explain: an OpenAI-compatible chat model reads the shown examples, firing tokens marked, and
     writes one explanation (`sae.explain_prompts`); offline, the store's data-derived summary;
  3. detection: the held-out activating contexts, mixed with as many spans where the feature is
     checked to be 0 and shuffled by a seeded generator, are labelled 0/1 by the scorer model
     given the explanation (offline: "token-match", a keyword rule: a context is activating when
     it holds a token on which two or more shown examples peak); accuracy, precision, recall, F1 and n.
Entries are merged into `<stem>.explanations.json` beside the store as they finish (so a stopped
run keeps its work), and each feature's prompts and replies are appended to `<stem>.explain.jsonl`.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from sae.explain_client import ChatClient
from sae.explain_config import ExplainConfig
from sae.explain_contexts import Context, held_out_contexts, silent_contexts, split_examples
from sae.explain_prompts import (
    PROMPT_VERSION,
    detection_scores,
    explainer_messages,
    parse_explanation,
    parse_predictions,
    render_context,
    scorer_messages,
)
from workbench.errors import WorkbenchError
from workbench.explanations import explanations_path, read_explanations, write_explanations
from workbench.logs import JsonlLogger
from workbench.seeding import generator
from workbench.store import FeatureStore

LOG_SUFFIX = ".explain.jsonl"


class Job(NamedTuple):
    """What one feature's requests need, prepared from the store in the main thread."""

    feature: int
    summary: str
    shown: list[str]
    """Shown examples, rendered with their firing tokens marked."""
    contexts: list[Context]
    """Held-out and silent contexts, shuffled."""
    texts: list[str]
    """The contexts rendered, unmarked."""
    peaks: frozenset[int]
    """Tokens on which two or more shown examples peak (the token-match rule)."""


class ExplainResult(NamedTuple):
    rows: list[dict]
    """Per feature explained: feature, explanation, source, explainer, detection (dict or None)."""
    path: Path
    """The explanations file."""
    notes: list[str]
    """One-line remarks for the user (features skipped, detection unavailable, token usage)."""


def choose_features(store: FeatureStore, config: ExplainConfig) -> list[int]:
    """config.features (each checked against the store), else the config.top densest that fired."""
    if config.features:
        bad = [f for f in config.features if f >= store.n_latents]
        if bad:
            raise WorkbenchError(f"feature {bad[0]} is outside this store's 0..{store.n_latents - 1}")
        return list(dict.fromkeys(config.features))
    table = store.features(order_by="density", min_density=1e-300, limit=config.top)
    return [int(f) for f in table["feature"]]


def explain(store: FeatureStore, config: ExplainConfig, *, progress: bool = True) -> ExplainResult:
    """Explain (and score) the chosen features of `store`, merging the entries into its
    explanations file. Raises EndpointError (unreachable, refused, unreadable replies; entries
    finished before are kept), WorkbenchError for features outside the store."""
    client = None
    if config.endpoint:  # a missing key variable is refused before any work
        client = ChatClient(
            config.endpoint, timeout=config.timeout, retries=config.retries, api_key_env=config.api_key_env
        )
    features, existing, notes = choose_features(store, config), read_explanations(store.path), []
    todo = [f for f in features if config.redo or not _done(existing.get(f), config)]
    if len(todo) < len(features):
        notes.append(f"skipped {len(features) - len(todo)} features already explained (--redo to redo them)")
    jobs = _jobs(store, todo, config, notes)
    meta = {**config.recorded(), "prompt_version": PROMPT_VERSION, "id": f"{time.time():.6f}-{os.getpid()}"}
    rows: list[dict] = []
    unparsed = 0
    log_path = store.path.with_name(store.path.stem + LOG_SUFFIX)
    with JsonlLogger(log_path) as log, _Writer(store.path, meta) as writer:
        for entry, record in _results(jobs, client, config, progress):
            writer.add(entry["feature"], {k: v for k, v in entry.items() if k != "feature"})
            log.log(**record)
            rows.append(entry)
            unparsed += entry["source"] == "llm" and entry["detection"] is None and len(record["replies"]) > 1
    if unparsed:
        notes.append(f"{unparsed} features: no scorer reply could be parsed (see {log_path.name})")
    if client is not None:
        notes.append(
            f"{client.requests} requests, {client.prompt_tokens} prompt and "
            f"{client.completion_tokens} completion tokens (as the server reported them)"
        )
    position = {f: i for i, f in enumerate(features)}
    rows.sort(key=lambda r: position[r["feature"]])
    return ExplainResult(rows, explanations_path(store.path), notes)


def _done(entry: dict | None, config: ExplainConfig) -> bool:
    if entry is None:
        return False
    if not config.endpoint:  # offline: summaries are cheap to redo, an LLM's explanation is kept
        return entry.get("source") == "llm"
    return (
        entry.get("source") == "llm"
        and entry.get("explainer") == config.model
        and entry.get("prompt_version") == PROMPT_VERSION
    )


def _jobs(store: FeatureStore, features: list[int], config: ExplainConfig, notes: list[str]) -> list[Job]:
    summaries = store.summaries(features)
    pages = {f: store.feature(f) for f in features}
    splits = {f: split_examples(pages[f], config.examples, config.holdout, config.seed) for f in features}
    silent: dict[int, list[Context]] = {}
    if features and config.holdout:
        lengths = [len(e.tokens) for s in splits.values() for e in s.held_out]
        length = sorted(lengths)[len(lengths) // 2] if lengths else 1
        try:
            silent = silent_contexts(store, features, length, config.holdout, config.seed)
        except WorkbenchError as exc:  # a store moved without its cache or dictionary
            notes.append(
                f"no detection scores: non-activating contexts need the cache and dictionary ({exc})"
            )
    jobs = []
    for f in features:
        split = splits[f]
        held = held_out_contexts(split)  # as many silent spans as held-out ones: balanced classes
        contexts = held + silent[f][: len(held)] if f in silent else []
        order = torch.randperm(len(contexts), generator=generator(config.seed, "explain-order", f)).tolist()
        contexts = [contexts[i] for i in order]
        jobs.append(
            Job(
                f,
                summaries.get(f) or _peak_summary(store, split.shown),
                [render_context(store.token_texts(e.tokens), e.activations) for e in split.shown],
                contexts,
                [render_context(store.token_texts(c.tokens)) for c in contexts],
                _repeated_peaks(split.shown),
            )
        )
    return jobs


def _repeated_peaks(shown) -> frozenset[int]:
    """The tokens the token-match rule looks for: those on which two or more shown examples peak
    (what a summary names), else the most common one. Every peak token made the rule call nearly
    every context activating (the always-yes baseline, F1 0.67 on balanced classes)."""
    counts = Counter(e.tokens[e.position - e.start] for e in shown)
    repeated = frozenset(t for t, n in counts.items() if n >= 2)
    return repeated or frozenset(t for t, _ in counts.most_common(1))


def _peak_summary(store: FeatureStore, shown) -> str:
    """A stand-in summary (version 1 stores have none): the shown examples' peak tokens, counted."""
    counts = Counter(store.token_texts([e.tokens[e.position - e.start] for e in shown]))
    return " · ".join(f"{text!r} ×{n}" for text, n in counts.most_common(3))


def _results(jobs: list[Job], client: ChatClient | None, config: ExplainConfig, progress: bool):
    """(entry, log record) per job, as they finish; requests run `config.concurrency` at a time."""
    bar = tqdm(total=len(jobs), desc="explain", unit="feature", disable=not progress)
    try:
        if client is None:
            for job in jobs:
                yield _offline(job)
                bar.update()
            return
        pool = concurrent.futures.ThreadPoolExecutor(config.concurrency, thread_name_prefix="explain")
        try:
            futures = [pool.submit(_with_llm, job, client, config) for job in jobs]
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
                bar.update()
        finally:  # an error or Ctrl-C: what has not started never will; nothing waits for the rest
            pool.shutdown(wait=False, cancel_futures=True)
    finally:
        bar.close()


def _offline(job: Job) -> tuple[dict, dict]:
    labels = [c.label for c in job.contexts]
    predictions = [int(any(t in job.peaks for t in c.tokens)) for c in job.contexts]
    detection = _detection(labels, predictions, "token-match", "") if _both(labels) else None
    entry = _entry(job, job.summary, "summary", "", detection)
    return entry, _record(job, entry, [], predictions)


def _with_llm(job: Job, client: ChatClient, config: ExplainConfig) -> tuple[dict, dict]:
    ask = {"temperature": config.temperature, "max_tokens": config.max_tokens}
    if not job.shown:  # a feature that never fired: nothing to show a model
        entry = _entry(job, job.summary, "summary", "", None)
        return entry, _record(job, entry, [], [])
    reply = client.chat(config.model, explainer_messages(job.shown), **ask).text
    explanation, replies = parse_explanation(reply), [reply]
    if not explanation:  # kept as a summary, so the next run tries again
        entry = _entry(job, job.summary, "summary", "", None)
        return entry, _record(job, entry, replies, [])
    predictions: list[int | None] = [None] * len(job.texts)
    scorer = config.scorer_model or config.model
    for s in range(0, len(job.texts) if _both([c.label for c in job.contexts]) else 0, config.score_batch):
        chunk = job.texts[s : s + config.score_batch]
        answer = client.chat(scorer, scorer_messages(explanation, chunk), **ask).text
        replies.append(answer)
        predictions[s : s + len(chunk)] = parse_predictions(answer, len(chunk)) or [None] * len(chunk)
    scored = [(c.label, p) for c, p in zip(job.contexts, predictions) if p is not None]
    detection = None
    if scored and _both([y for y, _ in scored]):
        labels, answered = zip(*scored)
        detection = _detection(labels, answered, "llm", scorer)
        detection["unparsed"] = len(job.texts) - len(scored)
    entry = _entry(job, explanation, "llm", config.model, detection)
    return entry, _record(job, entry, replies, predictions)


def _both(labels) -> bool:
    """Detection needs activating and non-activating contexts."""
    return 1 in labels and 0 in labels


def _detection(labels, predictions, scorer: str, scorer_model: str) -> dict:
    return {"scorer": scorer, "scorer_model": scorer_model, **detection_scores(labels, predictions)}


def _entry(job: Job, explanation: str, source: str, explainer: str, detection: dict | None) -> dict:
    return {
        "feature": job.feature,
        "explanation": explanation,
        "source": source,
        "explainer": explainer,
        "detection": detection,
        "prompt_version": PROMPT_VERSION,
    }


def _record(job: Job, entry: dict, replies: list[str], predictions: list) -> dict:
    contexts = [
        {
            "window": c.window,
            "start": c.start,
            "tokens": c.tokens,
            "label": c.label,
            "prediction": p,
            "text": t,
        }
        for c, p, t in zip(job.contexts, predictions or [None] * len(job.contexts), job.texts)
    ]
    return {**entry, "shown": job.shown, "peaks": sorted(job.peaks), "replies": replies, "contexts": contexts}


class _Writer:
    """Merges entries into the explanations file every 25 entries or 10 s, and on leaving."""

    def __init__(self, store_path: Path, meta: dict):
        self.store_path, self.meta, self.pending, self.last = store_path, meta, {}, time.monotonic()

    def add(self, feature: int, entry: dict) -> None:
        self.pending[feature] = entry
        if len(self.pending) >= 25 or time.monotonic() - self.last > 10:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            write_explanations(self.store_path, self.pending, self.meta)
            self.pending, self.last = {}, time.monotonic()

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
