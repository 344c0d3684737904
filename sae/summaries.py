"""Data-derived feature summaries, the token index of a feature store, and readable vocab texts.

A feature's summary is one line read off its kept examples (top and quantile, each firing
position counted once) and its logit effects:

    "KING" ×14 · "LORD" ×3 · before ":" → " EDWARD", " LEAR", " JOHN"

the tokens its examples peak on, most frequent first (at most 3), a neighbouring token when one
dominates (`before X`: X follows the peak in most examples; `after X`: X precedes it), and the
3 tokens its decoder direction promotes most. Token texts are quoted so that spaces and
newlines show ("\\n"). Everything is computed with whole-array numpy operations: 16k features
summarise in seconds.

`token_features` is the store's token index: per (token, feature), the firing positions of the
feature's kept examples on that token (hits), the examples peaking on it (peaks) and the
largest activation there. `vocab_texts` renders every vocabulary id, a byte that is not a whole
UTF-8 character as `<0xE2>` instead of U+FFFD.
"""

from __future__ import annotations

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
def _example_arrays(examples: pa.Table) -> dict[str, np.ndarray]:
    """feature, window, position, start, activation [E] and tokens, activations [E, W]."""
    n = examples.num_rows
    out = {
        name: examples.column(column).to_numpy().astype(np.int64)
        for name, column in (
            ("feature", "feature"),
            ("window", "window_id"),
            ("position", "position"),
            ("start", "start"),
        )
    }
    out["activation"] = examples.column("activation").to_numpy().astype(np.float32)
    for name, dtype in (("tokens", np.int64), ("activations", np.float32)):
        flat = examples.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        out[name] = flat.astype(dtype).reshape(n, -1) if n else np.zeros((0, 0), dtype)
    return out


def _first_of_each(keys: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct key."""
    return np.unique(keys, return_index=True)[1]


def _count_pairs(
    group: np.ndarray, item: np.ndarray, value: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(group, item, count, max value) of each distinct (group, item) pair, sorted by group,
    then count and value descending."""
    keys = group * width + item
    order = np.argsort(keys, kind="stable")
    keys, value = keys[order], value[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, int)
    counts = np.diff(np.r_[starts, len(keys)])
    best = np.maximum.reduceat(value, starts) if len(keys) else value[:0]
    pair_group, pair_item = keys[starts] // width, keys[starts] % width
    ranked = np.lexsort((-best, -counts, pair_group))
    return pair_group[ranked], pair_item[ranked], counts[ranked], best[ranked]


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """0, 1, 2... within each run of equal (sorted) group ids."""
    if not len(group):
        return np.zeros(0, int)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    return np.arange(len(group)) - np.repeat(starts, np.diff(np.r_[starts, len(group)]))


# --- the token index ---------------------------------------------------------------------------
def token_features_table(examples: pa.Table, context_length: int) -> pa.Table:
    """The store's token_features table (see the module docstring) from its examples table."""
    ex = _example_arrays(examples)
    n, width = ex["tokens"].shape if len(ex["tokens"]) else (0, 0)
    base = (ex["window"] * context_length + ex["start"])[:, None] + np.arange(width)
    fires = ex["activations"] > 0
    feature = np.broadcast_to(ex["feature"][:, None], (n, width))[fires]
    n_rows = int(base.max()) + 1 if base.size else 1
    once = _first_of_each(feature * n_rows + base[fires])  # a position in two examples counts once
    vocab = int(ex["tokens"].max()) + 1 if ex["tokens"].size else 1
    tokens, values = ex["tokens"][fires][once], ex["activations"][fires][once]
    f, t, hits, best = _count_pairs(feature[once], tokens, values, vocab)
    peak = _first_of_each(ex["feature"] * n_rows + ex["window"] * context_length + ex["position"])
    peak_token = ex["tokens"][peak, ex["position"][peak] - ex["start"][peak]]
    pf, pt, peaks, _ = _count_pairs(ex["feature"][peak], peak_token, ex["activation"][peak], vocab)
    stride = int(ex["feature"].max()) + 1 if n else 1
    hit_keys, peak_keys = t * stride + f, pt * stride + pf
    by_key = np.argsort(peak_keys)
    at = np.searchsorted(peak_keys[by_key], hit_keys).clip(max=max(len(peak_keys) - 1, 0))
    found = peak_keys[by_key][at] == hit_keys if len(peak_keys) else np.zeros(len(hit_keys), bool)
    peaks_of = np.where(found, peaks[by_key][at] if len(peak_keys) else 0, 0)
    order = np.lexsort((f, t))
    return pa.table(
        {
            "token": t[order].astype(np.int32),
            "feature": f[order].astype(np.int32),
            "hits": hits[order].astype(np.int32),
            "peaks": peaks_of[order].astype(np.int32),
            "max_activation": best[order].astype(np.float32),
        }
    )


# --- summaries ---------------------------------------------------------------------------------
def feature_summaries(
    examples: pa.Table, logits: pa.Table | None, texts: list[str], n_latents: int, context_length: int
) -> list[str]:
    """One summary per feature 0..n_latents-1 (see the module docstring); NEVER_FIRED for a
    feature without examples. `texts` are the vocabulary's token texts."""
    ex = _example_arrays(examples)
    n, width = ex["tokens"].shape if len(ex["tokens"]) else (0, 0)
    parts: list[list[str]] = [[] for _ in range(n_latents)]
    if n:
        keep = _first_of_each(
            ex["feature"] * (int(ex["window"].max()) + 1) * context_length
            + ex["window"] * context_length
            + ex["position"]
        )
        feature, offset = ex["feature"][keep], (ex["position"] - ex["start"])[keep]
        tokens, value = ex["tokens"][keep], ex["activation"][keep]
        vocab = max(len(texts), int(tokens.max()) + 1)
        rows = np.arange(len(keep))
        f, t, counts, _ = _count_pairs(feature, tokens[rows, offset], value, vocab)
        first = _rank_in_group(f) < PEAK_TOKENS
        for g, token, count in zip(f[first].tolist(), t[first].tolist(), counts[first].tolist()):
            parts[g].append(f"{quote_token(_text(texts, token))} ×{count}")
        per_feature = np.bincount(feature, minlength=n_latents)
        for g, phrase in _dominant_neighbours(feature, tokens, offset, value, per_feature, vocab, texts):
            parts[g].append(phrase)
    lines = [" · ".join(p) if p else NEVER_FIRED for p in parts]
    for g, promoted in _promoted(logits, texts).items():
        if g < n_latents and lines[g] != NEVER_FIRED:
            lines[g] += " → " + ", ".join(promoted)
    return lines


def _dominant_neighbours(feature, tokens, offset, value, per_feature, vocab, texts):
    """(feature, 'before X' | 'after X') where one neighbouring token dominates the examples."""
    best: dict[int, tuple[float, str]] = {}
    width = tokens.shape[1]
    for step, word in ((1, "before"), (-1, "after")):
        at = offset + step
        valid = (at >= 0) & (at < width)
        rows = np.flatnonzero(valid)
        f, t, counts, _ = _count_pairs(feature[rows], tokens[rows, at[rows]], value[rows], vocab)
        top = _rank_in_group(f) == 0
        f, t, counts = f[top], t[top], counts[top]
        share = counts / np.maximum(per_feature[f], 1)
        strong = (share >= CONTEXT_SHARE) & (counts >= 3)
        for g, token, s in zip(f[strong].tolist(), t[strong].tolist(), share[strong].tolist()):
            if s > best.get(g, (0.0, ""))[0]:
                best[g] = (s, f"{word} {quote_token(_text(texts, token))}")
    return ((g, phrase) for g, (_, phrase) in sorted(best.items()))


def _promoted(logits: pa.Table | None, texts: list[str]) -> dict[int, list[str]]:
    """{feature: quoted texts of its top LOGIT_TOKENS promoted tokens} from the logits table."""
    if logits is None or logits.num_rows == 0:
        return {}
    side = logits.column("side").to_numpy(zero_copy_only=False)
    rank = logits.column("rank").to_numpy()
    keep = (side == "top") & (rank < LOGIT_TOKENS)
    feature = logits.column("feature").to_numpy()[keep]
    token = logits.column("token").to_numpy()[keep]
    order = np.lexsort((rank[keep], feature))
    out: dict[int, list[str]] = {}
    for g, t in zip(feature[order].tolist(), token[order].tolist()):
        out.setdefault(g, []).append(quote_token(_text(texts, t)))
    return out


def _text(texts: list[str], token: int) -> str:
    return texts[token] if 0 <= token < len(texts) else f"<{token}>"


def add_summaries(tables: dict[str, pa.Table], texts: list[str], context_length: int) -> None:
    """Add the summary column to `tables["features"]` and the token_features table, in place."""
    features, examples = tables["features"], tables["examples"]
    lines = feature_summaries(examples, tables.get("logits"), texts, features.num_rows, context_length)
    tables["features"] = features.append_column("summary", pa.array(lines, pa.string()))
    tables["token_features"] = token_features_table(examples, context_length)


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
