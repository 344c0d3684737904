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
    from workbench.activations import CacheConfig, select_windows
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
    text = CacheConfig(
        model=cache.model,
        corpus=cache.manifest.config.get("corpus", "default"),
        split="validation",
        tokens=EVAL_TOKENS,
        context_length=cache.context_length,
    )
    replaced = evaluate_replaced(clt, model, select_windows(text, model))
    clt.meta["metrics"] = {**clt.meta["metrics"], "replaced_every_mlp": replaced}
    clt.meta["config"] = replace(config, out=str(out)).to_json()  # `--config` reruns it
    save(clt.cpu(), out)
    return out, clt.meta["metrics"]
