"""Per-token probing tasks on the built-in corpus (Shakespeare's plays and the KJV).

A task labels every token of every window from the decoded token strings alone, so labels
come from the text, never from the model. Position 0 (BOS) is never labelled positive.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import Tensor

_SPEAKER_LINE = re.compile(r"^[A-Z][A-Z '.-]*:$")


def _lines(strings: list[str]) -> list[str]:
    """The stripped text of the line each token belongs to (a newline token ends its line)."""
    owners, lines, current, members = [], [], "", []
    for i, piece in enumerate(strings):
        for part_index, part in enumerate(piece.split("\n")):
            if part_index > 0:
                lines.append(current)
                owners.extend([len(lines) - 1] * len(members))
                current, members = "", []
            current += part
        members.append(i)
    lines.append(current)
    owners.extend([len(lines) - 1] * len(members))
    return [lines[o].strip() for o in owners]


def speaker_name(strings: list[str]) -> list[bool]:
    """The token is a letter-bearing part of a speaker's name line ("BENEDICK:")."""
    return [
        bool(_SPEAKER_LINE.match(line)) and any(c.isalpha() for c in s)
        for s, line in zip(strings, _lines(strings))
    ]


def line_start(strings: list[str]) -> list[bool]:
    """The token begins a line of text (the previous token ends with a newline)."""
    return [i > 0 and strings[i - 1].endswith("\n") and s.strip() != "" for i, s in enumerate(strings)]


def word_continuation(strings: list[str]) -> list[bool]:
    """The token continues a word: it starts with a letter and the previous token ends with one."""
    return [i > 0 and s[:1].isalpha() and strings[i - 1][-1:].isalpha() for i, s in enumerate(strings)]


def verse_reference(strings: list[str]) -> list[bool]:
    """The token is part of a KJV chapter:verse reference (it holds a digit)."""
    return [any(c.isdigit() for c in s) for s in strings]


TASKS: dict[str, Callable[[list[str]], list[bool]]] = {
    "speaker_name": speaker_name,
    "line_start": line_start,
    "word_continuation": word_continuation,
    "verse_reference": verse_reference,
}


def task_labels(task: str, windows: Tensor, decode_token: Callable[[int], str]) -> Tensor:
    """bool [n_windows, context]: the task's label of every token (False at BOS)."""
    label = TASKS[task]
    cache: dict[int, str] = {}
    rows = []
    for window in windows.tolist():
        strings = [cache.setdefault(t, decode_token(t)) for t in window]
        strings[0] = ""  # BOS
        rows.append(label(strings))
    labels = torch.tensor(rows, dtype=torch.bool)
    labels[:, 0] = False
    return labels
