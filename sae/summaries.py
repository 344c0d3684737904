"""Data-derived feature summaries, the token index of a feature store, and readable vocab texts.

A feature's summary is one line read off its kept examples (top and quantile, each firing
position counted once) and its logit effects:

    "KING" ×14 · "LORD" ×3 · before ":" → " EDWARD", " LEAR", " JOHN"

the tokens its examples peak on, most frequent first (at most 3; after the first, only those
peaked on more than once), a neighbouring token when one dominates (`before X`: X follows the
peak in most examples; `after X`: X precedes it), and the 3 tokens its decoder direction
promotes most. Token texts are quoted so that spaces and
newlines show ("\\n"). Everything is computed with whole-array numpy operations: 16k features
summarise in seconds.

`token_features` is the store's token index: per (token, feature), the firing positions of the
feature's kept examples on that token (hits), the examples peaking on it (peaks) and the
largest activation there. `vocab_texts` renders every vocabulary id, a byte that is not a whole
UTF-8 character as `<0xE2>` instead of U+FFFD.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa

PEAK_TOKENS = 3
"""Peak tokens named per summary."""
LOGIT_TOKENS = 3
"""Promoted tokens named per summary."""
CONTEXT_SHARE = 0.6
"""A neighbouring token is named when at least this share of the examples (and 3) have it."""
NEVER_FIRED = "never fired"


def quote_token(text: str) -> str:
    """A token's text in double quotes with backslash, quote, newline, tab and CR escaped."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return '"' + escaped.replace("\r", "\\r") + '"'


# --- the kept examples as flat arrays ---------------------------------------------------------
def _example_arrays(examples: pa.Table, context_length: int) -> dict[str, np.ndarray]:
    """feature, row (of the peak, in the cache), first (cache row of tokens[0]), offset (of the
    peak in tokens), activation [E]; tokens, activations [E, W] (views of the Arrow buffers)."""
    n = examples.num_rows
    column = lambda name: examples.column(name).to_numpy().astype(np.int64)  # noqa: E731
    window, start = column("window_id"), column("start")
    out = {
        "feature": column("feature"),
        "row": window * context_length + column("position"),
        "first": window * context_length + start,
        "offset": column("position") - start,
        "activation": examples.column("activation").to_numpy(),
    }
    for name in ("tokens", "activations"):
        flat = examples.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        out[name] = flat.reshape(n, -1) if n else flat.reshape(0, 0)
    return out


def _distinct(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, first): `order` sorts the rows by the (non-negative integer) keys, the last key
    primary as in np.lexsort; `first` marks, in that order, the first row of each distinct key
    tuple. Keys whose ranges multiply below 2**62 are sorted as one int64 key (one argsort)."""
    spans = [int(key.max()) + 1 if len(key) else 1 for key in keys]
    if math.prod(spans) < 2**62:
        combined, scale = np.zeros(len(keys[0]), np.int64), 1
        for key, span in zip(keys, spans):
            combined += key.astype(np.int64) * scale
            scale *= span
        keys = (combined,)
        order = np.argsort(combined)
    else:
        order = np.lexsort(keys)
    changed = np.zeros(len(order), bool)
    changed[:1] = True
    for key in keys:
        sorted_key = key[order]
        changed[1:] |= sorted_key[1:] != sorted_key[:-1]
    return order, changed


def _count_pairs(group: np.ndarray, item: np.ndarray, value: np.ndarray):
    """(group, item, count, max value) of each distinct (group, item) pair, sorted by group,
    then count and value descending."""
    order, first = _distinct(item, group)
    starts = np.flatnonzero(first)
    counts = np.diff(np.r_[starts, len(order)])
    best = np.maximum.reduceat(value[order], starts) if len(order) else value[:0]
    pair_group, pair_item = group[order][starts], item[order][starts]
    ranked = np.lexsort((-best, -counts, pair_group))
    return pair_group[ranked], pair_item[ranked], counts[ranked], best[ranked]


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """0, 1, 2... within each run of equal (sorted) group ids."""
    if not len(group):
        return np.zeros(0, int)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    return np.arange(len(group)) - np.repeat(starts, np.diff(np.r_[starts, len(group)]))


def _peaks(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The examples' peaks, each (feature, cache row) once: feature, row, token, activation,
    and `example`, the index of an example peaking there."""
    order, first = _distinct(ex["row"], ex["feature"])
    keep = order[first]
    return {
        "example": keep,
        "feature": ex["feature"][keep],
        "row": ex["row"][keep],
        "token": ex["tokens"][keep, ex["offset"][keep]].astype(np.int64),
        "activation": ex["activation"][keep],
    }


# --- the token index ---------------------------------------------------------------------------
def token_features_table(examples: pa.Table, context_length: int) -> pa.Table:
    """The store's token_features table (see the module docstring) from its examples table."""
    return _token_index(_example_arrays(examples, context_length))


def _token_index(ex: dict[str, np.ndarray]) -> pa.Table:
    width = ex["tokens"].shape[1]
    flat = np.flatnonzero(ex["activations"].reshape(-1) > 0)
    example, column = np.divmod(flat, max(width, 1))
    row = ex["first"][example] + column
    feature = ex["feature"][example]
    token = ex["tokens"].reshape(-1)[flat].astype(np.int64)
    order, first = _distinct(row, feature, token)  # a position in two examples counts once
    token, feature = token[order][first], feature[order][first]
    value = ex["activations"].reshape(-1)[flat][order][first]
    starts = np.flatnonzero(np.r_[True, (token[1:] != token[:-1]) | (feature[1:] != feature[:-1])])
    hits = np.diff(np.r_[starts, len(token)])
    best = np.maximum.reduceat(value, starts) if len(token) else value[:0]
    token, feature = token[starts], feature[starts]
    peaks = _peaks(ex)
    peak_order, peak_first = _distinct(peaks["feature"], peaks["token"])
    peak_starts = np.flatnonzero(peak_first)
    peak_counts = np.diff(np.r_[peak_starts, len(peak_order)])
    n_features = int(ex["feature"].max()) + 1 if len(ex["feature"]) else 1
    keys = token * n_features + feature  # sorted, as the pairs are
    peak_keys = (peaks["token"] * n_features + peaks["feature"])[peak_order][peak_starts]
    at = np.searchsorted(keys, peak_keys)  # every peak is a firing position: always found
    peak_column = np.zeros(len(keys), np.int32)
    peak_column[at] = peak_counts
    return pa.table(
        {
            "token": token.astype(np.int32),
            "feature": feature.astype(np.int32),
            "hits": hits.astype(np.int32),
            "peaks": peak_column,
            "max_activation": best.astype(np.float32),
        }
    )


# --- summaries ---------------------------------------------------------------------------------
def feature_summaries(
    examples: pa.Table, logits: pa.Table | None, texts: list[str], n_latents: int, context_length: int
) -> list[str]:
    """One summary per feature 0..n_latents-1 (see the module docstring); NEVER_FIRED for a
    feature without examples. `texts` are the vocabulary's token texts."""
    return _summaries(_example_arrays(examples, context_length), logits, texts, n_latents)


def _summaries(ex: dict[str, np.ndarray], logits, texts: list[str], n_latents: int) -> list[str]:
    quoted: dict[int, str] = {}

    def name(token: int) -> str:
        if token not in quoted:
            quoted[token] = quote_token(texts[token] if 0 <= token < len(texts) else f"<{token}>")
        return quoted[token]

    parts: list[list[str]] = [[] for _ in range(n_latents)]
    peaks = _peaks(ex)
    f, t, counts, _ = _count_pairs(peaks["feature"], peaks["token"], peaks["activation"])
    rank = _rank_in_group(f)
    first = (rank < PEAK_TOKENS) & ((rank == 0) | (counts > 1))  # a runner-up seen once is noise
    for g, token, count in zip(f[first].tolist(), t[first].tolist(), counts[first].tolist()):
        parts[g].append(f"{name(token)} ×{count}")
    for g, word, token in _dominant_neighbours(ex, peaks, n_latents):
        parts[g].append(f"{word} {name(token)}")
    lines = [" · ".join(p) if p else NEVER_FIRED for p in parts]
    for g, promoted in _promoted(logits).items():
        if g < n_latents and lines[g] != NEVER_FIRED:
            lines[g] += " → " + ", ".join(name(t) for t in promoted)
    return lines


def _dominant_neighbours(ex, peaks, n_latents: int):
    """(feature, "before" | "after", token) where one neighbouring token dominates the peaks."""
    per_feature = np.bincount(peaks["feature"], minlength=n_latents)
    example, offset = peaks["example"], ex["offset"][peaks["example"]]
    best: dict[int, tuple[float, str, int]] = {}
    for step, word in ((1, "before"), (-1, "after")):
        at = offset + step
        valid = np.flatnonzero((at >= 0) & (at < ex["tokens"].shape[1]))
        neighbour = ex["tokens"][example[valid], at[valid]].astype(np.int64)
        f, t, counts, _ = _count_pairs(peaks["feature"][valid], neighbour, peaks["activation"][valid])
        top = _rank_in_group(f) == 0
        f, t, counts = f[top], t[top], counts[top]
        share = counts / np.maximum(per_feature[f], 1)
        strong = (share >= CONTEXT_SHARE) & (counts >= 3)
        for g, token, s in zip(f[strong].tolist(), t[strong].tolist(), share[strong].tolist()):
            if s > best.get(g, (0.0, "", 0))[0]:
                best[g] = (s, word, token)
    return ((g, word, token) for g, (_, word, token) in sorted(best.items()))


def _promoted(logits: pa.Table | None) -> dict[int, list[int]]:
    """{feature: its top LOGIT_TOKENS promoted token ids, best first} from the logits table."""
    if logits is None or logits.num_rows == 0:
        return {}
    side = logits.column("side").to_numpy(zero_copy_only=False)
    rank = logits.column("rank").to_numpy()
    keep = (side == "top") & (rank < LOGIT_TOKENS)
    feature = logits.column("feature").to_numpy()[keep]
    token = logits.column("token").to_numpy()[keep]
    order = np.lexsort((rank[keep], feature))
    out: dict[int, list[int]] = {}
    for g, t in zip(feature[order].tolist(), token[order].tolist()):
        out.setdefault(g, []).append(t)
    return out


def add_summaries(tables: dict[str, pa.Table], texts: list[str], context_length: int) -> None:
    """Add the summary column to `tables["features"]` and the token_features table, in place."""
    features = tables["features"]
    ex = _example_arrays(tables["examples"], context_length)
    lines = _summaries(ex, tables.get("logits"), texts, features.num_rows)
    tables["features"] = features.append_column("summary", pa.array(lines, pa.string()))
    tables["token_features"] = _token_index(ex)


# --- vocab texts -------------------------------------------------------------------------------
_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = list(printable), 0
    byte_values = list(printable)
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars)}


def render_bytes(raw: bytes) -> str:
    """UTF-8 text of `raw`, each byte that is not part of a whole character as <0xNN>."""
    out = []
    while raw:
        try:
            out.append(raw.decode("utf-8"))
            break
        except UnicodeDecodeError as exc:
            out.append(raw[: exc.start].decode("utf-8"))
            out.extend(f"<0x{b:02X}>" for b in raw[exc.start : exc.end])
            raw = raw[exc.end :]
    return "".join(out)


def vocab_texts(tokenizer, n: int) -> list[str]:
    """`token_text` of every token id 0..n-1."""
    decoder = _byte_decoder()
    return [token_text(tokenizer, token, decoder) for token in range(n)]


def token_text(tokenizer, token: int, decoder: dict[str, int] | None = None) -> str:
    """The text of `token` as the tokenizer decodes it alone, except that a token decoding to
    U+FFFD shows its bytes: a sentencepiece byte token keeps its `<0xE2>` name, a byte-level
    BPE token (GPT-2 style) is mapped back to its bytes and rendered by `render_bytes`. An id
    past the tokenizer's vocabulary (a padded embedding row) reads `<id>`."""
    try:
        text = tokenizer.decode([token])
    except Exception:
        return f"<{token}>"
    if "\ufffd" in text:
        piece = tokenizer.convert_ids_to_tokens(token)
        text = _byte_text(piece, decoder or _byte_decoder()) or text
    return text


def _byte_text(piece, decoder: dict[str, int]) -> str | None:
    if not isinstance(piece, str) or not piece:
        return None
    if _SENTENCEPIECE_BYTE.fullmatch(piece):
        return piece[:3] + piece[3:5].upper() + ">"
    if all(c in decoder for c in piece):
        return render_bytes(bytes(decoder[c] for c in piece))
    return None
