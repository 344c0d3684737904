"""Per-layer transcoders (issue 22): which hooks a layer's transcoder reads and writes, and the
training runs `workbench train --transcoder-layer L,...|all` expands to.

A transcoder is an ordinary `Dictionary` with `config.d_out > 0` (see `sae.base`); it trains
from a cache holding both of its hooks (`sae.sources.PairedCacheSource`) and is saved in our
folder format with `out_hook` beside `hook`. The hooks of layer L's MLP come from the model
adapter (`workbench.models.Model.mlp_hooks`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from sae.train_config import TrainConfig
from workbench.errors import ConfigError

_LAYER = re.compile(r"^blocks\.(\d+)\.")


def parse_layers(values: Sequence[str | int], n_layers: int) -> list[int]:
    """Layer numbers from --transcoder-layer values: integers, comma lists ("0,2") or "all"
    (every layer); sorted, without repeats. Raises ConfigError for anything else or a layer the
    model lacks."""
    layers: set[int] = set()
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if part == "all":
                layers.update(range(n_layers))
            elif part.lstrip("-").isdigit():
                layer = int(part)
                if not 0 <= layer < n_layers:
                    raise ConfigError(f"--transcoder-layer {layer}: the model has layers 0..{n_layers - 1}")
                layers.add(layer)
            elif part:
                raise ConfigError(f"--transcoder-layer takes layer numbers or 'all', got {part!r}")
    if not layers:
        raise ConfigError("--transcoder-layer names no layer")
    return sorted(layers)


def layer_of(hook: str) -> int | None:
    """The block number in a TransformerLens hook name (blocks.L....), or None."""
    match = _LAYER.match(hook or "")
    return int(match.group(1)) if match else None


def mlp_hook_pairs(model, values: Sequence[str | int]) -> list[tuple[int, str, str]]:
    """(layer, in_hook, out_hook) of each --transcoder-layer layer, from the model adapter."""
    return [(layer, *model.mlp_hooks(layer)) for layer in parse_layers(values, model.n_layers)]


def per_layer_configs(config: TrainConfig, model) -> list[TrainConfig]:
    """One TrainConfig per --transcoder-layer layer: its MLP's hooks as --hook/--out-hook, and its
    own output folder (runs/transcoder-<in hook>, or OUT/transcoder-<in hook> under --out), so
    each saved config reruns its own layer."""
    if not config.transcoder_layers:
        return [config]
    configs = []
    for _, in_hook, out_hook in mlp_hook_pairs(model, config.transcoder_layers):
        out = str(Path(config.out) / f"transcoder-{in_hook}") if config.out else ""
        configs.append(replace(config, transcoder_layers=(), hook=in_hook, out_hook=out_hook, out=out))
    return configs
