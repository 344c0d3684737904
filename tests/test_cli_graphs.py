"""`workbench circuits --transcoders RUN ... --prompt TEXT`: the attribution graph of a prompt
through one transcoder per layer of the session's tiny GPT-2, saved where circuits go (with the
config that reruns it), its strongest nodes printed; and the one-line refusals (not a transcoder,
a hook that is no MLP input, two for one layer, a --target of several tokens, a model that is not
GPT-2-architecture, no --prompt)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_cli import run_cli

PROMPT = "ROMEO: I will tell the"


def save_transcoder(folder: Path, layer: int, model: str, seed: int = 0, d_model: int = 64, **fields) -> Path:
    """A small TopK transcoder of `layer`'s MLP (untrained: the graph's error nodes carry the rest)."""
    from sae.base import create
    from sae.config import DictionaryConfig
    from sae.io import save

    config = DictionaryConfig(architecture="topk", d_in=d_model, n_latents=32, k=4, d_out=d_model)
    hooks = {"hook": f"blocks.{layer}.ln2.hook_normalized", "out_hook": f"blocks.{layer}.hook_mlp_out"}
    return save(create(config, seed=seed + layer), folder, model=model, **{**hooks, **fields})


@pytest.fixture
def transcoders(tiny_model_dir, tmp_path) -> Path:
    """tmp_path/tc holding l0/topk and l1/topk: one training run per layer of the tiny model, as
    `workbench train --transcoder-layers` lays them out."""
    for layer in range(2):
        save_transcoder(tmp_path / "tc" / f"l{layer}" / "topk", layer, str(tiny_model_dir))
    return tmp_path / "tc"


def test_a_graph_is_written_where_circuits_go_and_reruns_from_its_config(
    capsys, tiny_model, transcoders, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    target = " the"
    (target_id,) = tiny_model.tokenizer.encode(target, add_special_tokens=False)
    code, out, err = run_cli(
        capsys, "circuits", "--transcoders", "tc", "--prompt", PROMPT, "--target", target, "--json"
    )
    assert code == 0, err
    summary = json.loads(out)
    path = Path(summary["graph"])
    assert path.parent == Path("runs/circuits") and path.name.startswith(
        f"{Path(tiny_model.spec).name}-graph-"
    )
    graph = json.loads(path.read_text())
    assert graph["kind"] == "attribution-graph" and graph["prompt"] == PROMPT
    assert [t["token"] for t in graph["targets"]] == [target_id]
    assert [(t["layer"], t["hook"], t["out_hook"], t["store"]) for t in graph["transcoders"]] == [
        (i, f"blocks.{i}.ln2.hook_normalized", f"blocks.{i}.hook_mlp_out", None) for i in range(2)
    ]
    assert graph["config"]["transcoders"] == [str((tmp_path / "tc").absolute())]
    ranked = [n["influence"] for n in summary["top_nodes"]]
    assert ranked == sorted(ranked) and 0 < len(ranked) <= 10  # the strongest (smallest cumulative) first
    assert 0 <= summary["completeness"] <= 1 and summary["seconds"] >= 0
    code, out, err = run_cli(
        capsys, "circuits", "--config", str(path), "--out", "again.circuit.json", "--json"
    )
    assert code == 0, err
    again = json.loads(Path("again.circuit.json").read_text())
    assert [n["id"] for n in again["nodes"]] == [n["id"] for n in graph["nodes"]]


def test_wrong_transcoders_and_targets_are_refused_in_one_line(
    capsys, tiny_model_dir, transcoders, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    model = str(tiny_model_dir)
    sae_folder = save_transcoder(tmp_path / "sae", 0, model)  # made an SAE of the residual below
    config = json.loads((sae_folder / "config.json").read_text())
    config["dictionary"].pop("d_out"), config.pop("out_hook")
    config["hook"] = "blocks.0.hook_resid_post"
    (sae_folder / "config.json").write_text(json.dumps(config))
    resid = save_transcoder(tmp_path / "resid", 0, model, hook="blocks.0.hook_resid_pre")
    late = save_transcoder(tmp_path / "late", 7, model)
    cases = {
        ("--transcoders", str(sae_folder)): "not a transcoder (an SAE of blocks.0.hook_resid_post",
        ("--transcoders", str(resid)): "reads 'blocks.0.hook_resid_pre', which is no MLP input",
        ("--transcoders", str(late)): "reads 'blocks.7.ln2.hook_normalized', which is no MLP input",
        ("--transcoders", "tc/l0", "tc/l0"): "two transcoders for layer 0",
        ("--transcoders", "tc", "--target", " ROMEO tell"): "tokens of",
        ("--transcoders", "gone"): "gone: no such folder",
    }
    for argv, message in cases.items():
        code, _, err = run_cli(capsys, "circuits", *argv, "--prompt", PROMPT)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    code, _, err = run_cli(capsys, "circuits", "--transcoders", "tc")
    assert code == 2 and "--prompt" in err
    monkeypatch.setattr("circuits.catalog.is_gpt2", lambda model: False)
    code, _, err = run_cli(capsys, "circuits", "--transcoders", "tc", "--prompt", PROMPT)
    assert code == 2 and "need a GPT-2-architecture model" in err and len(err.strip().splitlines()) == 1
    assert not Path("runs").exists()  # nothing written by a refusal


def test_a_demo_transcoder_is_analyzed_graphed_and_opened_from_the_graph(
    capsys, tiny_cache, tiny_run, tmp_path, monkeypatch
):
    """cache (both hooks) -> a transcoder of the demo's layer 1 MLP -> analyze (its store reads
    the input hook, writes logit effects through the output hook) -> circuits --transcoders (the
    graph names the store) -> the Circuits page: a click on a feature opens its page, which says
    what the transcoder reads and writes."""
    from sae.analyze import final_norm_map
    from sae.io import load
    from tests.test_explorer_circuits import circuits_page
    from workbench.models import load_model
    from workbench.store import FeatureStore

    monkeypatch.chdir(tmp_path)
    hooks = ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    cache = (
        "cache --model demo --corpus tiny-shakespeare --context-length 32 --tokens 1024 --out cache --quiet"
    )
    code, _, err = run_cli(capsys, *cache.split(), "--hook", hooks[0], "--hook", hooks[1])
    assert code == 0, err
    folder = save_transcoder(tmp_path / "tc1", 1, "demo", d_model=256, cache=str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "analyze", str(folder), "--cache", str(tiny_cache), "--quiet")
    assert code == 2 and f"no hook '{hooks[0]}', which this transcoder reads" in err
    code, _, err = run_cli(capsys, "analyze", str(folder), "--top", "4", "--per-bin", "2", "--quiet")
    assert code == 0, err
    store = FeatureStore(folder / "features.duckdb")
    assert (store.meta["hook"], store.meta["out_hook"], store.meta["d_out"]) == (*hooks, 256)
    assert not {"out_hook", "d_out"} & set(FeatureStore(tiny_run / "features.duckdb").meta)  # an SAE's store
    model, transcoder = load_model("demo"), load(folder)
    feature = int(store.features(limit=1).feature[0])
    centres, scale = final_norm_map(model)
    row = transcoder.W_dec[feature].detach()
    effect = ((row - row.mean()) if centres else row) * scale @ model.unembed.float()
    expected = effect.topk(5).indices.tolist()
    logits = store.feature(feature).logits
    assert logits[logits.side == "top"].token.tolist()[:5] == expected  # W_dec . W_U after the final norm
    assert store.summaries([feature])[feature]

    every = ("--node-threshold", "1", "--edge-threshold", "1")  # an untrained transcoder's features are weak
    code, out, err = run_cli(
        capsys, "circuits", "--transcoders", str(folder), "--prompt", PROMPT, *every, "--json"
    )
    assert code == 0, err
    graph_path = Path(json.loads(out)["graph"])
    graph = json.loads(graph_path.read_text())
    assert graph["transcoders"][0]["store"] == str((folder / "features.duckdb").absolute())
    node = next(n for n in graph["nodes"] if n["type"] == "feature")
    at = circuits_page(monkeypatch, [str(folder)], circuits=[str(graph_path.parent)])
    at.session_state["attribution_graph"] = {
        "selection": {"points": [{"customdata": node["id"]}], "point_indices": [0]}
    }
    at.run()
    assert not at.exception and at.title[0].value == f"Feature {node['feature']}"
    assert f"transcoder: reads {hooks[0]}, writes {hooks[1]}" in "\n".join(c.value for c in at.caption)


def test_another_models_transcoder_nan_weights_a_gated_transcoder_and_a_long_prompt(
    capsys, tiny_model_dir, transcoders, tmp_path, monkeypatch
):
    """A transcoder recorded for another model (alone or beside the right ones) and one with a NaN
    weight are refused in one line naming the folder; a prompt over the model's n_ctx (64) is
    refused rather than truncated; a gated transcoder draws its graph (its magnitude path)."""
    from safetensors.torch import load_file, save_file

    monkeypatch.chdir(tmp_path)
    model = str(tiny_model_dir)
    other = save_transcoder(tmp_path / "other", 1, "gpt2")
    nan = save_transcoder(tmp_path / "nan", 1, model)
    weights = load_file(nan / "weights.safetensors")
    weights["W_dec"][2, 3] = float("nan")
    save_file(weights, nan / "weights.safetensors", metadata={"format": "workbench", "architecture": "topk"})
    long = " ".join(["ROMEO: I will tell the king"] * 20)
    cases = {
        ("--transcoders", "tc/l0", str(other), "--prompt", PROMPT): f"({other}) was trained on model 'gpt2'",
        ("--model", model, "--transcoders", str(other), "--prompt", PROMPT): "was trained on model 'gpt2'",
        ("--transcoders", "tc/l0", str(nan), "--prompt", PROMPT): f"({nan}): W_dec (32, 64) has 1 non-finite",
        ("--transcoders", "tc", "--prompt", long): "the model's n_ctx is 64",
    }
    for argv, message in cases.items():
        code, _, err = run_cli(capsys, "circuits", *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not Path("runs").exists()
    from sae.base import create
    from sae.config import DictionaryConfig
    from sae.io import save

    gated = create(DictionaryConfig(architecture="gated", d_in=64, n_latents=32, k=4, d_out=64), seed=0)
    save(
        gated,
        tmp_path / "gated",
        model=model,
        hook="blocks.0.ln2.hook_normalized",
        out_hook="blocks.0.hook_mlp_out",
    )
    code, out, err = run_cli(
        capsys, "circuits", "--transcoders", "gated", "--prompt", PROMPT, "--out", "g.json", "--json"
    )
    assert code == 0, err
    assert json.loads(Path("g.json").read_text())["metrics"]["completeness_gap"] < 1e-3


def test_a_circuit_tracer_transcoder_set_or_one_of_its_layer_files_draws_a_graph(
    capsys, tiny_model_dir, transcoders, tmp_path, monkeypatch
):
    """circuit-tracer's per-layer files (legacy layout: W_enc [d_sae, d_model], W_dec [d_model,
    d_sae]) with their config.yaml, as `sae.peers.load_transcoder_set` reads them: --transcoders
    takes the folder, and one layer file beside one of ours; each layer's path is its file."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    folder, lines = tmp_path / "ctset", [f"model_name: {tiny_model_dir}"]
    lines += ["feature_input_hook: ln2.hook_normalized", "feature_output_hook: hook_mlp_out", "transcoders:"]
    folder.mkdir()
    for layer in range(2):
        weights = {
            "W_enc": torch.randn(48, 64, generator=gen) / 8,
            "W_dec": torch.randn(64, 48, generator=gen) / 8,
            "b_enc": torch.randn(48, generator=gen) / 4,
            "b_dec": torch.zeros(64),
        }
        save_file(weights, folder / f"layer_{layer}.safetensors")
        lines += [f"  - id: l{layer}", f"    layer: {layer}", f"    filepath: layer_{layer}.safetensors"]
    (folder / "config.yaml").write_text("\n".join(lines) + "\n")
    for argv, files in (
        (["ctset"], [folder / "layer_0.safetensors", folder / "layer_1.safetensors"]),
        (["tc/l0", "ctset/layer_1.safetensors"], [None, Path("ctset/layer_1.safetensors")]),
    ):
        code, _, err = run_cli(
            capsys, "circuits", "--transcoders", *argv, "--prompt", PROMPT, "--out", "g.json", "--json"
        )
        assert code == 0, err
        graph = json.loads(Path("g.json").read_text())
        assert [t["layer"] for t in graph["transcoders"]] == [0, 1] and graph["metrics"][
            "completeness_gap"
        ] < 1e-3
        assert [Path(t["path"]) for t in graph["transcoders"]][1] == files[1].absolute()
        assert files[0] is None or Path(graph["transcoders"][0]["path"]) == files[0].absolute()


def test_a_cross_layer_transcoder_is_refused_in_one_line(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """A CLT folder (here two per-layer transcoders as a CLT of reach 1) is named as such, not
    'not a transcoder (an SAE of ?)'."""
    from sae import crosslayer
    from sae.io import load

    monkeypatch.chdir(tmp_path)
    per_layer = [load(save_transcoder(tmp_path / f"l{i}", i, str(tiny_model_dir))) for i in range(2)]
    crosslayer.save(crosslayer.from_per_layer(per_layer), tmp_path / "clt", model=str(tiny_model_dir))
    code, _, err = run_cli(capsys, "circuits", "--transcoders", "clt", "--prompt", PROMPT)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "a cross-layer transcoder; an attribution graph takes per-layer transcoders" in err


def test_the_same_prompt_through_other_transcoders_is_another_default_file(tmp_path):
    """The default graph file hashed only the prompt and target, so tracing the same prompt
    through other transcoders overwrote the first graph silently."""
    from app.commands.circuits import default_graph_path

    first = default_graph_path("demo", "To be, or not to", " be", [str(tmp_path / "tc")])
    again = default_graph_path("demo", "To be, or not to", " be", [str(tmp_path / "tc")])
    other = default_graph_path("demo", "To be, or not to", " be", [str(tmp_path / "tcskip")])
    assert first == again and first != other and first.name.startswith("demo-graph-to-be-or-not-to-")
