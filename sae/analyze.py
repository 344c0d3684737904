"""Build a dictionary's feature store (`workbench analyze`): one streaming pass over a cache.

The cache is read in order, in blocks of whole windows, and each block is encoded once. Per
feature, with memory bounded by [features, a few dozen] arrays whatever the token count:
    fired, density, mean and max activation; a histogram over log-spaced activation bins (edges
    shared by all features, fixed from the first block; values outside fall in the end bins);
    the `top` highest activations (a per-feature heap) and a uniform sample of all firings
    (a bottom-k sketch, `sae.per_feature`) from which the quantile groups are cut at the end:
    the sample sorted by activation, split into `quantile_bins` equal groups, `per_bin` each;
    for every kept example, the feature's activation on each token of its context, taken from
    the same block's codes at the moment the example is offered (never re-encoded);
    Pearson correlation with each dimension of the hook (its neurons), from running sums;
    co-occurrence: a uniform sample of `cooccurrence_rows` firing rows keeps the row's active
    set; rate = P(other fires | feature fires), lift = rate / density(other).
At the end, from the weights: decoder cosine neighbours, and logit effects W_dec·W_U (through
the final LayerNorm's centring and scale where the model has one; hooks of the residual width);
for a dictionary at `blocks.L.attn.hook_z`, each decoder row's norm per attention head
(`sae.attention_heads`, the store's heads table).
A transcoder (issue 22) is analyzed at the hook it reads (activations, examples, neuron
correlations: the cache must hold that hook) and its decoder rows where it writes: logit effects
through the output hook (an MLP output is added to the residual stream, so W_dec·W_U through the
final norm as for residual hooks), neighbours among its decoder rows; the store's meta records
`out_hook` and `d_out` (an SAE's store has neither).
The pass runs on the model's device (`--device`): each block is moved there, encoded, and every
accumulator lives there; the random sample keys are drawn on the host (the same on any
device); the finished accumulators come back to the host to build the tables.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae.attention_heads import attention_layer, heads_table, n_heads_of, output_directions
from sae.base import Dictionary, DictionaryError
from sae.per_feature import SmallestKeys, ranked_within_groups
from sae.splicing import hook_of, on_device
from sae.summaries import add_summaries, vocab_texts
from workbench.cache_reader import ActivationCache
from workbench.devices import MODEL_DTYPES, check_device_spec, check_dtype_name, resolve_device
from workbench.errors import CacheError
from workbench.kernels import SparseCodes
from workbench.store import STORE_FILE, list_column, write_store


@dataclass(frozen=True)
class AnalyzeConfig:
    cache: str = ""
    """Activation cache to read; empty means the one the dictionary was trained on."""
    tokens: int = 0
    """Tokens to analyze (whole windows, from the start of the cache); 0 means all."""
    out: str = ""
    """Store file; empty means RUN/features.duckdb."""
    block_windows: int = 32
    """Windows encoded together."""
    top: int = 20
    """Top-activating examples kept per feature."""
    quantile_bins: int = 10
    """Quantile groups of examples per feature."""
    per_bin: int = 5
    """Examples shown per quantile group."""
    context_before: int = 24
    """Tokens of context before an example's peak (longer ones on demand: sae.contexts)."""
    context_after: int = 8
    """Tokens of context after an example's peak. The stream keeps (top + 2 * quantile_bins *
    per_bin) contexts per feature: 120 x 33 float32 = 16 kB a feature by default (260 MB at 16k)."""
    histogram_bins: int = 48
    """Log-spaced activation histogram bins."""
    neighbours: int = 10
    """Decoder cosine neighbours per feature."""
    logit_tokens: int = 10
    """Top and bottom logit-effect tokens per feature."""
    neurons: int = 5
    """Most correlated hook dimensions per feature."""
    cooccurrence_rows: int = 64
    """Firing rows sampled per feature to estimate co-occurrence."""
    cooccurrence_top: int = 10
    """Co-occurring features kept per feature."""
    cooccurrence_width: int = 0
    """Active features remembered per sampled row (its largest); 0 means k for fixed-k codes, else 64."""
    seed: int = 0
    """Seed of the uniform example samples."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N."""
    model_dtype: str = "float32"
    """The model's forward dtype: float32, bfloat16 (the usual choice on GPUs) or float16."""

    def __post_init__(self):
        check_device_spec(self.device)
        check_dtype_name(self.model_dtype, MODEL_DTYPES, "model_dtype")


def analyze(
    dictionary: Dictionary,
    config: AnalyzeConfig = AnalyzeConfig(),
    *,
    folder: str | Path | None = None,
    model=None,
    progress: bool = True,
) -> Path:
    """Build the store of `dictionary` (loaded from `folder`) and return its path. Runs on
    `model`'s device when a model is given, else loads the model on `config.device` (in
    `config.model_dtype`); the dictionary, or a copy of it, runs there. Raises CacheError,
    DictionaryError, DeviceError (a device this machine lacks), UnknownModelError."""
    from workbench.models import load_model

    started = time.perf_counter()
    device = model.device if model is not None else resolve_device(config.device)
    hook = hook_of(dictionary, None)
    out_hook = transcoder_out_hook(dictionary)
    cache = ActivationCache(config.cache or dictionary.meta.get("cache") or _default_cache())
    if out_hook and hook not in cache.hooks:
        raise CacheError(
            f"{cache.path}: no hook {hook!r}, which this transcoder reads (the cache has "
            f"{', '.join(cache.hooks)}; `workbench cache --hook {hook} --hook {out_hook}` writes both)"
        )
    cache.expect(hook=hook, width=dictionary.d_in)
    cache.require_tokens("workbench analyze (top examples, contexts, logit effects)")
    if model is None:
        spec = dictionary.meta.get("model") or cache.model
        model = load_model(spec, device=device, dtype=config.model_dtype)
    dictionary = on_device(dictionary, device)
    with torch.no_grad():
        stats = _stream(dictionary, cache, hook, config, progress)
        tables = stats.tables(cache.tokens)
        written = out_hook or hook  # where the decoder rows live
        tables.update(weight_tables(dictionary, model, config, hook=written))
        heads = n_heads_of(model) if attention_layer(written) is not None else 0
        if heads:
            tables["heads"] = heads_table(dictionary, heads)
    texts = vocab_texts(model.tokenizer, model.d_vocab)
    tables["vocab"] = pa.table({"token": np.arange(len(texts), dtype=np.int32), "text": texts})
    add_summaries(tables, texts, cache.context_length)
    out = Path(config.out) if config.out else Path(folder or ".") / STORE_FILE
    meta = {
        "n_latents": dictionary.n_latents,
        "d_in": dictionary.d_in,
        "architecture": dictionary.architecture,
        "k": dictionary.config.k,
        "hook": hook,
        "model": model.spec,
        "cache": str(Path(cache.path).resolve()),
        "dictionary_path": str(Path(folder).resolve()) if folder else "",
        "tokens_analyzed": stats.n_tokens,
        "context_length": cache.context_length,
        "histogram_edges": stats.edges.tolist(),
        "n_heads": heads,  # 0: not an attention-output (hook_z) dictionary
        "metrics": _metrics_of(dictionary, folder),
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if out_hook:  # an SAE's store keeps its keys as before transcoders
        meta.update(out_hook=out_hook, d_out=dictionary.d_out)
    return write_store(out, meta, tables)


def transcoder_out_hook(dictionary: Dictionary) -> str:
    """The hook a transcoder writes (its `meta["out_hook"]`), '' for an SAE. DictionaryError for a
    transcoder that does not record it."""
    if not getattr(dictionary, "is_transcoder", False):
        return ""
    out_hook = dictionary.meta.get("out_hook")
    if not out_hook:
        raise DictionaryError("this transcoder does not record the hook it writes (meta 'out_hook')")
    return out_hook


def _default_cache() -> Path:
    from workbench.activations import CacheConfig

    return CacheConfig().output_dir()


def _metrics_of(dictionary: Dictionary, folder) -> dict:
    import json

    metrics = dict(dictionary.meta.get("metrics") or {})
    evals = Path(folder) / "eval.json" if folder else None
    if evals is not None and evals.exists():
        found = json.loads(evals.read_text())
        joint = found.get("together") if isinstance(found.get("together"), dict) else {}
        for scores in (joint, found):  # a transcoder evaluated with others: the joint CE / KL scores
            metrics.update({k: v for k, v in scores.items() if isinstance(v, (int, float))})
        if "kl_sae" not in metrics and "kl_replaced" in metrics:  # a transcoder's KL, the Runs page's column
            metrics["kl_sae"] = metrics["kl_replaced"]
    return metrics


# --- the streaming pass --------------------------------------------------------------------
def window_blocks(
    cache: ActivationCache, hook: str, block_windows: int, max_tokens: int = 0
) -> Iterator[tuple[int, Tensor]]:
    """(first window, activations [windows * context, d]) of consecutive whole windows, in order
    (the cache's unshuffled batches of a multiple of the context length are whole windows)."""
    context = cache.context_length
    windows_left = math.ceil(max_tokens / context) if max_tokens else cache.manifest.n_windows
    for batch in cache.batches(hook, block_windows * context, shuffle=False, skip_bos=False):
        x = batch.activations[: windows_left * context]
        yield int(batch.rows[0]) // context, x.float()
        windows_left -= len(x) // context
        if windows_left <= 0:
            return


class StreamStats:
    """Everything accumulated over the stream (see the module docstring): `add` each encoded
    block (on `device`), then `to("cpu")` and `tables` builds the store's per-feature tables."""

    MOVED = ("fired", "sum", "sum_sq", "max", "histogram", "sum_ax", "sum_x", "sum_xx")

    def __init__(
        self,
        n_latents: int,
        d_in: int,
        context: int,
        config: AnalyzeConfig,
        device: torch.device | str = "cpu",
    ):
        self.F, self.context, self.config = n_latents, context, config
        self.device = torch.device(device)
        self.width = min(config.context_before + config.context_after + 1, context)
        zeros = functools.partial(torch.zeros, device=self.device)
        self.fired = zeros(n_latents, dtype=torch.long)
        self.sum = zeros(n_latents, dtype=torch.float64)
        self.sum_sq = zeros(n_latents, dtype=torch.float64)
        self.max = zeros(n_latents)
        self.histogram = zeros(n_latents * config.histogram_bins, dtype=torch.long)
        self.edges: Tensor | None = None  # on the host
        self.sum_ax = zeros(n_latents, d_in, dtype=torch.float64)
        self.sum_x = zeros(d_in, dtype=torch.float64)
        self.sum_xx = zeros(d_in, dtype=torch.float64)
        self.n_tokens = 0
        example = {
            "window": ((), torch.long),
            "position": ((), torch.long),
            "start": ((), torch.long),
            "value": ((), torch.float32),
            "context": ((self.width,), torch.float32),
        }
        self.top = SmallestKeys(n_latents, config.top, example, self.device)
        self.sample = SmallestKeys(n_latents, 2 * config.quantile_bins * config.per_bin, example, self.device)
        self.co: SmallestKeys | None = None  # its width is known from the first block's codes
        self.generator = torch.Generator().manual_seed(config.seed)  # host draws: the same on any device

    def to(self, device: torch.device | str) -> "StreamStats":
        """Move every accumulator to `device` (in place; `tables` needs the host); returns self."""
        self.device = torch.device(device)
        for name in self.MOVED:
            setattr(self, name, getattr(self, name).to(self.device))
        for kept in (self.top, self.sample, self.co):
            if kept is not None:
                kept.to(self.device)
        return self

    def add(self, first_window: int, x: Tensor, codes: SparseCodes) -> None:
        """Accumulate one block: x [windows * context, d] and its codes, both on `self.device`."""
        rows, feats, vals = codes.row_ids(), codes.flat_indices(), codes.flat_values().float()
        keep = (vals > 0) & (rows % self.context != 0)  # BOS rows are not analyzed
        rows, feats, vals = rows[keep], feats[keep], vals[keep]
        body = torch.arange(len(x), device=x.device) % self.context != 0
        self.n_tokens += int(body.sum())
        self._moments(x[body], rows, feats, vals, len(x))
        lookup = _CodeLookup(rows, feats, vals, self.F)
        make = lambda idx: self._example(first_window, rows[idx], feats[idx], vals[idx], lookup)  # noqa: E731
        self.top.offer(feats, -vals, make)
        uniform = torch.rand(len(feats), generator=self.generator).to(feats.device)
        self.sample.offer(feats, uniform, make)
        if self.co is None:
            width = self.config.cooccurrence_width or (codes.indices.shape[1] if codes.is_fixed_k else 64)
            self.co = SmallestKeys(
                self.F,
                self.config.cooccurrence_rows,
                {"active": ((max(width, 1),), torch.int32)},
                self.device,
            )
        active = _active_sets(rows, feats, vals, len(x), self.co.data["active"].shape[2])
        self.co.offer(feats, uniform, lambda idx: {"active": active[rows[idx]]})

    def _moments(self, x_body: Tensor, rows: Tensor, feats: Tensor, vals: Tensor, n_rows: int) -> None:
        self.fired += torch.bincount(feats, minlength=self.F)
        self.sum.index_add_(0, feats, vals.double())
        self.sum_sq.index_add_(0, feats, vals.double() ** 2)
        self.max.scatter_reduce_(0, feats, vals, "amax")
        if self.edges is None:
            top = float(vals.max()) if vals.numel() else 1.0
            self.edges = torch.logspace(
                math.log10(top) - 3, math.log10(top) + 0.6, self.config.histogram_bins + 1
            )
        bins = torch.bucketize(vals, self.edges[1:-1].to(device=vals.device, dtype=vals.dtype))
        self.histogram.index_add_(0, feats * self.config.histogram_bins + bins, torch.ones_like(feats))
        x_all = torch.zeros(n_rows, x_body.shape[1], device=x_body.device)
        x_all[torch.arange(n_rows, device=x_body.device) % self.context != 0] = x_body
        coo = torch.sparse_coo_tensor(
            torch.stack([feats, rows]), vals, (self.F, n_rows), check_invariants=False
        )
        self.sum_ax += torch.sparse.mm(coo, x_all).double()
        self.sum_x += x_body.double().sum(0)
        self.sum_xx += (x_body.double() ** 2).sum(0)

    def _example(
        self, first_window: int, rows: Tensor, feats: Tensor, vals: Tensor, lookup: "_CodeLookup"
    ) -> dict:
        position = rows % self.context
        start = (position - self.config.context_before).clamp(0, self.context - self.width)
        window_rows = (rows - position + start).unsqueeze(1) + torch.arange(self.width, device=rows.device)
        context = lookup.values_at(window_rows, feats.unsqueeze(1).expand_as(window_rows))
        return {
            "window": first_window + rows // self.context,
            "position": position,
            "start": start,
            "value": vals,
            "context": context,
        }

    # --- the tables ----------------------------------------------------------------------
    def tables(self, tokens: Tensor) -> dict[str, pa.Table]:
        """Every per-feature table; `tokens` [windows, context] are the cache's token windows."""
        fired = self.fired.numpy()
        n = max(self.n_tokens, 1)
        mean = np.where(fired > 0, self.sum.numpy() / np.maximum(fired, 1), 0.0)
        histogram = self.histogram.view(self.F, -1).numpy().astype(np.int32)
        features = pa.table(
            {
                "feature": np.arange(self.F, dtype=np.int32),
                "fired": fired,
                "density": fired / n,
                "mean_activation": mean,
                "max_activation": self.max.double().numpy(),
                "histogram": list_column(histogram, pa.int32()),
            }
        )
        return {
            "features": features,
            "examples": self._examples_table(tokens),
            "neurons": self._neurons_table(),
            "cooccurrence": self._cooccurrence_table(),
        }

    def _examples_table(self, tokens: Tensor) -> pa.Table:
        parts = [self._chosen("top", self.top, None), self._chosen("quantile", self.sample, self.config)]
        columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        offsets = columns.pop("start")[:, None] + np.arange(self.width)
        token_rows = tokens.numpy()[columns["window"][:, None], offsets]
        return pa.table(
            {
                "feature": columns["feature"].astype(np.int32),
                "kind": columns["kind"],
                "bin": columns["bin"].astype(np.int16),
                "rank": columns["rank"].astype(np.int16),
                "activation": columns["value"].astype(np.float32),
                "window_id": columns["window"].astype(np.int32),
                "position": columns["position"].astype(np.int16),
                "start": offsets[:, 0].astype(np.int16),
                "tokens": list_column(token_rows.astype(np.int32), pa.int32()),
                "activations": list_column(columns["context"].astype(np.float32), pa.float32()),
            }
        )

    def _chosen(self, kind: str, kept: SmallestKeys, quantiles: AnalyzeConfig | None) -> dict:
        """Flat columns of the kept examples (in key order); for the sample, the quantile groups' picks."""
        feature_ids, slot_ids, bins, ranks = [], [], [], []
        values, key_order = kept.data["value"].numpy(), kept.in_key_order().numpy()
        for feature, count in enumerate(kept.count().tolist()):
            if count == 0:
                continue
            slots = key_order[feature, :count]
            if quantiles is None:
                groups, rank = np.zeros(count, int), np.arange(count)
            else:
                picks, groups, rank = _quantile_picks(
                    values[feature, slots], quantiles.quantile_bins, quantiles.per_bin
                )
                slots = slots[picks]
            feature_ids.append(np.full(len(slots), feature))
            slot_ids.append(slots)
            bins.append(groups)
            ranks.append(rank)
        feature_ids, slot_ids = (
            np.concatenate(feature_ids or [[]]).astype(int),
            np.concatenate(slot_ids or [[]]).astype(int),
        )
        out = {
            name: kept.data[name].numpy()[feature_ids, slot_ids]
            for name in ("window", "position", "start", "value", "context")
        }
        if len(feature_ids) == 0:
            out["context"] = np.zeros((0, self.width), np.float32)
        return {
            "feature": feature_ids,
            "kind": np.full(len(feature_ids), kind),
            "bin": np.concatenate(bins or [[]]),
            "rank": np.concatenate(ranks or [[]]),
            **out,
        }

    def _chunks(self) -> Iterator[slice]:
        """Feature ranges small enough that a [chunk, max(F, d)] float64 temporary stays ~64 MB."""
        step = max(1, (1 << 23) // max(self.F, self.sum_ax.shape[1]))
        return (slice(start, min(start + step, self.F)) for start in range(0, self.F, step))

    def _neurons_table(self) -> pa.Table:
        n = max(self.n_tokens, 1)
        mean_x = self.sum_x / n
        std_x = (self.sum_xx / n - mean_x**2).clamp_min(0).sqrt()
        k = min(self.config.neurons, len(mean_x))
        index, values = [], []
        for part in self._chunks():
            mean_a = self.sum[part] / n
            std_a = (self.sum_sq[part] / n - mean_a**2).clamp_min(0).sqrt()
            cov = self.sum_ax[part] / n - mean_a[:, None] * mean_x[None, :]
            corr = cov / (std_a[:, None] * std_x[None, :]).clamp_min(1e-12)
            corr[std_a == 0] = 0
            top = corr.abs().topk(k, dim=1).indices
            index.append(top)
            values.append(corr.gather(1, top))
        return _ranked_table(torch.cat(index), torch.cat(values), "neuron", "correlation")

    def _cooccurrence_table(self) -> pa.Table:
        """Per feature, the features most often active in its sampled rows (rate, lift)."""
        counts = self.co.count().double()
        density = self.fired.double() / max(self.n_tokens, 1)
        k = min(self.config.cooccurrence_top, self.F - 1)
        columns: dict[str, list] = {"feature": [], "rank": [], "other": [], "rate": [], "lift": []}
        for part in self._chunks():
            active = self.co.data["active"][part].long()  # [chunk, rows, width], -1 = padding
            owner = torch.arange(part.start, part.stop).view(-1, 1, 1).expand_as(active)
            valid = (active >= 0) & (active != owner) & torch.isfinite(self.co.keys[part]).unsqueeze(2)
            cells = (owner[valid] - part.start) * self.F + active[valid]
            hits = torch.bincount(cells, minlength=(part.stop - part.start) * self.F).view(-1, self.F)
            top = hits.topk(k, dim=1)
            rate = top.values.double() / counts[part].clamp_min(1).unsqueeze(1)
            keep = top.values > 0
            rows, rank = keep.nonzero(as_tuple=True)
            other = top.indices[rows, rank]
            columns["feature"].append((rows + part.start).int().numpy())
            columns["rank"].append(rank.short().numpy())
            columns["other"].append(other.int().numpy())
            columns["rate"].append(rate[rows, rank].float().numpy())
            columns["lift"].append((rate[rows, rank] / density[other].clamp_min(1e-12)).float().numpy())
        return pa.table({name: np.concatenate(parts) for name, parts in columns.items()})


def _quantile_picks(
    values: np.ndarray, n_bins: int, per_bin: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions, group and rank of the examples shown: the sample (in random-key order) sorted
    by activation and cut into `n_bins` equal groups; each group shows its first `per_bin` slots."""
    by_value = np.argsort(values, kind="stable")
    group_of = np.empty(len(values), dtype=int)
    group_of[by_value] = np.arange(len(values)) * n_bins // len(values)
    slots, groups, ranks = [], [], []
    for group in range(n_bins):
        members = np.flatnonzero(group_of == group)[:per_bin]  # key order is random order
        slots.append(members)
        groups.append(np.full(len(members), group))
        ranks.append(np.arange(len(members)))
    return np.concatenate(slots), np.concatenate(groups), np.concatenate(ranks)


class _CodeLookup:
    """Activation of (row, feature) pairs of one block, by binary search over sorted keys."""

    def __init__(self, rows: Tensor, feats: Tensor, vals: Tensor, n_latents: int):
        self.n_latents = n_latents
        self.keys, order = torch.sort(rows * n_latents + feats)
        self.vals = vals[order]

    def values_at(self, rows: Tensor, feats: Tensor) -> Tensor:
        query = rows * self.n_latents + feats
        if self.keys.numel() == 0:
            return torch.zeros(query.shape, device=query.device)
        at = torch.searchsorted(self.keys, query).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[at] == query, self.vals[at], self.vals.new_zeros(()))


def _active_sets(rows: Tensor, feats: Tensor, vals: Tensor, n_rows: int, width: int) -> Tensor:
    """[n_rows, width] active features of each row (the largest `width`), -1 padded."""
    out = torch.full((n_rows, width), -1, dtype=torch.long, device=rows.device)
    if rows.numel() == 0:
        return out
    order, _, _, slot = ranked_within_groups(rows, -vals)  # each row's largest first
    keep = slot < width
    out[rows[order][keep], slot[keep]] = feats[order][keep]
    return out


def _stream(
    dictionary: Dictionary, cache: ActivationCache, hook: str, config: AnalyzeConfig, progress: bool
) -> StreamStats:
    """The accumulated pass, computed on the dictionary's device, returned on the host."""
    device = dictionary.W_dec.device
    stats = StreamStats(dictionary.n_latents, cache.width(hook), cache.context_length, config, device)
    total = min(config.tokens or cache.n_rows, cache.n_rows)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="analyze", disable=not progress)
    for first, x in window_blocks(cache, hook, config.block_windows, config.tokens):
        x = x.to(device)
        stats.add(first, x, dictionary.encode(x))
        bar.update(len(x))
    bar.close()
    if stats.n_tokens == 0:
        from workbench.errors import CacheError

        raise CacheError(f"{cache.path}: no tokens to analyze")
    return stats.to("cpu")


# --- from the weights ------------------------------------------------------------------------
def _ranked_table(index: Tensor, values: Tensor, other: str, value: str) -> pa.Table:
    n, k = index.shape
    return pa.table(
        {
            "feature": np.repeat(np.arange(n, dtype=np.int32), k),
            "rank": np.tile(np.arange(k, dtype=np.int16), n),
            other: index.reshape(-1).int().cpu().numpy(),
            value: values.reshape(-1).float().cpu().numpy(),
        }
    )


def weight_tables(
    dictionary: Dictionary, model, config: AnalyzeConfig, chunk: int = 1024, hook: str = ""
) -> dict[str, pa.Table]:
    """The tables read off the weights: decoder cosine neighbours, and logit effects when `model`
    is given and the dictionary has the residual width, or sits at a `hook_z` (its directions are
    first mapped through the layer's W_O; `sae.attention_heads.output_directions`) (computed
    where the dictionary is; the model's unembedding and final norm scale are brought there)."""
    directions = dictionary.W_dec.detach().float()
    unit = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(config.neighbours, dictionary.n_latents - 1)
    index, cosine = [], []
    for start in range(0, len(unit), chunk):
        sims = unit[start : start + chunk] @ unit.T
        diagonal = torch.arange(len(sims), device=sims.device)
        sims[diagonal, diagonal + start] = -float("inf")
        top = sims.topk(k, dim=1)
        index.append(top.indices)
        cosine.append(top.values)
    tables = {"neighbours": _ranked_table(torch.cat(index), torch.cat(cosine), "other", "cosine")}
    layer = attention_layer(hook)
    if model is not None and layer is not None:  # z is not in the residual basis, W_O z is
        directions = output_directions(directions, model, layer)
    residual = model is not None and directions.shape[1] == model.d_model
    logits = logit_effects(directions, model, config.logit_tokens, chunk) if residual else None
    if logits is not None:
        tables["logits"] = logits
    return tables


def final_norm_map(model) -> tuple[bool, Tensor | None]:
    """(centres, scale) of the model's final norm: LayerNorm centres and scales, RMSNorm scales."""
    norm = getattr(model.bridge, "ln_final", None)
    inner = getattr(norm, "original_component", norm)
    weight = getattr(inner, "weight", None)
    centres = norm is not None and "rms" not in type(inner).__name__.lower()
    return centres, (weight.detach().float() if weight is not None else None)


def logit_effects(directions: Tensor, model, n: int, chunk: int = 1024) -> pa.Table:
    """Top and bottom `n` tokens of each direction pushed through the final norm and W_U."""
    centres, scale = final_norm_map(model)
    W_U = model.unembed.float().to(directions.device)
    scale = scale.to(directions.device) if scale is not None else None
    n = min(n, W_U.shape[1])
    parts = []
    for start in range(0, len(directions), chunk):
        d = directions[start : start + chunk]
        if centres:
            d = d - d.mean(dim=1, keepdim=True)
        if scale is not None:
            d = d * scale
        effect = d @ W_U
        for side, largest in (("top", True), ("bottom", False)):
            top = effect.topk(n, dim=1, largest=largest)
            table = _ranked_table(top.indices, top.values, "token", "effect")
            feature = table.column("feature").to_numpy() + start
            parts.append((np.asarray(feature, np.int32), np.full(len(feature), side), table))
    return pa.table(
        {
            "feature": np.concatenate([p[0] for p in parts]),
            "side": np.concatenate([p[1] for p in parts]),
            "rank": np.concatenate([p[2].column("rank").to_numpy() for p in parts]),
            "token": np.concatenate([p[2].column("token").to_numpy() for p in parts]),
            "effect": np.concatenate([p[2].column("effect").to_numpy() for p in parts]),
        }
    )
