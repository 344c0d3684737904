"""Evaluate transcoders on held-out text: how well each predicts its MLP's output, and what the
model loses when its MLPs are replaced by them, all at once (issue 22).

Windows come from the validation split of the corpus the transcoders were trained on. Real
forward passes of the model, hooked at each transcoder's in- and out-hook:
- clean: each transcoder reads its in-hook and predicts its out-hook; per transcoder over the
  non-BOS positions: fvu = sum |y - y_hat|^2 / sum |y - mean(y)|^2 (y: the out-hook, the MLP's
  output), mse, l0 (active latents per token), dead_fraction (latents that never fire on the
  eval set);
- replaced: every transcoder's out-hook is overwritten by its prediction from its in-hook *in
  the same pass* (so a later layer reads what the replaced earlier layers wrote: the errors
  compound, as in a replacement model);
- zero: every one of those out-hooks set to 0 (the MLPs zero-ablated, the baseline of SAELens's
  and the SAE evals' CE-loss recovered).
The BOS position keeps its real MLP output in both (transcoders are trained without BOS rows).
    ce_loss_score = (CE_zero - CE_replaced) / (CE_zero - CE_clean)   (1: as good as the model)
    kl_score = (KL_zero - KL_replaced) / KL_zero,  KL(clean || patched) per position
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from sae.base import Dictionary, DictionaryError
from sae.splicing import on_device
from sae.transcoders import layer_of


def check_together(transcoders: list[Dictionary]) -> None:
    """Refuse, in one line, transcoders that cannot replace their MLPs in one pass: an SAE among
    them, a missing hook, two writing the same hook, or different models."""
    seen: dict[str, int] = {}
    models = {str(t.meta.get("model")) for t in transcoders if t.meta.get("model")}
    if len(models) > 1:
        raise DictionaryError(
            f"transcoders of different models cannot be evaluated together: {sorted(models)}"
        )
    for index, t in enumerate(transcoders):
        if not t.is_transcoder:
            raise DictionaryError(f"dictionary {index} is an SAE (no d_out/out_hook), not a transcoder")
        hook, out_hook = t.meta.get("hook"), t.meta.get("out_hook")
        if not hook or not out_hook:
            raise DictionaryError(f"transcoder {index} does not record its hook and out_hook")
        if out_hook in seen:
            raise DictionaryError(f"transcoders {seen[out_hook]} and {index} both write {out_hook}")
        seen[out_hook] = index


def distinct_layers(transcoders: list[Dictionary]) -> bool:
    """Whether these are transcoders of one model, each of another layer (evaluated together by
    default: the model with all of them in place of its MLPs)."""
    if len(transcoders) < 2 or not all(t.is_transcoder for t in transcoders):
        return False
    layers = [layer_of(str(t.meta.get("out_hook", ""))) for t in transcoders]
    models = {str(t.meta.get("model")) for t in transcoders}
    return None not in layers and len(set(layers)) == len(layers) and len(models) == 1


def evaluate_transcoders(
    transcoders: list[Dictionary], config, model, progress: bool = True, windows: Tensor | None = None
) -> dict:
    """The module docstring's metrics for `transcoders` (one or several, see `check_together`) on
    `model` with `config` (an `sae.evals.EvalConfig`: tokens, batch_size, corpus, context_length).
    Returns {"model", "corpus", "tokens", "replaced": [out hooks], "transcoders": [per-transcoder
    metrics], "ce_clean", "ce_replaced", "ce_zero_ablation", "ce_loss_score", "kl_replaced",
    "kl_zero_ablation", "kl_score"}. `windows` [n, context] token ids (BOS first) replace the
    validation windows. Raises DictionaryError for hooks or widths that do not fit."""
    check_together(transcoders)
    for t in transcoders:
        for hook, width in ((t.meta["hook"], t.d_in), (t.meta["out_hook"], t.d_out)):
            if model.width(hook) != width:
                raise DictionaryError(
                    f"transcoder of {hook}: width {width}, the model's {hook} has {model.width(hook)}"
                )
    if windows is None:
        from sae.evals import validation_windows

        windows = validation_windows(config, transcoders[0].meta, model)
    transcoders = [on_device(t, model.device).eval() for t in transcoders]
    totals = [_Fit(t.n_latents, model.device) for t in transcoders]
    losses = {k: 0.0 for k in ("ce_clean", "ce_replaced", "ce_zero", "kl_replaced", "kl_zero")}
    positions = 0
    with torch.no_grad():
        for start in tqdm(
            range(0, len(windows), config.batch_size), disable=not progress, desc="eval", unit="batch"
        ):
            tokens = windows[start : start + config.batch_size]
            clean = _run(model, transcoders, tokens, "clean", totals)
            replaced = _run(model, transcoders, tokens, "replace")
            zeroed = _run(model, transcoders, tokens, "zero")
            n = _add_losses(losses, tokens, clean, replaced, zeroed)
            positions += n
    mean = {k: v / positions for k, v in losses.items()}
    return {
        "model": config.model or transcoders[0].meta.get("model"),
        "corpus": config.corpus or transcoders[0].meta.get("corpus") or "default",
        "tokens": totals[0].n,
        "replaced": [t.meta["out_hook"] for t in transcoders],
        "baseline": "zero ablation of every replaced MLP output (BOS kept)",
        "transcoders": [
            {"hook": t.meta["hook"], "out_hook": t.meta["out_hook"], **fit.metrics()}
            for t, fit in zip(transcoders, totals)
        ],
        "ce_clean": mean["ce_clean"],
        "ce_replaced": mean["ce_replaced"],
        "ce_zero_ablation": mean["ce_zero"],
        "ce_loss_score": _score(mean["ce_zero"], mean["ce_replaced"], mean["ce_clean"]),
        "kl_replaced": mean["kl_replaced"],
        "kl_zero_ablation": mean["kl_zero"],
        "kl_score": _score(mean["kl_zero"], mean["kl_replaced"], 0.0),
    }


def _run(model, transcoders: list[Dictionary], tokens: Tensor, mode: str, totals=None) -> Tensor:
    """Logits of one pass: "clean" (predictions only measured, into `totals`), "replace" (every
    out-hook overwritten by its transcoder's prediction from the same pass's in-hook), "zero"."""
    hooks = []
    for index, t in enumerate(transcoders):
        inputs: list[Tensor] = []
        hooks.append((t.meta["hook"], _keep(inputs)))
        hooks.append((t.meta["out_hook"], _write(t, inputs, mode, None if totals is None else totals[index])))
    with model.hooks(hooks):
        return model(tokens)


def _keep(into: list):
    def hook_fn(activation: Tensor, hook=None) -> None:
        into.append(activation.detach())

    return hook_fn


def _write(t: Dictionary, inputs: list, mode: str, fit):
    """The out-hook's function: predict from the last in-hook activation (non-BOS positions)."""

    def hook_fn(activation: Tensor, hook=None):
        if mode == "zero":
            out = activation.clone()
            out[:, 1:] = 0
            return out
        x = inputs[-1][:, 1:]
        y = activation[:, 1:]
        rows = x.reshape(-1, t.d_in).to(t.W_dec.dtype)
        codes = t.encode(rows)
        y_hat = t.decode(codes)
        skip = t.skip_term(rows)
        y_hat = y_hat if skip is None else y_hat + skip
        if mode == "clean":
            fit.add(y.reshape(-1, t.d_out).to(y_hat.dtype), y_hat, codes)
            return None
        out = activation.clone()
        out[:, 1:] = y_hat.to(activation.dtype).reshape(y.shape)
        return out

    return hook_fn


def _add_losses(losses: dict, tokens: Tensor, clean: Tensor, replaced: Tensor, zeroed: Tensor) -> int:
    targets = tokens[:, 1:].reshape(-1).to(clean.device)
    n = targets.shape[0]

    def logp(logits: Tensor) -> Tensor:
        return F.log_softmax(logits[:, :-1].double(), dim=-1).reshape(n, -1)

    clean_logp = logp(clean)
    losses["ce_clean"] += float(F.nll_loss(clean_logp, targets, reduction="sum"))
    for name, logits in (("replaced", replaced), ("zero", zeroed)):
        patched = logp(logits)
        losses[f"ce_{name}"] += float(F.nll_loss(patched, targets, reduction="sum"))
        losses[f"kl_{name}"] += float((clean_logp.exp() * (clean_logp - patched)).sum())
    return n


class _Fit:
    """Float64 sums of one transcoder's predictions on the clean passes."""

    def __init__(self, n_latents: int, device):
        self.n, self.sq_err, self.y_sq, self.l0 = 0, 0.0, 0.0, 0.0
        self.y_sum: Tensor | None = None
        self.fires = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.d = 1

    def add(self, y: Tensor, y_hat: Tensor, codes) -> None:
        y, y_hat = y.double(), y_hat.double()
        self.n += y.shape[0]
        self.d = y.shape[1]
        self.sq_err += float((y - y_hat).pow(2).sum())
        self.y_sq += float(y.pow(2).sum())
        self.y_sum = y.sum(0) if self.y_sum is None else self.y_sum + y.sum(0)
        active = codes.flat_values() != 0
        self.l0 += float(active.sum())
        self.fires += torch.bincount(codes.flat_indices()[active], minlength=len(self.fires)).double()

    def metrics(self) -> dict:
        if self.n == 0 or self.y_sum is None:
            raise DictionaryError("the eval set is empty")
        variance = self.y_sq - float(self.y_sum.pow(2).sum()) / self.n
        fvu = self.sq_err / variance if variance > 0 else float("nan")
        return {
            "tokens": self.n,
            "mse": self.sq_err / (self.n * self.d),
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "l0": self.l0 / self.n,
            "dead_fraction": float((self.fires == 0).double().mean()),
        }


def _score(baseline: float, patched: float, clean: float) -> float:
    """(baseline - patched) / (baseline - clean): 1 = as good as clean, 0 = as bad as the baseline."""
    gap = baseline - clean
    return (baseline - patched) / gap if gap != 0 else float("nan")
