"""Corpora: built-in texts, local files, HF datasets, windows and the train/validation split."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import need
from workbench.corpus import (
    BLOCK_WINDOWS,
    BUILTIN_CORPORA,
    Document,
    iter_documents,
    play_markdown_to_text,
    token_windows,
    validation_mask,
)
from workbench.errors import CorpusError


class CharTokenizer:
    """One token per character (id = code point % 1000 + 2): enough to check the windowing."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 1000 + 2 for c in text] for text in texts]}


def test_builtin_corpora_are_the_promised_texts():
    sizes = {name: sum(len(d.text) for d in iter_documents(name)) for name in BUILTIN_CORPORA}
    assert 1_000_000 < sizes["tiny-shakespeare"] < 1_200_000
    assert 4_500_000 < sizes["shakespeare"] < 6_000_000
    assert 3_500_000 < sizes["kjv"] < 4_500_000
    assert sizes["default"] == sizes["shakespeare"] + sizes["kjv"]
    plays = [d.name for d in iter_documents("shakespeare")]
    assert len(plays) == 38 and "shakespeare/hamlet" in plays
    genesis = next(iter_documents("kjv"))
    assert (
        genesis.name == "kjv/Genesis"
        and "1:1 In the beginning God created the heaven and the earth." in genesis.text
    )


def test_play_markdown_becomes_speaker_lines():
    markdown = (
        "# Othello\n\n## ACT I\n\n_Enter RODERIGO_\n\n"
        "**RODERIGO**  \nTush! never tell me;  \n__\\[Aside]_  \nI\\--no\n"
    )
    text = play_markdown_to_text(markdown)
    assert text == "Othello\n\nACT I\n\nEnter RODERIGO\n\nRODERIGO:\nTush! never tell me;\n[Aside]\nI--no\n"


def test_windows_start_with_bos_and_join_documents_with_the_separator():
    docs = [Document("a", "abcdefg"), Document("b", "hijklmnopq")]
    windows = token_windows(
        docs, CharTokenizer(), context_length=5, bos_id=0, separator_ids=[1], validation_fraction=0.0
    )
    stream = [ord(c) % 1000 + 2 for c in "abcdefg"] + [1] + [ord(c) % 1000 + 2 for c in "hijklmnopq"] + [1]
    assert windows.tokens.shape == (len(stream) // 4, 5)
    assert (windows.tokens[:, 0] == 0).all()
    assert windows.tokens[:, 1:].reshape(-1).tolist() == stream[: windows.tokens.shape[0] * 4]


def test_split_is_deterministic_disjoint_and_spread():
    mask = validation_mask(10_000, 0.02)
    assert torch.equal(mask, validation_mask(10_000, 0.02))
    assert 0.015 < mask.float().mean() < 0.025
    held_out_blocks = (mask.nonzero().squeeze(1) // BLOCK_WINDOWS).unique()
    assert held_out_blocks.min() < 100 and held_out_blocks.max() > 10_000 // BLOCK_WINDOWS - 100
    windows = token_windows(
        [Document("a", "x" * 5000)], CharTokenizer(), 8, bos_id=0, validation_fraction=0.1
    )
    train, validation = windows.split("train"), windows.split("validation")
    assert len(set(train.tolist()) & set(validation.tolist())) == 0
    assert len(train) + len(validation) == len(windows.tokens)


def test_local_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n"
    )
    texts = [d.text for d in iter_documents(str(tmp_path))]
    assert texts == ["plain text file", "first", "second"]


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"no_text": 1}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        list(iter_documents(str(bad)))
    with pytest.raises(CorpusError, match="neither a built-in corpus"):
        list(iter_documents("no-such-corpus"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt or .jsonl"):
        list(iter_documents(str(tmp_path / "empty")))
    with pytest.raises(CorpusError, match="fewer than one window"):
        token_windows([Document("short", "abc")], CharTokenizer(), 128, bos_id=0)
    with pytest.raises(CorpusError, match="fewer than one window"):
        token_windows([], CharTokenizer(), 128, bos_id=0)


def test_max_windows_stops_reading_early():
    read = []

    def documents():
        for i in range(1000):
            read.append(i)
            yield Document(str(i), "y" * 100)

    windows = token_windows(
        documents(), CharTokenizer(), 11, bos_id=0, max_windows=30, validation_fraction=0.0
    )
    assert windows.tokens.shape == (30, 11)
    assert len(read) < 1000


def test_hf_dataset_by_name(tmp_path):
    need("datasets", "dev")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5)))
    texts = [d.text for d in iter_documents(f"hf:{folder}")]
    assert texts == [f"line {i}" for i in range(5)]
    with pytest.raises(CorpusError, match="cannot load HF dataset"):
        list(iter_documents(f"hf:{tmp_path / 'missing'}"))
