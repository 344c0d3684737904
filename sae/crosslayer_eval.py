"""What replacing every MLP by a cross-layer transcoder costs the model (`sae.crosslayer`).

On held-out windows the model runs clean, with every layer's MLP output replaced at once by the
CLT's prediction, and with every MLP output zeroed (BOS position untouched in both, as
`sae.evals` splices). The replacement is the CLT's own forward: layer t's output is
b_dec[t] + sum_{s <= t} f_s W_dec[s -> t], with f_s encoded from layer s's input as it arrives
in the replaced run (so errors compound through the layers, as in the replacement model).
Reported over non-BOS next-token positions:
    ce_clean, ce_replaced, ce_zero_ablation;  ce_loss_score = (CE_zero - CE_repl) / (CE_zero - CE_clean)
    kl_replaced, kl_zero_ablation (KL(clean || patched) per position);  kl_score = 1 - KL_repl / KL_zero
    fvu_per_layer, fvu: the CLT's predictions vs the clean run's MLP outputs (from clean inputs)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.crosslayer import CrossLayerTranscoder
from workbench.errors import ConfigError
from workbench.kernels import decode


@torch.no_grad()
def evaluate_replaced(clt: CrossLayerTranscoder, model, windows: Tensor, batch_size: int = 8) -> dict:
    """The metrics above on `windows` [n, context] token ids, on the model's device. Raises
    ConfigError when the CLT does not record its hooks."""
    if None in clt.in_hooks or None in clt.out_hooks:
        raise ConfigError("this cross-layer transcoder does not record its in/out hooks")
    clt = clt.to(model.device).eval()
    sums = {"ce_clean": 0.0, "ce_replaced": 0.0, "ce_zero_ablation": 0.0, "kl_replaced": 0.0}
    sums["kl_zero_ablation"] = 0.0
    err = [0.0] * clt.n_layers
    ys: list = [[] for _ in range(clt.n_layers)]
    positions = 0
    for start in range(0, len(windows), batch_size):
        tokens = windows[start : start + batch_size].to(model.device)
        xs, clean_ys = _clean_pairs(clt, model, tokens)
        clean = model(tokens)
        for t, y_hat in enumerate(clt.predict(xs)):
            err[t] += float((clean_ys[t] - y_hat).pow(2).sum())
            ys[t].append(clean_ys[t].cpu())
        with model.hooks(_replacing_hooks(clt)):
            replaced = model(tokens)
        zero = [(h, _zero_after_bos) for h in clt.out_hooks]
        with model.hooks(zero):
            zeroed = model(tokens)
        targets = tokens[:, 1:].reshape(-1)
        clean_logp = F.log_softmax(clean[:, :-1].double(), dim=-1).reshape(len(targets), -1)
        sums["ce_clean"] += float(F.nll_loss(clean_logp, targets, reduction="sum"))
        for name, logits in (("replaced", replaced), ("zero_ablation", zeroed)):
            logp = F.log_softmax(logits[:, :-1].double(), dim=-1).reshape(len(targets), -1)
            sums[f"ce_{name}"] += float(F.nll_loss(logp, targets, reduction="sum"))
            sums[f"kl_{name}"] += float((clean_logp.exp() * (clean_logp - logp)).sum())
        positions += len(targets)
    metrics = {k: v / max(positions, 1) for k, v in sums.items()}
    spreads = [float((torch.cat(y) - torch.cat(y).mean(0)).pow(2).sum()) for y in ys]
    return {
        **metrics,
        "ce_loss_score": _score(metrics["ce_zero_ablation"], metrics["ce_replaced"], metrics["ce_clean"]),
        "kl_score": _score(metrics["kl_zero_ablation"], metrics["kl_replaced"], 0.0),
        "fvu_per_layer": [e / max(v, 1e-12) for e, v in zip(err, spreads)],
        "fvu": sum(err) / max(sum(spreads), 1e-12),
        "tokens": positions,
    }


def _score(baseline: float, patched: float, clean: float) -> float:
    """(baseline - patched) / (baseline - clean), as `sae.evals` scores one dictionary."""
    gap = baseline - clean
    return (baseline - patched) / gap if gap != 0 else float("nan")


def _rows(activation: Tensor) -> Tensor:
    """[batch * (pos - 1), d]: the non-BOS positions' activations."""
    return activation[:, 1:].reshape(-1, activation.shape[-1])


def _clean_pairs(clt: CrossLayerTranscoder, model, tokens: Tensor) -> tuple[list, list]:
    cached = model.run_with_cache(tokens, [*clt.in_hooks, *clt.out_hooks], stop_early=False)
    return [_rows(cached[h]).float() for h in clt.in_hooks], [_rows(cached[h]).float() for h in clt.out_hooks]


def _zero_after_bos(activation: Tensor, hook=None) -> Tensor:
    out = activation.clone()
    out[:, 1:] = 0
    return out


def _replacing_hooks(clt: CrossLayerTranscoder) -> list:
    """In-hooks encode each layer's input as it arrives; out-hooks write the CLT's prediction."""
    codes: dict = {}

    def encoder(layer: int):
        def hook_fn(activation: Tensor, hook=None) -> None:
            codes[layer] = clt.encode(layer, _rows(activation).float())

        return hook_fn

    def writer(layer: int):
        def hook_fn(activation: Tensor, hook=None) -> Tensor:
            y_hat = clt.b_dec[layer].expand(codes[layer].n_rows, -1)
            for s in range(layer + 1):
                y_hat = y_hat + decode(codes[s], clt.decoder(s, layer).contiguous())
            out = activation.clone()
            out[:, 1:] = y_hat.reshape(out[:, 1:].shape).to(out.dtype)
            return out

        return hook_fn

    hooks = []
    for layer, (h_in, h_out) in enumerate(zip(clt.in_hooks, clt.out_hooks)):
        hooks += [(h_in, encoder(layer)), (h_out, writer(layer))]
    return hooks
