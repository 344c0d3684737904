"""`workbench train --cross-layer`: a TrainConfig's settings as one cross-layer transcoder run.

The run reads every chosen layer's MLP input and output hooks (the model adapter's
`Model.mlp_hooks(layer)`, via `sae.transcoders.mlp_hook_pairs`; --transcoder-layer as for
per-layer transcoders, nothing meaning all) from one cache, trains the CLT
(`sae.crosslayer_train`), then scores it on held-out text of the cache's corpus with every MLP
replaced at once (`sae.crosslayer_eval`) and adds those metrics to its config.json.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sae.crosslayer import CrossLayerConfig, save
from sae.crosslayer_eval import evaluate_replaced
from sae.crosslayer_train import CrossLayerTrainConfig, train_cross_layer
from sae.transcoders import mlp_hook_pairs
from workbench.errors import ConfigError

EVAL_TOKENS = 16_384


def train_cross_layer_run(config, layers_spec="all", progress: bool = True) -> tuple[Path, dict]:
    """(folder, metrics) of the CLT trained with a TrainConfig's settings: its cache, one
    architecture, k and width per layer (--n-latents, else expansion * d_in), tokens, batch size,
    lr, seed, device, out (default runs/clt-<arch>-k<k>-m<n_latents>). Raises ConfigError for a
    grid (several --arch / --k / --expansion) or no --cache, CacheError for missing hooks."""
    from workbench.cache_reader import ActivationCache
    from workbench.devices import resolve_device
    from workbench.models import load_model

    if len(config.architectures) != 1 or len(config.k) != 1 or len(config.expansion) != 1:
        raise ConfigError("--cross-layer trains one transcoder: give one --arch, one --k and one --expansion")
    if not config.cache:
        raise ConfigError(
            "--cross-layer needs --cache DIR holding every layer's MLP input and output "
            "(workbench cache --transcoder-layer all writes them)"
        )
    cache = ActivationCache(config.cache)
    device = resolve_device(config.device)
    model = load_model(cache.model, device=device)
    pairs = mlp_hook_pairs(model, layers_spec or ("all",))  # the model adapter's MLP hooks
    layers, in_hooks, out_hooks = [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]
    d_in = cache.width(in_hooks[0]) if in_hooks[0] in cache.hooks else 0
    arch, k = config.architectures[0], config.k[0]
    n_latents = config.n_latents or config.expansion[0] * d_in
    clt_config = CrossLayerConfig(architecture=arch, n_latents=n_latents, k=k)
    train = CrossLayerTrainConfig(
        tokens=config.tokens,
        batch_size=config.batch_size or CrossLayerTrainConfig.batch_size,
        lr=config.lr,
        log_every=config.log_every,
    )
    out = Path(config.out or f"runs/clt-{arch}-k{k}-m{n_latents}")
    clt = train_cross_layer(
        cache.path,
        layers,
        clt_config,
        out,
        config.seed,
        train,
        in_hooks=in_hooks,
        out_hooks=out_hooks,
        device=device,
        progress=progress,
    )
    replaced = evaluate_replaced(clt, model, held_out_windows(model, cache, EVAL_TOKENS))
    clt.meta["metrics"] = {**clt.meta["metrics"], "replaced_every_mlp": replaced}
    clt.meta["config"] = replace(config, out=str(out)).to_json()  # `--config` reruns it
    save(clt.cpu(), out)
    return out, clt.meta["metrics"]


def held_out_windows(model, cache, tokens: int, corpus: str = "", context_length: int = 0):
    """[n, context] validation windows of the cache's corpus (or `corpus`), at its context."""
    from workbench.activations import CacheConfig, select_windows

    text = CacheConfig(
        model=model.spec,
        corpus=corpus or (cache.manifest.config.get("corpus", "default") if cache else "default"),
        split="validation",
        tokens=tokens,
        context_length=context_length or (cache.context_length if cache else 0),
    )
    return select_windows(text, model)


def evaluate_folder(folder: Path, config, device) -> dict:
    """`workbench eval` of a cross-layer transcoder folder: every MLP replaced at once by it on
    validation text (`config`: an EvalConfig's tokens, batch_size, model, corpus,
    context_length, model_dtype), written to folder/eval.json and returned."""
    from sae.crosslayer import load
    from workbench.cache_reader import ActivationCache
    from workbench.files import write_json_atomic
    from workbench.models import load_model

    clt = load(folder)
    spec = config.model or clt.meta.get("model")
    if not spec:
        raise ConfigError(f"{folder}: this cross-layer transcoder records no model; pass --model")
    model = load_model(spec, device=device, dtype=config.model_dtype)
    cached = clt.meta.get("cache")
    cache = ActivationCache(cached) if cached and (Path(cached) / "manifest.json").exists() else None
    windows = held_out_windows(model, cache, config.tokens, config.corpus, config.context_length)
    metrics = {"model": spec, **evaluate_replaced(clt, model, windows, batch_size=config.batch_size)}
    write_json_atomic(folder / "eval.json", metrics)
    return metrics
