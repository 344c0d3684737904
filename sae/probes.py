"""k-sparse probing (Gurnee et al. 2023, "Finding Neurons in a Haystack").

Features are a hook's neurons (the cached activations) or a dictionary's latents. For each
task the features are ranked on the training split by how well each one alone separates the
classes (mean difference |mu_1 - mu_0| / pooled std, or the one-way ANOVA F statistic); a
class-balanced logistic regression (scikit-learn) is fit on the top k, for k in a sweep, and
scored on held-out windows (accuracy, balanced accuracy, F1 of the positive class). Windows,
not tokens, are split, so no text is seen on both sides.

Devices (`--device`): the activations, the dictionary's latents, their standardisation and the
feature ranking are on the device; only the k chosen columns go to the host, where
scikit-learn fits the probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from workbench.devices import check_device_spec, resolve_device
from workbench.errors import ConfigError

RANKINGS = ("mean_diff", "f_stat")


@dataclass(frozen=True)
class ProbeConfig:
    cache: str = ""
    """Activation cache folder; empty means the default cache (built first if absent)."""
    hook: str = ""
    """Hook; empty means the cache's first hook."""
    task: tuple[str, ...] = ()
    """Tasks to probe (see `workbench probe --help`); empty means every built-in task."""
    on: str = "neurons"
    """Features: 'neurons' (the hook's dimensions) or a dictionary folder (its latents)."""
    k: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Probe sizes to sweep."""
    tokens: int = 65_536
    """Tokens (from the start of the cache) to probe on."""
    ranking: str = "mean_diff"
    """Feature ranking: mean_diff or f_stat."""
    test_fraction: float = 0.2
    """Fraction of windows held out for scoring."""
    seed: int = 0
    """Seeds the window split."""
    labels: str = ""
    """A JSON file of your own labels for the cache's first windows, probed instead of the built-in
    tasks: {"task": NAME, "token_labels": [[0|1 per token] per window]} or
    {"task": NAME, "window_labels": [0|1 per window]} (per-sequence: features are mean-pooled over
    the window)."""
    out: str = ""
    """Where to save the sweep (JSON); empty means runs/probes/<features>.json."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N."""

    def __post_init__(self):
        check_device_spec(self.device)
        if self.ranking not in RANKINGS:
            raise ConfigError(f"unknown ranking {self.ranking!r}; choose from {', '.join(RANKINGS)}")
        if not self.k or min(self.k) <= 0:
            raise ConfigError("--k values must be positive")
        if not 0 < self.test_fraction < 1 or self.tokens <= 0:
            raise ConfigError("test_fraction must be in (0, 1) and tokens positive")


def rank_features(x: Tensor, y: Tensor, ranking: str = "mean_diff") -> Tensor:
    """Feature indices, best first, by how well each feature alone separates y (bool), on x's device."""
    y = y.to(x.device)
    pos, neg = x[y].double(), x[~y].double()
    if len(pos) == 0 or len(neg) == 0:
        raise ConfigError("a probing task needs both classes in the training split")
    gap = pos.mean(0) - neg.mean(0)
    if ranking == "mean_diff":
        pooled = ((pos.var(0, unbiased=False) + neg.var(0, unbiased=False)) / 2).sqrt().clamp_min(1e-12)
        score = gap.abs() / pooled
    else:
        n1, n0 = len(pos), len(neg)
        mean = x.double().mean(0)
        between = n1 * (pos.mean(0) - mean) ** 2 + n0 * (neg.mean(0) - mean) ** 2
        within = ((pos - pos.mean(0)) ** 2).sum(0) + ((neg - neg.mean(0)) ** 2).sum(0)
        score = between / (within / max(1, n1 + n0 - 2)).clamp_min(1e-12)
    return score.nan_to_num(0.0).argsort(descending=True)


def sweep(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    ks: tuple[int, ...],
    ranking: str = "mean_diff",
) -> list[dict]:
    """One row per k: the chosen features and held-out accuracy, balanced accuracy and F1.
    x [rows, features] on any device (standardised and ranked there); y bool [rows]."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    order = rank_features(x_train, y_train, ranking).cpu()
    y_train, y_test = y_train.cpu(), y_test.cpu()
    rows = []
    for k in sorted(set(min(k, x_train.shape[1]) for k in ks)):
        chosen = order[:k].numpy()
        columns = order[:k].to(x_train.device)
        model = LogisticRegression(class_weight="balanced", max_iter=1000).fit(
            x_train[:, columns].cpu().numpy(), y_train.numpy()
        )
        predicted = model.predict(x_test[:, columns].cpu().numpy())
        rows.append(
            {
                "k": k,
                "accuracy": float(accuracy_score(y_test, predicted)),
                "balanced_accuracy": float(balanced_accuracy_score(y_test, predicted)),
                "f1": float(f1_score(y_test, predicted, zero_division=0)),
                "features_chosen": [int(i) for i in chosen[:8]],
            }
        )
    return rows


def split_windows(n_windows: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, test) window indices."""
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(n_windows * test_fraction))
    return order[n_test:], order[:n_test]


def default_output(config: ProbeConfig) -> Path:
    from workbench.paths import DEFAULT_RUNS_DIR

    if config.out:
        return Path(config.out)
    name = "neurons" if config.on == "neurons" else Path(config.on).name
    return DEFAULT_RUNS_DIR / "probes" / f"{name}.json"


def run_probes(config: ProbeConfig, progress: bool = True) -> list[dict]:
    """The k-sweep of every task of `config`, saved to `default_output(config)` as JSON; the
    features on `config.device`. Raises ConfigError, DeviceError (before reading the cache)."""
    from sae.probe_tasks import TASKS, task_labels
    from sae.sources import open_cache_source
    from workbench.files import write_json_atomic
    from workbench.models import load_model

    device = resolve_device(config.device)
    tasks = list(config.task) or list(TASKS)
    if unknown := [t for t in tasks if t not in TASKS]:
        raise ConfigError(f"unknown probing task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    source = open_cache_source(config.cache, config.hook)
    windows, acts = _first_windows(source, config.tokens)
    acts = acts.to(device)
    own = read_labels(config.labels, windows.shape) if config.labels else None
    if own is not None:
        tasks, windows, acts = [own[0]], windows[: len(own[1])], acts[: len(own[1])]
    features = acts if config.on == "neurons" else _latents(config.on, acts)
    tokenizer = load_model(source.cache.model).tokenizer
    train_w, test_w = split_windows(len(windows), config.test_fraction, config.seed)
    rows, skipped = [], []
    for task in tasks:
        if own is not None and own[1].dim() == 1:  # per-sequence labels: mean-pooled features
            pooled = features[:, 1:].mean(dim=1)
            x_train, y_train, x_test, y_test = (
                pooled[train_w],
                own[1][train_w],
                pooled[test_w],
                own[1][test_w],
            )
        else:
            labels = (
                own[1] if own is not None else task_labels(task, windows, lambda t: tokenizer.decode([t]))
            )
            x_train, y_train = _rows_of(features, labels, train_w)
            x_test, y_test = _rows_of(features, labels, test_w)
        if min(int(y_train.sum()), int((~y_train).sum()), int(y_test.sum())) == 0:
            skipped.append({"task": task, "reason": "a split lacks one class in these tokens"})
            continue
        for row in sweep(x_train, y_train, x_test, y_test, config.k, config.ranking):
            rows.append(
                {
                    "task": task,
                    "features": config.on,
                    "hook": source.hook,
                    **row,
                    "positives_test": int(y_test.sum()),
                    "tokens_test": len(y_test),
                }
            )
    write_json_atomic(
        default_output(config), {"config": _config_json(config), "rows": rows, "skipped": skipped}
    )
    if not rows:
        raise ConfigError(
            f"no probing task has both classes in the first {config.tokens} tokens ({', '.join(tasks)})"
        )
    return rows


def read_labels(path: str, shape: torch.Size) -> tuple[str, Tensor]:
    """(task name, labels): bool [n, context] for token labels or [n] for window labels, for
    the cache's first n windows; one-line errors for anything else."""
    from workbench.files import read_json

    spec = read_json(path, "labels file", ConfigError)
    name = spec.get("task")
    token_labels, window_labels = spec.get("token_labels"), spec.get("window_labels")
    if not isinstance(name, str) or (token_labels is None) == (window_labels is None):
        raise ConfigError(f"{path}: needs a 'task' name and exactly one of 'token_labels' or 'window_labels'")
    try:
        labels = torch.tensor(token_labels if token_labels is not None else window_labels, dtype=torch.long)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: labels must be lists of 0/1 integers") from None
    if token_labels is not None and (labels.dim() != 2 or labels.shape[1] != shape[1]):
        raise ConfigError(f"{path}: token_labels must be one list of {shape[1]} labels per window")
    if window_labels is not None and labels.dim() != 1:
        raise ConfigError(f"{path}: window_labels must be one label per window")
    if not 2 <= len(labels) <= shape[0] or bool(((labels != 0) & (labels != 1)).any()):
        raise ConfigError(
            f"{path}: need 0/1 labels for between 2 and {shape[0]} windows (raise --tokens for more), "
            f"got {len(labels)}"
        )
    labels = labels.bool()
    if labels.dim() == 2:
        labels[:, 0] = False  # BOS
    return name, labels


def _first_windows(source, tokens: int) -> tuple[Tensor, Tensor]:
    """(token windows [n, T], activations [n, T, d]) of the cache's first windows."""
    cache = source.cache
    context = cache.context_length
    n = max(2, min(cache.manifest.n_windows, -(-tokens // context)))
    parts, have = [], 0
    for batch in cache.batches(source.hook, 8 * context, shuffle=False, skip_bos=False):
        parts.append(batch.activations.float())
        have += len(batch.rows)
        if have >= n * context:
            break
    acts = torch.cat(parts)[: n * context].view(n, context, -1)
    return cache.tokens[:n], acts


def _latents(folder: str, acts: Tensor) -> Tensor:
    """Dense latents [n, T, n_latents] of acts [n, T, d], on acts' device."""
    from sae.io import load

    dictionary = load(folder, device=acts.device)
    n, t, d = acts.shape
    with torch.no_grad():
        dense = [dictionary.encode(chunk).to_dense() for chunk in acts.reshape(-1, d).split(8192)]
    return torch.cat(dense).view(n, t, -1)


def _rows_of(features: Tensor, labels: Tensor, windows: Tensor) -> tuple[Tensor, Tensor]:
    """Non-BOS token rows of the given windows."""
    x = features[windows][:, 1:].reshape(-1, features.shape[-1])
    y = labels[windows][:, 1:].reshape(-1)
    return x, y


def _config_json(config: ProbeConfig) -> dict:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def probe_neurons_vs_latents(
    windows: Tensor,
    neurons: Tensor,
    latents: Tensor,
    decode_token,
    k: int = 1,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> dict:
    """Held-out balanced accuracy of the k-sparse probe of every built-in task, on neurons and
    on latents of the same tokens (rows: the non-BOS positions of `windows`, in order). Tasks
    lacking a class in a split are left out."""
    from sae.probe_tasks import TASKS, task_labels

    n, context = windows.shape
    train_w, test_w = split_windows(n, test_fraction, seed)
    per_window = context - 1
    results = {}
    for task in TASKS:
        labels = task_labels(task, windows, decode_token)[:, 1:]
        y_train, y_test = labels[train_w].reshape(-1), labels[test_w].reshape(-1)
        if min(int(y_train.sum()), int((~y_train).sum()), int(y_test.sum()), int((~y_test).sum())) == 0:
            continue
        scores = {}
        for name, features in (("neurons", neurons), ("latents", latents)):
            f = features.view(n, per_window, -1)
            row = sweep(
                f[train_w].reshape(len(y_train), -1),
                y_train,
                f[test_w].reshape(len(y_test), -1),
                y_test,
                (k,),
            )[0]
            scores[name] = row["balanced_accuracy"]
        results[task] = scores
    return results
