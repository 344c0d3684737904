"""Training a cross-layer transcoder (`sae.crosslayer`) jointly on every layer's (in, out) pairs.

Loss per step (batch of N tokens, rows scaled per hook to mean norm sqrt(d)):
    sum_t mean_n |y_t - y_hat_t|^2  +  sparsity
where sparsity is, per source layer s: topk / batchtopk: alpha * AuxK (dead latents fit the
residual of layer s's own output with their same-layer decoders); jumprelu: lambda_s * L0_s with
lambda_s = mu_s * sg(mse) / target and mu_s steered to the L0 target (`sae.dictionaries.jumprelu`);
relu: lambda_s * sum_i f_i |d_i| with |d_i| over all of latent i's decoders, lambda_s steered to
the L0 target (`sae.dictionaries.relu`). topk / batchtopk / jumprelu keep each latent's
concatenated decoder at unit norm (projected gradient). Adam, linear warm-up, linear decay over
the last 20%. The scales are folded into the weights at save, so the CLT acts on raw activations.

Writes `out/config.json` + `weights.safetensors` (`sae.crosslayer.save`) and `out/log.jsonl`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae.base import aux_k_loss, gather_per_latent, reconstruction_loss, relu_values
from sae.crosslayer import CrossLayerConfig, CrossLayerTranscoder, save
from sae.crosslayer_data import LayerPairs
from sae.dictionaries.jumprelu import JumpReLUFunction, StepFunction
from workbench import seeding
from workbench.cache_reader import ActivationCache
from workbench.errors import ConfigError
from workbench.kernels import encode_batch_topk, encode_threshold, encode_topk
from workbench.logs import JsonlLogger


@dataclass(frozen=True)
class CrossLayerTrainConfig:
    tokens: int = 0
    """Training tokens; 0 means one pass over the cache's kept rows."""
    batch_size: int = 1024
    """Tokens per step (every layer's pair of each token)."""
    lr: float = 0.0
    """Adam learning rate; 0 means 2e-4 / sqrt(n_latents / 2**14), as the per-layer trainer."""
    warmup_fraction: float = 0.05
    """Fraction of steps of linear learning-rate warm-up."""
    dead_after_tokens: int = 0
    """A latent silent this many tokens is dead (AuxK trains it); 0 means tokens / 10."""
    log_every: int = 10
    """Steps between records in log.jsonl."""
    eval_rows: int = 4096
    """Cache rows the final per-layer FVU is measured on (a draw of their own)."""

    def __post_init__(self):
        if self.batch_size <= 0 or self.tokens < 0 or self.lr < 0 or self.log_every <= 0:
            raise ConfigError("batch_size and log_every must be > 0, tokens and lr >= 0")


def default_hooks(layers: list) -> tuple[list, list]:
    """GPT-2 / TransformerLens MLP hooks of `layers`: blocks.L.ln2.hook_normalized (in) and
    blocks.L.hook_mlp_out (out)."""
    return [f"blocks.{l}.ln2.hook_normalized" for l in layers], [f"blocks.{l}.hook_mlp_out" for l in layers]


def train_cross_layer(
    cache,
    layers: list,
    config: CrossLayerConfig,
    out_folder: str | Path,
    seed: int = 0,
    train: CrossLayerTrainConfig = CrossLayerTrainConfig(),
    *,
    in_hooks: Optional[list] = None,
    out_hooks: Optional[list] = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> CrossLayerTranscoder:
    """Train one CLT over `layers` (ascending) of the cache's MLP (in, out) hooks (default
    `default_hooks(layers)`) and save it in `out_folder`. `config`'s n_layers, d_in and d_out are
    set from the cache. `cache` is a cache folder or a ready source with LayerPairs's interface
    (tests pass planted data). Returns the saved CLT (on the CPU, scales folded, `meta` as saved)."""
    if list(layers) != sorted(set(layers)) or not layers:
        raise ConfigError(f"layers must be distinct and ascending, got {layers}")
    default_in, default_out = default_hooks(layers)
    if isinstance(cache, (str, Path)):
        pairs = LayerPairs(ActivationCache(cache), in_hooks or default_in, out_hooks or default_out, seed)
    else:
        pairs = cache
    if pairs.rows_per_epoch < train.batch_size:
        raise ConfigError(
            f"the cache has {pairs.rows_per_epoch} rows, fewer than one batch of {train.batch_size}"
        )
    config = replace(config, n_layers=len(layers), d_in=pairs.d_in, d_out=pairs.d_out)
    clt = CrossLayerTranscoder(config, seeding.generator(seed, "init", "cross-layer", config.architecture))
    sample_x, sample_y = pairs.sample(min(8192, pairs.rows_per_epoch), "init")
    in_scales = [math.sqrt(pairs.d_in) / float(x.norm(dim=1).mean().clamp_min(1e-12)) for x in sample_x]
    out_scales = [math.sqrt(pairs.d_out) / float(y.norm(dim=1).mean().clamp_min(1e-12)) for y in sample_y]
    trainer = _Trainer(clt, train, pairs.rows_per_epoch, torch.device(device))
    trainer.initialize(
        [x * s for x, s in zip(sample_x, in_scales)], [y * s for y, s in zip(sample_y, out_scales)]
    )
    out_folder = Path(out_folder)
    started = time.time()
    with JsonlLogger(out_folder / "log.jsonl") as log:
        bar = tqdm(total=trainer.steps, disable=not progress, unit="step", desc="train cross-layer")
        epoch = 0
        while trainer.step < trainer.steps:
            for xs, ys in pairs.epoch(epoch, train.batch_size):
                xs = [(x * s).to(trainer.device) for x, s in zip(xs, in_scales)]
                ys = [(y * s).to(trainer.device) for y, s in zip(ys, out_scales)]
                terms = trainer.train_step(xs, ys)
                bar.update(1)
                if trainer.step % train.log_every == 0 or trainer.step == trainer.steps:
                    log.log(step=trainer.step, **terms)
                    bar.set_postfix(loss=f"{terms['loss']:.3g}")
                if trainer.step >= trainer.steps:
                    break
            epoch += 1
        bar.close()
    clt = clt.cpu()
    clt.fold_scales(in_scales, out_scales)
    eval_x, eval_y = pairs.sample(min(train.eval_rows, pairs.rows_per_epoch), "eval")
    metrics = {**fvu_per_layer(clt, eval_x, eval_y), "seconds": round(time.time() - started, 2)}
    clt.meta = {
        "in_hooks": pairs.in_hooks,
        "out_hooks": pairs.out_hooks,
        "layers": list(layers),
        "model": getattr(pairs, "model", None),
        "cache": str(getattr(pairs, "path", "")),
        "seed": seed,
        "train": asdict(train),
        "tokens_trained": trainer.step * train.batch_size,
        "metrics": metrics,
    }
    save(clt, out_folder)
    return clt


@torch.no_grad()
def fvu_per_layer(clt: CrossLayerTranscoder, xs: list, ys: list) -> dict:
    """{"fvu": total, "fvu_per_layer": [...], "l0_per_layer": [...]}: FVU_t = sum |y_t - y_hat_t|^2 /
    sum |y_t - mean(y_t)|^2 on the given rows; total over all layers' sums."""
    codes = [clt.encode(s, x) for s, x in enumerate(xs)]
    preds = clt.decode_all(codes)
    errors = [float((y - p).pow(2).sum()) for y, p in zip(ys, preds)]
    spreads = [float((y - y.mean(0)).pow(2).sum()) for y in ys]
    return {
        "fvu": sum(errors) / max(sum(spreads), 1e-12),
        "fvu_per_layer": [e / max(v, 1e-12) for e, v in zip(errors, spreads)],
        "l0_per_layer": [float((f.flat_values() > 0).sum()) / max(f.n_rows, 1) for f in codes],
    }


class _Trainer:
    """Optimizer, schedule, dead-latent counters and the controllers' steps of one CLT."""

    def __init__(self, clt: CrossLayerTranscoder, train: CrossLayerTrainConfig, rows: int, device):
        self.clt, self.train, self.device = clt.to(device), train, device
        c = clt.config
        tokens = train.tokens or rows
        self.steps = max(1, tokens // train.batch_size)
        self.lr = train.lr or 2e-4 / math.sqrt(c.n_latents / 2**14)
        self.optimizer = torch.optim.Adam(clt.parameters(), lr=self.lr)
        self.dead_steps = max(1, (train.dead_after_tokens or tokens // 10) // train.batch_size)
        self.silent = torch.zeros(c.n_layers, c.n_latents, dtype=torch.long, device=device)
        self.step = 0

    @torch.no_grad()
    def initialize(self, xs: list, ys: list) -> None:
        """b_dec at each output's mean; JumpReLU thresholds at the quantile giving the L0 target."""
        clt, c = self.clt, self.clt.config
        for t, y in enumerate(ys):
            clt.b_dec[t].copy_(y.mean(0))
        if c.architecture == "jumprelu":
            quantile = 1 - min(1.0, c.effective_target_l0 / c.n_latents)
            for s, x in enumerate(xs):
                z = clt.pre_activations(s, x.to(self.device))
                rank = min(z.shape[0], max(1, math.ceil(quantile * z.shape[0])))
                clt.threshold[s].copy_(z.kthvalue(rank, dim=0).values.clamp_min(c.bandwidth))

    def train_step(self, xs: list, ys: list) -> dict:
        clt, c = self.clt, self.clt.config
        progress = self.step / self.steps
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * _schedule(progress, self.train.warmup_fraction)
        codes, extras, penalties, terms = [], [], [], {}
        for s, x in enumerate(xs):
            f, extra, penalty = self._select(s, x)
            codes.append(f)
            extras.append(extra)
            penalties.append(penalty)
        preds = clt.decode_all(codes)
        mses = [reconstruction_loss(y, p) for y, p in zip(ys, preds)]
        mse = sum(mses)
        loss = mse
        for s, f in enumerate(codes):
            loss = loss + self._sparsity(s, f, penalties[s], mse, progress, ys[s], preds[s], extras[s])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.architecture != "relu":
            self._project_gradients()
        torch.nn.utils.clip_grad_norm_(clt.parameters(), 1.0)
        self.optimizer.step()
        self._after_step(codes)
        self.step += 1
        l0 = [float((f.flat_values() > 0).sum()) / f.n_rows for f in codes]
        terms.update(
            loss=float(loss.detach()),
            mse=[round(float(m.detach()), 5) for m in mses],
            l0=[round(v, 2) for v in l0],
        )
        terms["dead"] = int((self.silent >= self.dead_steps).sum())
        return terms

    def _select(self, s: int, x: Tensor):
        """(codes f with gradients, AuxK codes or None, JumpReLU's L0 term or None)."""
        clt, c = self.clt, self.clt.config
        W, b = clt.W_enc[s], clt.b_enc[s]
        dead = self.silent[s] >= self.dead_steps
        aux = (
            dead if c.architecture in ("topk", "batchtopk") and c.aux_coef > 0 and bool(dead.any()) else None
        )
        kwargs = dict(aux_k=c.effective_aux_k, aux_mask=aux) if aux is not None else {}
        if c.architecture == "topk":
            selected = encode_topk(x, W, b, c.k, **kwargs)
            return relu_values(selected), selected.extra, None
        if c.architecture == "batchtopk":
            selected = encode_batch_topk(x, W, b, c.k, **kwargs)
            return relu_values(selected), selected.extra, None
        if c.architecture == "jumprelu":
            eps = c.bandwidth
            candidates = encode_threshold(x, W, b, clt.threshold[s].detach() - eps / 2)
            theta = gather_per_latent(clt.threshold[s], candidates)
            f = candidates.with_values(JumpReLUFunction.apply(candidates.values, theta, eps))
            l0 = StepFunction.apply(candidates.values, theta, eps).sum() / x.shape[0]
            return f, None, l0
        return encode_threshold(x, W, b, torch.zeros_like(b)), None, None

    def _sparsity(self, s, f, l0, mse, progress, y, pred, extra) -> Tensor:
        clt, c = self.clt, self.clt.config
        if c.architecture in ("topk", "batchtopk"):
            if extra is None:
                return mse.new_zeros(())
            return c.aux_coef * aux_k_loss(y, pred, extra, clt.W_dec[s][:, 0].contiguous())
        if c.architecture == "jumprelu":
            coefficient = clt.multiplier[s] * mse.detach() / c.effective_target_l0
            self._steer(s, l0.detach())
            return coefficient * l0
        lam = c.l1_coef * float(clt.l1_scale[s]) * min(1.0, progress / 0.05)
        sparsity = (f.values * clt.latent_scale(s, f)).sum() / f.n_rows
        if progress >= 0.05 and c.controller_rate > 0:
            error = ((f.values > 0).sum() / f.n_rows / c.effective_target_l0 - 1).clamp(-1, 1)
            clt.l1_scale[s].mul_(torch.exp(0.1 * c.controller_rate * error.detach()))
        return lam * sparsity

    @torch.no_grad()
    def _steer(self, s: int, l0: Tensor) -> None:
        c = self.clt.config
        error = (l0 / c.effective_target_l0 - 1).clamp(-1, 1)
        self.clt.multiplier[s] += c.controller_rate * error
        self.clt.threshold[s].mul_(torch.exp(c.controller_rate * error))

    @torch.no_grad()
    def _project_gradients(self) -> None:
        for w in self.clt.W_dec:
            if w.grad is not None:
                rows, grad = w.view(w.shape[0], -1), w.grad.view(w.shape[0], -1)
                grad.addcmul_((grad * rows).sum(1, keepdim=True), rows, value=-1)

    @torch.no_grad()
    def _after_step(self, codes: list) -> None:
        clt, c = self.clt, self.clt.config
        if c.architecture != "relu":
            for w in clt.W_dec:
                w.div_(w.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None])
        if c.architecture == "jumprelu":
            clt.threshold.clamp_(min=0)
        for s, f in enumerate(codes):
            fired = torch.zeros(c.n_latents, dtype=torch.bool, device=self.silent.device)
            fired[f.flat_indices()[f.flat_values() > 0]] = True
            self.silent[s] = torch.where(fired, 0, self.silent[s] + 1)
            if c.architecture == "batchtopk":
                positive = f.flat_values()[f.flat_values() > 0]
                if positive.numel():
                    eta = c.threshold_momentum if int(clt.threshold_updates[s]) else 1.0
                    clt.threshold[s] = (1 - eta) * clt.threshold[s] + eta * positive.min()
                    clt.threshold_updates[s] += 1


def _schedule(progress: float, warmup: float) -> float:
    """Learning-rate factor: linear warm-up, flat, linear decay to 0 over the last 20%."""
    if warmup > 0 and progress < warmup:
        return (progress + 1e-9) / warmup
    return min(1.0, (1 - progress) / 0.2)
