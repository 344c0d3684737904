"""Small transcoders for the demo model (one per layer), trained in-process or reused from a folder.

`demo_transcoders(folder)` reads the demo model's MLP inputs (`blocks.L.ln2.hook_normalized`:
the residual centred and divided by its LayerNorm scale) and outputs (`blocks.L.hook_mlp_out`)
on windows of the tiny-shakespeare corpus, computed with the model's GraphTransformer in one
pass, and trains one TopK transcoder per layer through the public `sae` API (`sae.create` with
`d_out`, `Trainee.step(x, ..., target=y)`), saving each with `sae.io.save` under
`folder/layer{L}`. A folder whose `settings.json` matches is reused as it is. Used by the tests,
notebook 05 and the attribution-graph benchmark.

`skip=True` trains skip transcoders (a linear x̂ W_skip^T beside the latents; Paulo et al. 2025,
"Transcoders beat sparse autoencoders for interpretability"). In an attribution graph the skip is
part of the frozen linear system, so a downstream MLP's linear response to an ablation is carried
by W_skip instead of being lost in the constant error node: on the benchmark's prompts the graph's
predictions then rank the unfrozen ablations far better (README, `bench graphs`, which uses it).
The default stays without: the skip path also carries influence the latents otherwise would, so
fewer features survive pruning (notebook 05 draws and tables the pruned features).

`neuron_transcoders(graph)` is the training-free baseline: each MLP's own neurons as a TopK
transcoder (W_enc = the LN weight folded into W_in, W_dec = W_out; ReLU standing in for GELU),
so the graph's features are the model's neurons.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from circuits.transformer import GraphTransformer
from workbench import seeding
from workbench.files import write_json_atomic


@dataclass(frozen=True)
class DemoTranscoderSettings:
    n_latents: int = 512
    """Latents per transcoder."""
    k: int = 16
    """TopK's active latents per token."""
    tokens: int = 16384
    """Training tokens (windows of `context` tokens from tiny-shakespeare)."""
    context: int = 64
    steps: int = 300
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 0
    architecture: str = "topk"
    skip: bool = False
    """A linear skip connection x̂ W_skip^T beside the latents (skip transcoders, Paulo et al.
    2025): it carries the MLP's linear response, which the graph's constant error node misses."""


def demo_transcoders(folder: str | Path, *, model=None, **settings) -> list:
    """One transcoder per demo layer (see the module docstring); `settings` override
    `DemoTranscoderSettings`. Each returned Dictionary has meta hook / out_hook / path."""
    config = DemoTranscoderSettings(**settings)
    folder = Path(folder)
    stamp = folder / "settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) == asdict(config):
        return [_load(path) for path in sorted(folder.glob("layer*"), key=lambda p: int(p.name[5:]))]
    if model is None:
        from workbench.models import load_model

        model = load_model("demo")
    from circuits.transformer import from_gpt2

    graph = from_gpt2(model)
    inputs, outputs = mlp_activations(graph, _corpus_tokens(model, config))
    held = max(1, len(inputs[0]) // 10)  # the last tenth of the rows: held out for the FVU
    out = []
    for layer in range(graph.shape.n_layers):
        x, y = inputs[layer], outputs[layer]
        d = _train(x[:-held], y[:-held], config, layer, graph.shape.d_model)
        with torch.no_grad():
            residual = y[-held:] - d(x[-held:])
            fvu = float(residual.pow(2).sum() / (y[-held:] - y[-held:].mean(0)).pow(2).sum())
        path = folder / f"layer{layer}"
        _save(d, path, model, layer, {"fvu": round(fvu, 4), "held_out_rows": held})
        out.append(_load(path))
    write_json_atomic(stamp, asdict(config))
    return out


def _load(path: Path):
    """The saved transcoder, its folder recorded in meta["path"] (the graph JSON links to it)."""
    from sae.io import load

    dictionary = load(path)
    dictionary.meta["path"] = str(path)
    return dictionary


def _corpus_tokens(model, config: DemoTranscoderSettings) -> Tensor:
    from workbench.corpus import iter_documents, token_windows

    windows = token_windows(
        iter_documents("tiny-shakespeare"),
        model.tokenizer,
        config.context,
        model.bos_token_id,
        model.separator_token_ids,
        max_windows=-(-config.tokens // config.context),
        corpus_name="tiny-shakespeare",
    )
    return windows.tokens


@torch.no_grad()
def mlp_activations(graph: GraphTransformer, tokens: Tensor, batch: int = 64) -> tuple[Tensor, Tensor]:
    """([L, N, d] what a transcoder reads, [L, N, d] the MLP outputs) on token windows [W, T]."""
    ins, outs = [], []
    for start in range(0, len(tokens), batch):
        r = graph.embed(tokens[start : start + batch])
        layer_in, layer_out = [], []
        for layer in range(graph.shape.n_layers):
            H = graph.shape.n_heads
            heads, _ = graph.heads(layer, r.expand(3, H, *r.shape))
            mid = r + heads.sum(0)
            centred = mid - mid.mean(-1, keepdim=True)
            layer_in.append(centred / (centred.pow(2).mean(-1, keepdim=True) + graph.shape.eps).sqrt())
            layer_out.append(graph.mlp(layer, mid))
            r = mid + layer_out[-1]
        ins.append(torch.stack(layer_in).flatten(1, 2))
        outs.append(torch.stack(layer_out).flatten(1, 2))
    return torch.cat(ins, 1), torch.cat(outs, 1)


def _train(x: Tensor, y: Tensor, config: DemoTranscoderSettings, layer: int, d: int):
    from sae.base import create
    from sae.config import DictionaryConfig
    from sae.trainee import Trainee

    dictionary = create(
        DictionaryConfig(
            architecture=config.architecture,
            d_in=d,
            n_latents=config.n_latents,
            k=config.k,
            d_out=d,
            skip=config.skip,
        ),
        seed=config.seed,
        salt=f"demo-transcoder-{layer}",
    )
    trainee = Trainee(f"layer{layer}", dictionary, config.lr, clip_grad=1.0, dead_after_tokens=len(x))
    order = torch.randperm(len(x), generator=seeding.generator(config.seed, "data order", f"layer{layer}"))
    for step in range(config.steps):
        rows = order[(torch.arange(config.batch_size) + step * config.batch_size) % len(x)]
        trainee.step(x[rows], config.lr, step / config.steps, step, target=y[rows])
    return dictionary.eval()


def _save(dictionary, path: Path, model, layer: int, metrics: dict) -> None:
    from sae.io import save

    save(
        dictionary,
        path,
        hook=f"blocks.{layer}.ln2.hook_normalized",
        out_hook=f"blocks.{layer}.hook_mlp_out",
        model=model.spec,
        metrics=metrics,
    )


def neuron_transcoders(graph: GraphTransformer, k: int = 32) -> dict[int, object]:
    """{layer: a TopK Dictionary whose latents are the layer's MLP neurons} (module docstring):
    z = W_in^T (w_ln ⊙ x̂ + b_ln) + b_in, decoded by W_out + b_out; reads x̂ like a transcoder."""
    from circuits.replacement import encoder_shift
    from sae.base import create
    from sae.config import DictionaryConfig

    out = {}
    s = graph.shape
    for layer in range(s.n_layers):
        w_ln, b_ln = graph.ln2[layer] if s.layer_norm else (torch.ones(s.d_model), torch.zeros(s.d_model))
        width = {"d_out": s.d_model} if "d_out" in DictionaryConfig.__dataclass_fields__ else {}
        config = DictionaryConfig(architecture="topk", d_in=s.d_model, n_latents=s.d_mlp, k=k, **width)
        d = create(config, salt="neurons")
        with torch.no_grad():
            d.W_enc.copy_((w_ln[:, None] * graph.W_in[layer]).T)
            d.W_dec.copy_(graph.W_out[layer])
            d.b_dec.copy_(graph.b_out[layer])
            shift = encoder_shift(d)  # an SAE stand-in subtracts b_dec before encoding
            d.b_enc.copy_(
                b_ln @ graph.W_in[layer] + graph.b_in[layer] + (0 if shift is None else d.W_enc @ shift)
            )
        d.meta = {"hook": f"blocks.{layer}.ln2.hook_normalized", "out_hook": f"blocks.{layer}.hook_mlp_out"}
        out[layer] = d.eval()
    return out
