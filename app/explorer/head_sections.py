"""The Feature page's attention-head section, for stores of `blocks.L.attn.hook_z` dictionaries
(Kissane et al. 2024, "Interpreting Attention Layer Outputs with Sparse Autoencoders"): a bar
chart of the decoder row's share per head (from the store), and, for a chosen top example,
the source tokens highlighted by their direct feature attribution through each head (computed
live with the model and dictionary, `sae.attention_heads.direct_feature_attribution`)."""

from __future__ import annotations

import html
from typing import NamedTuple

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app.explorer.data import cached, live_available, live_dictionary, live_model, open_store
from app.explorer.feature_sections import feature_page
from app.explorer.formats import format_activation
from app.explorer.plots import token_html
from workbench.errors import WorkbenchError
from workbench.store import FeaturePage, FeatureStore

POSITIVE, NEGATIVE = "255, 110, 30", "40, 120, 200"
_DFA_CSS = (
    "<style>"
    ".wb-dfa .row{display:flex;gap:.6em;align-items:baseline;margin:0 0 .35em 0}"
    ".wb-dfa .name{flex:0 0 4.2em;text-align:right;font:12px monospace;color:#666}"
    ".wb-dfa .ctx{flex:1 1 auto;min-width:0;white-space:pre-wrap;overflow-wrap:anywhere;"
    "font-family:monospace;font-size:13px;line-height:1.7}"
    ".wb-dfa .tok{border-radius:3px}.wb-dfa .peak{border-bottom:2px solid #000}"
    "</style>"
)


def head_figure(heads, layer: int | None) -> go.Figure:
    """Bars of each head's share of the decoder row (hover: the block's norm)."""
    names = [f"L{layer}.H{h}" if layer is not None else f"H{h}" for h in heads["head"]]
    figure = go.Figure(
        go.Bar(
            x=names,
            y=heads["share"].tolist(),
            customdata=heads["norm"].tolist(),
            hovertemplate="%{x}: share %{y:.3f}, norm %{customdata:.3g}<extra></extra>",
            marker_color=f"rgb({POSITIVE})",
        )
    )
    figure.update_layout(
        title="Decoder weight by head (share of the sum of per-head norms)",
        yaxis_title="share",
        height=260,
        margin=dict(l=10, r=10, t=40, b=10),
    )
    return figure


class SourceAttribution(NamedTuple):
    tokens: list[str]
    """The prompt up to the example's peak (the cache window from its start when the cache is here)."""
    terms: np.ndarray
    """[n_heads, n_tokens] DFA of each (head, source token)."""
    bias: float
    pre_activation: float
    activation: float
    stored_activation: float
    note: str
    """'' when the whole window was attributed; else why only the stored context was."""


@cached("cache_data", max_entries=64, show_spinner="Attributing the peak to source tokens ...")
def source_attribution(path: str, feature: int, example_index: int) -> SourceAttribution:
    """DFA of `feature` at the peak of its `example_index`-th top example. Raises WorkbenchError
    (the model or dictionary cannot be loaded; a bad example)."""
    import torch

    from sae.attention_heads import direct_feature_attribution

    store, page = open_store(path), feature_page(path, feature)
    example = page.top[int(example_index)]
    span = store.long_context(example, radius=example.position)  # from the window's start
    if span is not None and span[1] == 0:
        tokens, peak, note = span[0][: example.position + 1], example.position, ""
    else:
        peak = example.position - example.start
        tokens, note = example.tokens[: peak + 1], "the cache is not here: only the stored context was run"
    model = live_model(store.meta["model"])
    dictionary = live_dictionary(store.meta["dictionary_path"])
    got = direct_feature_attribution(model, dictionary, torch.tensor(tokens), feature, peak)
    return SourceAttribution(
        store.token_texts(list(tokens)),
        got.terms.numpy(),
        got.bias,
        got.pre_activation,
        got.activation,
        example.activation,
        note,
    )


def dfa_html(tokens: list[str], terms: np.ndarray, layer: int | None) -> str:
    """One line per head, and their sum first, each token shaded by its signed contribution
    (orange raises the feature, blue lowers it; one scale for every line; the peak underlined)."""
    rows = [("all heads", terms.sum(axis=0))]
    rows += [(f"L{layer}.H{h}" if layer is not None else f"H{h}", terms[h]) for h in range(len(terms))]
    scale = max(float(np.abs(row).max()) for _, row in rows) or 1.0
    parts = [_DFA_CSS, '<div class="wb-dfa">']
    for name, row in rows:
        spans = []
        for i, (token, value) in enumerate(zip(tokens, row)):
            colour = POSITIVE if value >= 0 else NEGATIVE
            alpha = min(abs(float(value)) / scale, 1.0)
            peak = " peak" if i == len(tokens) - 1 else ""
            spans.append(
                f'<span class="tok{peak}" title="{float(value):+.4g}" '
                f'style="background: rgba({colour}, {alpha:.2f})">{token_html(token)}</span>'
            )
        total = float(row.sum())
        parts.append(
            f'<div class="row"><span class="name" title="{html.escape(name)}: {total:+.4g}">'
            f'{html.escape(name)}</span><div class="ctx">{"".join(spans)}</div></div>'
        )
    parts.append("</div>")
    return "".join(parts)


def top_terms(tokens: list[str], terms: np.ndarray, layer: int | None, n: int = 5) -> str:
    """'L1.H2 ← ' Mary' (pos 3) +1.2 · ...': the largest contributions by absolute value."""
    flat = np.argsort(-np.abs(terms), axis=None)[:n]
    parts = []
    for h, s in zip(*np.unravel_index(flat, terms.shape)):
        head = f"L{layer}.H{h}" if layer is not None else f"H{h}"
        parts.append(f"{head} ← {tokens[s]!r} (pos {s}) {terms[h, s]:+.3g}")
    return " · ".join(parts)


def show_heads(store: FeatureStore, page: FeaturePage) -> None:
    """The head chart and the source attribution; nothing for stores of other hooks."""
    if page.heads.empty:
        return
    from sae.attention_heads import attention_layer

    layer = attention_layer(store.meta.get("hook"))
    st.subheader("Attention heads")
    st.plotly_chart(head_figure(page.heads, layer), key="head_shares")
    if not page.top:
        return
    st.markdown("**Which earlier tokens, through which head, drive the feature at its peak**")
    labels = [f"#{i + 1} (activation {format_activation(e.activation)})" for i, e in enumerate(page.top)]
    pick = st.selectbox("Top example", range(len(labels)), format_func=labels.__getitem__, key="dfa_example")
    asked = st.session_state.get("dfa_for")
    if st.button("Attribute to source tokens", key="dfa_run"):
        asked = st.session_state["dfa_for"] = (str(store.path), page.feature, int(pick))
    if asked != (str(store.path), page.feature, int(pick)):
        return
    why_not = live_available(store)
    if why_not:
        st.caption(f"Source attribution needs the model and dictionary: {why_not}.")
        return
    try:
        got = source_attribution(str(store.path), page.feature, int(pick))
    except (WorkbenchError, OSError) as exc:
        st.caption(f"Source attribution needs the model and dictionary: {exc}")
        return
    st.html(dfa_html(got.tokens, got.terms, layer))
    total, act, stored = float(got.terms.sum()), got.activation, got.stored_activation
    st.caption(
        f"pre-activation {got.pre_activation:.4g} = Σ terms {total:.4g} + bias {got.bias:.4g}; "
        f"activation {format_activation(act)} (stored {format_activation(stored)}). "
        f"Largest: {top_terms(got.tokens, got.terms, layer)}" + (f". Note: {got.note}." if got.note else "")
    )
