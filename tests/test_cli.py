"""The `workbench` command: help everywhere, one-line errors, nothing half-written, --config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main

WORKBENCH = shutil.which("workbench") or str(Path(sys.executable).parent / "workbench")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse usage errors and --help
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["cache"],
        ["models"],
        ["demo-model", "train"],
        ["bench", "cache"],
        ["train"],
        ["eval"],
        ["probe"],
        ["codebook-finetune"],
        ["bench", "sae"],
        ["bench", "codebook"],
        ["analyze"],
        ["explore"],
        ["bench", "analyze"],
        ["circuits"],
    ],
)
def test_help_everywhere(capsys, argv):
    code, out, _ = run_cli(capsys, *argv, "--help")
    assert code == 0 and "usage: workbench" in out


def test_console_script_is_installed():
    result = subprocess.run([WORKBENCH, "corpora"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "tiny-shakespeare" in result.stdout


def test_models_lists_builtins_and_hooks(capsys, tiny_model_dir):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "demo" in out and "gemma-3-270m" in out and "minilm" in out
    code, out, _ = run_cli(capsys, "models", "--model", str(tiny_model_dir), "--json")
    listing = json.loads(out)
    assert (
        listing["hooks"]["blocks.1.hook_resid_post"] == 64
        and listing["hooks"]["blocks.0.mlp.hook_post"] == 256
    )


def bad_cache_flags(tiny_model_dir, out):
    common = [
        "--model",
        str(tiny_model_dir),
        "--corpus",
        "tiny-shakespeare",
        "--out",
        str(out),
        "--quiet",
        "--context-length",
        "32",
    ]
    return {
        "unknown hook": (
            common + ["--hook", "blocks.0.hook_resid_pots"],
            "close matches: blocks.0.hook_resid_post",
        ),
        "unknown model": (
            ["--model", "no/such-model", "--out", str(out)],
            "cannot load model 'no/such-model'",
        ),
        "bad dtype": (common + ["--dtype", "int8"], "unknown dtype"),
        "bad number": (common + ["--tokens", "lots"], "invalid int value"),
        "unknown corpus": (common + ["--corpus", "no-such-corpus"], "neither a built-in corpus"),
        "too long context": (common + ["--context-length", "1000"], "exceeds model"),
        "empty corpus": (common + ["--corpus", "EMPTY"], "fewer than one window"),
    }


@pytest.mark.parametrize("case", list(bad_cache_flags(Path("m"), Path("o"))))
def test_bad_input_is_one_line_and_writes_nothing(capsys, tiny_model_dir, tmp_path, case):
    (tmp_path / "empty.txt").write_text("")
    argv, expected = bad_cache_flags(tiny_model_dir, tmp_path / "out")[case]
    argv = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in argv]
    code, out, err = run_cli(capsys, "cache", *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cache_then_reproduce_from_its_saved_config(capsys, tiny_model_dir, tmp_path):
    first = tmp_path / "first"
    code, out, _ = run_cli(
        capsys,
        "cache",
        "--model",
        str(tiny_model_dir),
        "--corpus",
        "tiny-shakespeare",
        "--tokens",
        "2000",
        "--context-length",
        "32",
        "--out",
        str(first),
        "--quiet",
        "--json",
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["tokens"] == 2016 and summary["hooks"] == {"blocks.0.hook_resid_post": 64}
    second = tmp_path / "second"
    code, _, _ = run_cli(
        capsys, "cache", "--config", str(first / "manifest.json"), "--out", str(second), "--quiet"
    )
    assert code == 0
    assert (first / "manifest.json").read_text() == (second / "manifest.json").read_text()


def test_config_file_with_unknown_field_is_refused(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": "demo", "hokks": ["x"]}))
    code, _, err = run_cli(capsys, "cache", "--config", str(config))
    assert code == 2 and "unknown CacheConfig field(s): hokks" in err
    config.write_text(json.dumps({"tokens": "many"}))
    code, _, err = run_cli(capsys, "cache", "--config", str(config))
    assert code == 2 and "field 'tokens'" in err


def test_default_hook_is_the_middle_residual_stream(tiny_model):
    assert tiny_model.default_hook == "blocks.0.hook_resid_post"


def test_default_context_fits_the_model(capsys, tiny_model_dir, tmp_path):
    code, out, _ = run_cli(
        capsys,
        "cache",
        "--model",
        str(tiny_model_dir),
        "--corpus",
        "tiny-shakespeare",
        "--tokens",
        "640",
        "--out",
        str(tmp_path / "c"),
        "--quiet",
        "--json",
    )
    assert code == 0 and json.loads(out)["context_length"] == 64  # the tiny model's n_ctx


def test_tuple_flags_take_their_singular_as_an_alias(capsys):
    """`--prefixes` -> `--prefix` (not `--prefixe`); `--hooks` -> `--hook`."""
    from app.flags import _singular

    names = ("hooks", "prefixes", "batches", "k", "n_latents")
    assert [_singular(n) for n in names] == ["hook", "prefix", "batch", "k", "n_latents"]
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0 and "--prefix PREFIX" in out and "PREFIXE" not in out
    code, out, _ = run_cli(capsys, "bench", "kernels", "--help")
    assert code == 0 and "--n-latents N_LATENTS" in out and "--n-latent " not in out


@pytest.mark.parametrize(
    "argv, new",
    [(["train", "--latents", "96"], "--n-latents"), (["bench", "sae", "--features", "64"], "--n-planted")],
)
def test_a_renamed_flag_is_told_its_new_name(capsys, argv, new):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and f"is now {new}" in err
