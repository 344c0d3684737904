"""`workbench train`, `eval`, `analyze`, `probe`, `codebook-finetune` and `explore`: training
dictionaries and what is done with them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from app.commands.data import relaunch_under_torchrun, wants_torchrun
from app.commands.output import print_rows, print_summary
from app.flags import config_from_args
from workbench.errors import WorkbenchError


def cmd_train(args) -> None:
    from sae.train_config import TrainConfig
    from sae.training import train
    from workbench.distributed import check_rank_devices, ranks
    from workbench.files import read_json

    config = config_from_args(TrainConfig, args)
    if getattr(config, "cross_layer", False):
        return _train_cross_layer(config, args)
    check_rank_devices(config.device, args.nproc)  # a device this machine lacks: one line, first
    if wants_torchrun(args):
        from sae.training import check_data_parallel
        from workbench.distributed import Ranks

        check_data_parallel(
            config.batch_size or args.nproc, Ranks(0, args.nproc)
        )  # refuse here, in one line, before launching ranks
        return relaunch_under_torchrun(args)
    folders = [f for one in _per_layer(config) for f in train(one, progress=not args.quiet)]
    if not ranks().is_main:
        return
    rows = []
    for folder in folders:
        meta = read_json(folder / "config.json", "dictionary config")
        metrics = meta.get("metrics", {})
        rows.append(
            {
                **({"layer_in": meta["hook"]} if meta.get("out_hook") else {}),
                "dictionary": folder.name,
                "latents": meta["dictionary"]["n_latents"],
                "k": meta["dictionary"]["k"],
                "fvu": round(metrics.get("fvu", float("nan")), 4),
                "l0": round(metrics.get("l0", float("nan")), 2),
                "l0_inference": round(metrics.get("inference_l0", float("nan")), 2),
                "dead_%": round(100 * metrics.get("dead_fraction", float("nan")), 2),
                **(
                    {"resampled": f"{metrics['resampled_total']} in {metrics['resamplings']}"}
                    if metrics.get("resamplings")
                    else {}
                ),
                "tokens": meta.get("tokens_trained"),
                **(
                    {
                        "tokens_per_s": round(metrics["tokens_per_s"]),
                        "data_wait_%": round(100 * metrics["data_wait_fraction"], 1),
                    }
                    if "tokens_per_s" in metrics
                    else {}
                ),
                "folder": str(folder),
            }
        )
    print_rows(rows, args.json)


def _train_cross_layer(config, args) -> None:
    """`workbench train --cross-layer`: one cross-layer transcoder over the --transcoder-layer
    layers' MLPs (sae.crosslayer_run); prints its per-layer FVU and the CE-loss / KL scores with
    every MLP replaced."""
    from sae.crosslayer_run import train_cross_layer_run

    if args.nproc > 1:
        raise WorkbenchError("--cross-layer trains in one process (drop --nproc)")
    folder, metrics = train_cross_layer_run(config, config.transcoder_layers, progress=not args.quiet)
    replaced = metrics["replaced_every_mlp"]
    row = {
        "cross_layer_transcoder": folder.name,
        "fvu": round(replaced["fvu"], 4),
        "fvu_per_layer": [round(v, 4) for v in replaced["fvu_per_layer"]],
        "l0_per_layer": [round(v, 2) for v in metrics["l0_per_layer"]],
        "ce_loss_score": round(replaced["ce_loss_score"], 4),
        "kl_score": round(replaced["kl_score"], 4),
        "folder": str(folder),
    }
    print_rows([row], args.json)


def _per_layer(config) -> list:
    """--transcoder-layer: one training config per layer (its MLP's hooks from the cache's
    model); otherwise `config` itself."""
    if not config.transcoder_layers:
        return [config]
    from sae.sources import open_cache_source
    from sae.transcoders import per_layer_configs
    from workbench.cache_reader import ActivationCache
    from workbench.models import load_model

    cache = config.cache or str(open_cache_source().cache.path)
    return per_layer_configs(config, load_model(ActivationCache(cache).model, device="cpu"))


def cmd_eval(args) -> None:
    from sae.evals import EvalConfig, evaluate
    from workbench.devices import resolve_device
    from workbench.files import write_json_atomic

    config = config_from_args(EvalConfig, args)
    device = resolve_device(config.device)  # a device this machine lacks: one line, before any loading
    runs = args.run if isinstance(args.run, list) else [args.run] if args.run else []
    folders = [f for run in runs or [None] for f in _dictionary_folders(Path(run) if run else None)]
    if _eval_cross_layer(config, folders, args, device):
        return
    if _eval_together(config, folders, args, device):
        return
    models = _with_models(
        folders, config.model, load=not config.cache, device=device, dtype=config.model_dtype
    )
    for folder, dictionary, model in models:
        metrics = evaluate(dictionary, config, model=model, progress=not args.quiet)
        if (folder / "config.json").exists():
            write_json_atomic(folder / "eval.json", metrics)
        shown = {
            "dictionary": str(folder),
            **{k: v for k, v in metrics.items() if k != "log_density_histogram"},
        }
        if args.json:
            print(json.dumps({"dictionary": str(folder), **metrics}))
        else:
            print_summary({k: round(v, 4) if isinstance(v, float) else v for k, v in shown.items()}, False)


def _eval_cross_layer(config, folders: list[Path], args, device) -> bool:
    """A cross-layer transcoder folder: every MLP replaced at once by it (sae.crosslayer_run);
    printed and written to its eval.json. False: no cross-layer transcoder among `folders`."""
    from sae.crosslayer import KIND
    from sae.crosslayer_run import evaluate_folder
    from workbench.files import read_json

    found = [
        f
        for f in folders
        if (f / "config.json").exists() and read_json(f / "config.json").get("kind") == KIND
    ]
    if not found:
        return False
    if len(folders) > 1:
        raise WorkbenchError(
            f"{found[0]}: a cross-layer transcoder is evaluated on its own; give its folder alone"
        )
    metrics = evaluate_folder(found[0], config, device)
    if args.json:
        print(json.dumps({"dictionary": str(found[0]), **metrics}))
    else:
        print_summary({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, False)
    return True


def _eval_together(config, folders: list[Path], args, device) -> bool:
    """Transcoders evaluated in place of their MLPs at once (`--together`, or automatically for
    transcoders of distinct layers of one model): prints and writes the joint CE-loss / KL
    scores and each one's FVU / L0 / dead % into every folder's eval.json. False: not that case."""
    from sae.io import load
    from sae.transcoder_evals import distinct_layers, evaluate_transcoders
    from workbench.files import write_json_atomic
    from workbench.models import load_model

    if len(folders) < 2 and not config.together:
        return False
    transcoders = [load(folder, device=device) for folder in folders]
    if not (config.together or distinct_layers(transcoders)):
        return False
    spec = config.model or transcoders[0].meta.get("model")
    if not spec:
        raise WorkbenchError("these transcoders record no model; pass --model")
    model = load_model(spec, device=device, dtype=config.model_dtype)
    metrics = evaluate_transcoders(transcoders, config, model, progress=not args.quiet)
    joint = {k: v for k, v in metrics.items() if k != "transcoders"}
    for folder, own in zip(folders, metrics["transcoders"]):
        if (folder / "config.json").exists():
            write_json_atomic(folder / "eval.json", {**own, "together": joint})
    if args.json:
        print(json.dumps({"dictionaries": [str(f) for f in folders], **metrics}))
        return True
    rows = [
        {"dictionary": str(f), **{k: round(v, 4) if isinstance(v, float) else v for k, v in own.items()}}
        for f, own in zip(folders, metrics["transcoders"])
    ]
    print_rows(rows, False)
    print_summary(
        {k: round(v, 4) if isinstance(v, float) else v for k, v in joint.items() if k != "replaced"},
        False,
    )
    return True


def cmd_analyze(args) -> None:
    from sae.analyze import AnalyzeConfig, analyze
    from workbench.devices import resolve_device
    from workbench.store import FeatureStore

    config = config_from_args(AnalyzeConfig, args)
    device = resolve_device(config.device)  # a device this machine lacks: one line, before any loading
    folders = _dictionary_folders(Path(args.run) if args.run else None)
    if config.out and len(folders) > 1:
        raise WorkbenchError(f"--out names one store, but {args.run} holds {len(folders)} dictionaries")
    for folder, dictionary, model in _with_models(folders, device=device, dtype=config.model_dtype):
        path = analyze(dictionary, config, folder=folder, model=model, progress=not args.quiet)
        store = FeatureStore(path)
        alive = store.features(min_density=1e-12, limit=store.n_latents)
        median_density = float(alive.density.median()) if len(alive) else 0.0
        print_summary(
            {
                "store": str(path),
                "features": store.n_latents,
                "alive": len(alive),
                "tokens": store.meta["tokens_analyzed"],
                "median_density": median_density,
                "seconds": store.meta["seconds"],
            },
            args.json,
        )
        store.close()


def cmd_probe(args) -> None:
    from sae.probes import ProbeConfig, default_output, run_probes

    config = config_from_args(ProbeConfig, args)
    rows = run_probes(config)
    shown = [
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "features_chosen"}
        for r in rows
    ]
    print_rows(rows if args.json else shown, args.json)
    if not args.json:
        print(f"saved: {default_output(config)}")


def cmd_codebook_finetune(args) -> None:
    from sae.codebook_finetune import FinetuneConfig, run_finetune

    out, metrics = run_finetune(config_from_args(FinetuneConfig, args), progress=not args.quiet)
    print_summary({"codebook": str(out), **{k: round(v, 4) for k, v in metrics.items()}}, args.json)


def cmd_explore(args) -> None:
    from app.explorer.launch import launch
    from workbench.devices import resolve_device

    device = resolve_device(args.device)  # a missing GPU is a one-line error before the server starts
    roots = args.stores or ["runs"]
    sys.exit(launch(roots, port=args.port, host=args.host, device=str(device), circuits=args.circuits))


def _with_models(
    folders: list[Path], model_spec: str = "", load: bool = True, device="cpu", dtype: str = "float32"
):
    """(folder, dictionary, model) per folder, both on `device` (the model's forward in `dtype`);
    each model (`model_spec`, else the dictionary's own) is loaded once for consecutive
    dictionaries of it; None when neither names one (or not `load`)."""
    from sae.crosslayer import refuse_cross_layer
    from sae.io import load
    from workbench.models import load_model

    model = None
    for folder in folders:
        dictionary = load(folder, device=device)
        refuse_cross_layer(dictionary, folder, "workbench analyze")  # eval takes it before this
        spec = (model_spec or dictionary.meta.get("model")) if load else ""
        if spec and (model is None or model.spec != spec):
            model = load_model(spec, device=device, dtype=dtype)
        yield folder, dictionary, (model if spec else None)


def _dictionary_folders(run: Path | None) -> list[Path]:
    """RUN itself if it holds a dictionary, else the dictionaries directly inside it, else those
    one level deeper (`workbench train --transcoder-layer` writes OUT/transcoder-<hook>/<arch>)."""
    from sae.io import CONFIG, is_dictionary_folder
    from sae.train_config import TrainConfig
    from sae.training import default_output_dir

    if run is None:  # the default `workbench train` run: on the default cache's first hook
        from workbench.activations import CacheConfig
        from workbench.cache_reader import ActivationCache

        cache_dir = CacheConfig().output_dir()
        hook = ActivationCache(cache_dir).hooks[0] if (cache_dir / "manifest.json").exists() else ""
        run = default_output_dir(TrainConfig(), hook)
    if is_dictionary_folder(run):
        return [run]

    def inside(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    found = [p for p in inside(run) if (p / CONFIG).exists()]
    found = found or [p for sub in inside(run) for p in inside(sub) if (p / CONFIG).exists()]
    if not found:
        raise WorkbenchError(f"{run}: no trained dictionary here (run `workbench train` first)")
    return found
