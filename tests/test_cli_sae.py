"""`workbench train`, `workbench eval` and `workbench bench sae` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    from workbench.activations import CacheConfig, build_cache

    out = tmp_path_factory.mktemp("cli-sae") / "cache"
    build_cache(
        CacheConfig(
            model=str(tiny_model_dir),
            corpus="tiny-shakespeare",
            tokens=16_384,
            context_length=32,
            out=str(out),
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-sae") / "run"
    from app.cli import main

    assert (
        main(
            [
                "train",
                "--cache",
                str(cache),
                "--arch",
                "topk,jumprelu",
                "--k",
                "4",
                "--expansion",
                "2",
                "--batch-size",
                "512",
                "--out",
                str(out),
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    return out


def test_train_prints_one_row_per_dictionary_and_saves_a_reproducible_config(
    capsys, cache, trained, tmp_path
):
    assert json.loads((trained / "train-config.json").read_text())["architectures"] == ["topk", "jumprelu"]
    folders = sorted(p.name for p in trained.iterdir() if (p / "config.json").exists())
    assert folders == ["jumprelu-k4-x2", "topk-k4-x2"]
    meta = json.loads((trained / "topk-k4-x2" / "config.json").read_text())
    assert meta["dictionary"]["n_latents"] == 128 and meta["hook"] == "blocks.0.hook_resid_post"
    assert 0 < meta["metrics"]["fvu"] < 1
    code, out, _ = run_cli(
        capsys,
        "train",
        "--config",
        str(trained / "topk-k4-x2" / "config.json"),
        "--out",
        str(tmp_path / "again"),
        "--quiet",
        "--json",
    )
    assert code == 0
    again = json.loads(out.splitlines()[0])
    assert again["dictionary"] == "topk-k4-x2" and again["fvu"] == round(meta["metrics"]["fvu"], 4)


def test_train_reads_a_format_version_1_config_and_the_dictionary_flags(capsys, cache, tmp_path):
    """A flat (format_version 1) train-config.json still reruns; the dictionary's coefficients come
    from it, and every DictionaryConfig field but the grid's is a flag, including four that had none."""
    fixture = Path(__file__).parent / "fixtures" / "train-config-v1.json"
    code, _, _ = run_cli(
        capsys,
        "train",
        "--config",
        str(fixture),
        "--cache",
        str(cache),
        "--arch",
        "topk",
        "--tokens",
        "2048",
        "--aux-k",
        "12",
        "--l1-warmup-fraction",
        "0.1",
        "--threshold-momentum",
        "0.02",
        "--aggregate",
        "mean",
        "--out",
        str(tmp_path),
        "--quiet",
        "--json",
    )
    assert code == 0
    dictionary = json.loads((tmp_path / "topk-k8-x2" / "config.json").read_text())["dictionary"]
    assert {k: dictionary[k] for k in ("aux_k", "l1_warmup_fraction", "threshold_momentum", "aggregate")} == {
        "aux_k": 12,
        "l1_warmup_fraction": 0.1,
        "threshold_momentum": 0.02,
        "aggregate": "mean",
    }  # flags
    assert {k: dictionary[k] for k in ("metric", "target_l0", "bandwidth", "prefixes", "aux_zipf")} == {
        "metric": "dot",
        "target_l0": 6.0,
        "bandwidth": 0.1,
        "prefixes": [0.25, 0.5, 1.0],
        "aux_zipf": False,
    }  # the file
    saved = json.loads((tmp_path / "train-config.json").read_text())
    assert saved["format_version"] == 3 and saved["dictionary"]["aux_k"] == 12 and "aux_k" not in saved


def test_train_reads_a_format_version_2_config_under_the_renamed_flags(capsys, cache, tmp_path):
    """A train-config.json written before `arch` and `latents` became `architectures` and
    `n_latents` (issue 18) still reruns; `--arch` is still the flag, `--n-latents` the width's."""
    fixture = Path(__file__).parent / "fixtures" / "train-config-v2.json"
    code, _, _ = run_cli(
        capsys,
        "train",
        "--config",
        str(fixture),
        "--cache",
        str(cache),
        "--arch",
        "topk",
        "--tokens",
        "2048",
        "--n-latents",
        "48",
        "--out",
        str(tmp_path),
        "--quiet",
        "--json",
    )
    assert code == 0
    saved = json.loads((tmp_path / "train-config.json").read_text())
    assert saved["format_version"] == 3 and saved["architectures"] == ["topk"] and saved["n_latents"] == 48
    assert saved["lr"] == 3e-4 and saved["dictionary"]["aux_k"] == 16  # from the file
    assert json.loads((tmp_path / "topk-k8-m48" / "config.json").read_text())["dictionary"]["n_latents"] == 48


@pytest.mark.parametrize(
    "saved, expected",
    [
        ({"format_version": 2, "dictionary": {"k": 4}}, "unknown DictionaryConfig field(s): k"),
        ({"format_version": 2, "dictionary": {"aux_k": "4"}}, "field 'aux_k' must be <class 'int'>"),
        ({"format_version": 4}, "unknown train config format_version 4"),
    ],
)
def test_bad_train_config_files_are_one_line(capsys, tmp_path, saved, expected):
    (tmp_path / "c.json").write_text(json.dumps(saved))
    code, _, err = run_cli(
        capsys, "train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "o"), "--quiet"
    )
    assert code == 2 and err.count("\n") == 1 and expected in err


def test_eval_json_has_the_promised_fields(capsys, trained):
    code, out, _ = run_cli(
        capsys, "eval", str(trained / "topk-k4-x2"), "--tokens", "1024", "--quiet", "--json"
    )
    assert code == 0
    metrics = json.loads(out)
    assert {"fvu", "mse", "l0", "dead_fraction", "ce_loss_score", "kl_score"} <= set(metrics)
    assert metrics["l0"] == pytest.approx(4.0) and 0 < metrics["fvu"] < 1
    assert json.loads((trained / "topk-k4-x2" / "eval.json").read_text())["fvu"] == metrics["fvu"]


def test_eval_of_a_run_folder_covers_each_dictionary(capsys, trained):
    code, out, _ = run_cli(capsys, "eval", str(trained), "--tokens", "512", "--quiet", "--json")
    assert code == 0
    assert [json.loads(line)["dictionary"].rsplit("/", 1)[-1] for line in out.splitlines()] == [
        "jumprelu-k4-x2",
        "topk-k4-x2",
    ]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--arch", "topkk"], "unknown architecture 'topkk'"),
        (["train", "--k", "4,x"], "invalid int list"),
        (["eval", "/no/such/run"], "no trained dictionary here"),
        (["bench", "sae", "--arch", "nope"], "unknown architecture 'nope'"),
    ],
)
def test_bad_input_is_one_line(capsys, cache, tmp_path, argv, expected):
    if argv[0] == "train":
        argv = argv + ["--cache", str(cache), "--out", str(tmp_path / "o"), "--quiet"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and expected in err


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--arch", "codebook", "--aggregate", "max"], "aggregate sum or mean, got 'cosine' and 'max'"),
        (["--arch", "relu", "--metric", "euclid"], "metric must be cosine or dot"),
        (["--arch", "relu", "--l1-coef", "nan"], "l1_coef must be finite, got nan"),
        (["--l1-warmup-fraction", "2"], "l1_warmup_fraction must be in [0, 1], got 2.0"),
        (["--threshold-momentum", "0"], "threshold_momentum must be in (0, 1], got 0.0"),
        (["--controller-rate", "-1"], "controller_rate must be >= 0, got -1.0"),
    ],
)
def test_bad_dictionary_flags_name_the_field_and_leave_no_folder(capsys, cache, tmp_path, flags, expected):
    """Checked when the config is built, before anything is written: a codebook --aggregate
    max used to leave a train-config.json that refused the corrected command, and a NaN
    l1_coef trained to 'loss is nan at step 0'."""
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "train", "--cache", str(cache), "--out", str(out), "--quiet", *flags)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_train_config_takes_a_single_architecture_or_k_from_python():
    from sae.train_config import TrainConfig

    config = TrainConfig(architectures="topk", k=8, expansion=2)
    assert config.grid() == [("topk", 8, 2)]


def test_bench_sae_reports_recovery_per_seed_and_the_worst_seed(capsys):
    code, out, _ = run_cli(
        capsys,
        "bench",
        "sae",
        "--arch",
        "topk,matryoshka",
        "--scenario",
        "hierarchy",
        "--seeds",
        "0,1",
        "--samples",
        "40000",
        "--n-planted",
        "32",
        "--d-in",
        "16",
        "--json",
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    runs, summary = [r for r in rows if r["seed"] != "all"], [r for r in rows if r["seed"] == "all"]
    assert [(r["seed"], r["arch"]) for r in runs] == [
        (0, "topk"),
        (0, "matryoshka"),
        (1, "topk"),
        (1, "matryoshka"),
    ]
    for r in runs:
        assert (
            0 < r["mcc"] <= r["mmcs"] <= 1
            and r["latents"] == 32
            and 0 <= r.get("absorption", 0) <= 1
            and r["dead"] >= 0
        )
    for s in summary:
        group = [r for r in runs if r["arch"] == s["arch"]]
        assert s["mcc_worst"] == min(r["mcc"] for r in group) and s["seeds"] == 2
        assert s["mcc"] == pytest.approx(sum(r["mcc"] for r in group) / 2, abs=1e-4)
        assert ("absorption" in s) == all("absorption" in r for r in group)


def test_probe_on_neurons_and_on_latents(capsys, cache, trained, tmp_path):
    code, out, _ = run_cli(
        capsys,
        "probe",
        "--cache",
        str(cache),
        "--task",
        "line_start,word_continuation",
        "--k",
        "1,4",
        "--tokens",
        "8192",
        "--out",
        str(tmp_path / "n.json"),
        "--json",
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["task"], r["k"]) for r in rows] == [
        ("line_start", 1),
        ("line_start", 4),
        ("word_continuation", 1),
        ("word_continuation", 4),
    ]
    assert all(
        {"task", "features", "k", "accuracy", "f1"} <= set(r) and 0 <= r["accuracy"] <= 1 for r in rows
    )
    assert json.loads((tmp_path / "n.json").read_text())["rows"] == rows
    code, out, _ = run_cli(
        capsys,
        "probe",
        "--cache",
        str(cache),
        "--task",
        "line_start",
        "--k",
        "2",
        "--tokens",
        "8192",
        "--on",
        str(trained / "topk-k4-x2"),
        "--out",
        str(tmp_path / "l.json"),
        "--json",
    )
    assert code == 0 and json.loads(out)["features"].endswith("topk-k4-x2")


def test_probe_refuses_unknown_tasks(capsys, cache):
    code, _, err = run_cli(capsys, "probe", "--cache", str(cache), "--task", "nope")
    assert code == 2 and "unknown probing task 'nope'" in err and err.count("\n") == 1


def test_codebook_finetune_saves_a_loadable_codebook_trained_in_the_model(capsys, tiny_model_dir, tmp_path):
    code, out, _ = run_cli(
        capsys,
        "codebook-finetune",
        "--model",
        str(tiny_model_dir),
        "--corpus",
        "tiny-shakespeare",
        "--codes",
        "32",
        "--k",
        "2",
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--context-length",
        "32",
        "--out",
        str(tmp_path / "cb"),
        "--quiet",
        "--json",
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["lm_loss_with_codebook"] > 0 and summary["lm_loss_clean"] > 0
    from sae import io

    codebook = io.load(tmp_path / "cb")
    assert (
        codebook.architecture == "codebook" and codebook.n_latents == 32 and codebook.meta["trained_in_model"]
    )
    code, out, _ = run_cli(capsys, "eval", str(tmp_path / "cb"), "--tokens", "512", "--quiet", "--json")
    assert code == 0 and json.loads(out)["l0"] == pytest.approx(2.0)


@pytest.mark.parametrize("kind", ["token_labels", "window_labels"])
def test_probe_on_your_own_labels(capsys, cache, tmp_path, kind):
    from workbench.cache_reader import ActivationCache

    tokens = ActivationCache(cache).tokens[:64]
    if kind == "token_labels":  # planted: the label is "the token id is even"
        labels = (tokens % 2 == 0).long().tolist()
    else:  # per window: does the window hold a newline-ish frequent token? any deterministic 0/1
        labels = [int(i % 2) for i in range(64)]
    (tmp_path / "labels.json").write_text(json.dumps({"task": "mine", kind: labels}))
    code, out, _ = run_cli(
        capsys,
        "probe",
        "--cache",
        str(cache),
        "--labels",
        str(tmp_path / "labels.json"),
        "--k",
        "1,8",
        "--tokens",
        str(64 * 32),
        "--out",
        str(tmp_path / "p.json"),
        "--json",
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["task"] for r in rows] == ["mine", "mine"] and [r["k"] for r in rows] == [1, 8]
    if kind == "window_labels":
        assert rows[0]["tokens_test"] == int(64 * 0.2)  # one row per held-out window


def test_bad_label_files_are_one_line_errors(capsys, cache, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"task": "x", "token_labels": [[0, 2, 1]]}))
    code, _, err = run_cli(capsys, "probe", "--cache", str(cache), "--labels", str(tmp_path / "bad.json"))
    assert (
        code == 2 and "token_labels must be one list of 32 labels per window" in err and err.count("\n") == 1
    )


def test_codebook_finetune_with_unfrozen_weights_saves_the_model_it_needs(capsys, tiny_model_dir, tmp_path):
    code, _, _ = run_cli(
        capsys,
        "codebook-finetune",
        "--model",
        str(tiny_model_dir),
        "--corpus",
        "tiny-shakespeare",
        "--codes",
        "32",
        "--k",
        "2",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--context-length",
        "32",
        "--unfreeze",
        "--out",
        str(tmp_path / "cb"),
        "--quiet",
    )
    assert code == 0
    from safetensors.torch import load_file

    from sae import io

    codebook = io.load(tmp_path / "cb")
    assert codebook.meta["model"] == str((tmp_path / "cb" / "model").resolve())
    tuned, original = (
        load_file(tmp_path / "cb" / "model" / "model.safetensors"),
        load_file(tiny_model_dir / "model.safetensors"),
    )
    changed = [name for name in original if name in tuned and not torch.equal(original[name], tuned[name])]
    assert changed  # the weights did train
    code, _, _ = run_cli(capsys, "eval", str(tmp_path / "cb"), "--tokens", "256", "--quiet", "--json")
    assert code == 0


def train_command(cache, out) -> list[str]:
    import sys

    return [
        sys.executable,
        "-m",
        "app.cli",
        "train",
        "--cache",
        str(cache),
        "--arch",
        "topk,jumprelu",
        "--k",
        "8",
        "--expansion",
        "16",
        "--batch-size",
        "64",
        "--checkpoint-every",
        "10",
        "--out",
        str(out),
        "--quiet",
    ]


def checkpoint_step(out) -> int:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    import subprocess

    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("cli-sae") / "whole"
    subprocess.run(train_command(cache, out), check=True, timeout=300)
    return {
        name: load_file(out / name / "weights.safetensors") for name in ("topk-k8-x16", "jumprelu-k8-x16")
    }


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkilled_train_resumes_to_identical_weights(cache, tmp_path, uninterrupted, seed):
    """A `workbench train` killed with SIGKILL at a random point (a random checkpoint, then a random
    delay, so some kills land mid-step or mid-write) and rerun ends bit-identical to an uninterrupted run."""
    import random
    import subprocess
    import time

    from safetensors.torch import load_file

    from tests.conftest import run_and_kill

    rng = random.Random(seed)
    target, delay = (
        rng.randrange(0, 200),
        rng.uniform(0, 0.1),
    )  # of 256 steps, ~8 ms each: well before the end
    reached: list[float] = []

    def ready() -> bool:
        if not reached and checkpoint_step(tmp_path / "killed") >= target:
            reached.append(time.time())
        return bool(reached) and time.time() - reached[0] >= delay

    run_and_kill(train_command(cache, tmp_path / "killed"), ready)
    assert not (tmp_path / "killed" / "jumprelu-k8-x16" / "config.json").exists(), (
        "killed too late: the run had finished"
    )
    subprocess.run(train_command(cache, tmp_path / "killed"), check=True, timeout=300)
    for name, whole in uninterrupted.items():
        resumed = load_file(tmp_path / "killed" / name / "weights.safetensors")
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), (name, target, delay)


@pytest.mark.parametrize("errno, message", [(28, "No space left on device"), (30, "Read-only file system")])
def test_train_into_a_full_or_read_only_disk_is_one_line_and_leaves_nothing_complete(
    capsys, cache, tmp_path, monkeypatch, errno, message
):
    """Every write fails (as root, chmod cannot make a folder read-only, so the OS error is injected
    where our atomic writer syncs): one line, exit 2, no dictionary folder that looks finished."""
    import workbench.files as files

    def failing_fsync(fd):
        raise OSError(errno, message)

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "train",
        "--cache",
        str(cache),
        "--k",
        "4",
        "--expansion",
        "2",
        "--batch-size",
        "512",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 2 and err.count("\n") == 1 and message in err
    assert (
        not list(out.rglob("config.json"))
        and not list(out.rglob("weights.safetensors"))
        and not list(out.rglob("*.tmp"))
    )


def test_train_with_approx_topk_matches_exact_training(capsys, cache, tmp_path):
    """--approx-topk changes only how candidates are found: the run records it, and its FVU
    lands where exact TopK's does (int8 candidates, re-ranked on exact pre-activations)."""
    rows = {}
    for flag in ("--no-approx-topk", "--approx-topk"):
        code, out, _ = run_cli(
            capsys,
            "train",
            "--cache",
            str(cache),
            "--k",
            "4",
            "--expansion",
            "2",
            "--batch-size",
            "512",
            flag,
            "--out",
            str(tmp_path / flag),
            "--quiet",
            "--json",
        )
        assert code == 0
        rows[flag] = json.loads(out.splitlines()[0])
    meta = json.loads((tmp_path / "--approx-topk" / "topk-k4-x2" / "config.json").read_text())
    assert meta["dictionary"]["approx_topk"] is True
    assert rows["--approx-topk"]["fvu"] == pytest.approx(rows["--no-approx-topk"]["fvu"], rel=0.05)
