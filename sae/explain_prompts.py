"""Prompts of the explainer and the detection scorer, the parsing of their replies, and the scores.

After EleutherAI's delphi (Paulo et al. 2024, "Automatically interpreting millions of features in
large language models"), which follows Bills et al. 2023 ("Language models can explain neurons
in language models"): the explainer reads activating contexts with the firing tokens marked
`<<like this>>` and ends its reply with `[EXPLANATION]: ...`; the scorer reads an explanation
and numbered, unmarked contexts and answers a list of 0/1, one per context ("detection").
`PROMPT_VERSION` is recorded with every explanation; change it when a prompt changes.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

PROMPT_VERSION = "detection-v1"

EXPLAINER_SYSTEM = (
    "You are a meticulous interpretability researcher studying a feature of a language model. "
    "You will be shown text examples on which the feature fires. In each example, the tokens "
    "where it fires are marked between delimiters <<like this>> (a marked run may span several "
    "tokens); '\\n' stands for a line break. Find what the marked tokens have in common, taking "
    "the surrounding context into account (which words precede them, what kind of text it is). "
    "Write one concise explanation, a phrase or a short sentence, that would let someone predict "
    "where the feature fires. Do not mention the marker syntax. The last line of your reply must "
    "be the explanation, formatted as: [EXPLANATION]: <your explanation>"
)

SCORER_SYSTEM = (
    "You are a careful linguistics researcher. You will be given an explanation of a feature of "
    "a language model, for example 'male pronouns' or 'the word after a speaker's name', and "
    "several numbered text examples ('\\n' stands for a line break). For each example in turn, "
    "answer 1 if the feature described by the explanation is present in it, else 0. Reply with "
    "a JSON list of 0s and 1s, one per example and in order, e.g. [1, 0, 0], and nothing else."
)


def render_context(texts: Sequence[str], activations: Sequence[float] | None = None) -> str:
    """Token texts joined into one line, line breaks shown as '\\n'; with `activations`, each
    run of consecutive tokens where the feature is above 0 is wrapped in << >>."""
    out, open_ = [], False
    for i, text in enumerate(texts):
        firing = activations is not None and activations[i] > 0
        if firing and not open_:
            out.append("<<")
        elif open_ and not firing:
            out.append(">>")
        open_ = firing
        out.append(text.replace("\r", "\\r").replace("\n", "\\n"))
    if open_:
        out.append(">>")
    return "".join(out)


def explainer_messages(examples: Sequence[str]) -> list[dict]:
    """The chat messages asking for an explanation of the rendered `examples`."""
    listing = "\n".join(f"Example {i + 1}: {text}" for i, text in enumerate(examples))
    return [
        {"role": "system", "content": EXPLAINER_SYSTEM},
        {"role": "user", "content": f"{listing}\n\nWhat does this feature detect?"},
    ]


def scorer_messages(explanation: str, contexts: Sequence[str]) -> list[dict]:
    """The chat messages asking which of the rendered `contexts` (0-based numbers) have the feature."""
    listing = "\n".join(f"Example {i}: {text}" for i, text in enumerate(contexts))
    return [
        {"role": "system", "content": SCORER_SYSTEM},
        {
            "role": "user",
            "content": f"Explanation: {explanation}\n\n{listing}\n\n"
            f"Answer with a JSON list of exactly {len(contexts)} numbers (0 or 1).",
        },
    ]


_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def parse_explanation(reply: str) -> str:
    """The explanation in a reply: the text after the last '[EXPLANATION]:' (reasoning in
    <think> blocks dropped), else the reply's last non-empty line; bold marks and quotes
    around the whole trimmed.
    "" when the reply holds no text."""
    text = _THINKING.sub("", reply)
    marker = text.upper().rfind("[EXPLANATION]")
    if marker >= 0:
        text = text[marker + len("[EXPLANATION]") :].lstrip(" :")
        text = text.strip().splitlines()[0] if text.strip() else ""
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    text = text.strip().strip("*").strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'`":  # a quoted whole
        text = text[1:-1].strip()
    return text


def parse_predictions(reply: str, n: int) -> list[int] | None:
    """n predictions (0/1) from a reply: the last JSON list of n numbers or booleans in it, else the
    last n bare 0/1 digits if the reply holds exactly n of them; None if neither fits."""
    text = _THINKING.sub("", reply)
    for candidate in reversed(re.findall(r"\[[^\[\]]*\]", text)):
        try:
            values = json.loads(candidate.replace("True", "true").replace("False", "false"))
        except json.JSONDecodeError:
            continue
        if len(values) == n and all(isinstance(v, (bool, int, float)) or v in ("0", "1") for v in values):
            return [1 if float(v) >= 0.5 else 0 for v in values]
    digits = re.findall(r"(?<![\w.])[01](?![\w.])", text)
    return [int(d) for d in digits] if len(digits) == n else None


def detection_scores(labels: Sequence[int], predictions: Sequence[int]) -> dict:
    """Accuracy, precision, recall and F1 of `predictions` against `labels` (1 = activating), with
    n and the confusion counts. Precision is 0 when nothing was predicted activating, recall 0
    when nothing is activating, F1 0 when both are 0 (scikit-learn's zero_division=0)."""
    pairs = list(zip(labels, predictions, strict=True))
    tp = sum(1 for y, p in pairs if y and p)
    fp = sum(1 for y, p in pairs if not y and p)
    fn = sum(1 for y, p in pairs if y and not p)
    tn = len(pairs) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = (tp + tn) / len(pairs) if pairs else 0.0
    return {
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "n": len(pairs),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }
