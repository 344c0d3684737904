"""Numbers and tokens as a reader wants them: densities never print as 0.0000, tokens show their
spaces and newlines, and a token query may spell whitespace with backslash escapes."""

from __future__ import annotations

import math

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "s": " ", "\\": "\\"}


def format_density(density: float) -> str:
    """A firing rate a reader can compare: '0.35% · 1 in 290', '3.2e-05 · 1 in 31,000',
    'never fired'. (Four decimals made every rare feature read 0.0000.)"""
    density = float(density)
    if not math.isfinite(density) or density <= 0:
        return "never fired"
    share = f"{density:.2%}" if density >= 1e-3 else f"{density:.2g}"
    if density >= 0.5:
        return share
    return f"{share} · 1 in {_round_count(1 / density):,}"


def _round_count(value: float) -> int:
    """Two significant figures: 31,250 -> 31,000 (the '1 in N' reading is approximate)."""
    digits = max(int(math.floor(math.log10(value))) - 1, 0)
    return int(round(value, -digits))


def format_activation(value: float) -> str:
    return f"{float(value):.3g}"


def visible_token(text: str) -> str:
    """A token quoted with its spaces and escapes visible: ' the' -> "' the'", a newline -> '\\n'."""
    return repr(text)


def parse_token_query(query: str) -> str:
    """The token a search box names: backslash escapes \\n, \\t, \\r, \\s (a space) and \\\\ are
    turned into their characters (so a newline or tab token can be typed); anything else is kept
    as typed, spaces included."""
    out, i = [], 0
    while i < len(query):
        char = query[i]
        if char == "\\" and i + 1 < len(query) and query[i + 1] in _ESCAPES:
            out.append(_ESCAPES[query[i + 1]])
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def shorten(text: str, width: int = 70) -> str:
    """One line of at most `width` characters (newlines shown as ↵, an ellipsis when cut)."""
    line = " ".join(str(text).replace("\n", "↵ ").split())
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


def escape_markdown(text: str) -> str:
    """`text` shown literally where Streamlit renders markdown (button labels, captions): ASCII
    punctuation backslash-escaped, so a token such as `*` or `:sun:` prints as itself."""
    return "".join("\\" + c if c in _MARKDOWN else c for c in str(text))


_MARKDOWN = set("\\`*_{}[]()<>#+-!|~$:")


def parse_feature_id(raw: str | None, n_latents: int) -> tuple[int | None, str]:
    """(feature, '') for a URL's `feature` value that names one of `n_latents` features, else
    (None, a one-line reason): ids are whole numbers 0..n_latents-1, nothing else (no sign,
    no clamping to the last feature)."""
    text = "" if raw is None else str(raw).strip()
    if not text.isascii() or not text.isdigit():
        return None, f"{raw!r} is not a feature id: ids are whole numbers 0..{n_latents - 1}."
    feature = int(text)
    if feature >= n_latents:
        return None, f"Feature {feature} is outside this store's 0..{n_latents - 1}."
    return feature, ""
