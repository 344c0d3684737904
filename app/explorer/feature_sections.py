"""The Feature page's sections: examples (top, quantile groups, longer contexts), logit effects,
related features (decoder neighbours, co-occurrence), the explanation, and the label editor."""

from __future__ import annotations

import math

import numpy as np
import streamlit as st

from app.explorer.data import cached, describe_feature, feature_chip, open_store
from app.explorer.formats import escape_markdown, format_activation
from app.explorer.plots import ExampleRow, examples_html, grouped_examples_html, logits_html
from workbench.errors import WorkbenchError
from workbench.store import Example, FeaturePage, FeatureStore

LONG_RADIUS = 32


@cached("cache_resource", max_entries=256, show_spinner=False)
def feature_page(path: str, feature: int) -> FeaturePage:
    """One feature's page from the store at `path`, kept across reruns (read-only: never
    mutate it). Raises StoreError as `FeatureStore.feature` does."""
    return open_store(path).feature(int(feature))


def example_row(store: FeatureStore, example: Example) -> ExampleRow:
    return ExampleRow(
        store.token_texts(example.tokens),
        example.activations,
        example.position - example.start,
        example.activation,
    )


@cached("cache_data", max_entries=64, show_spinner="Reading longer contexts ...")
def long_rows(path: str, feature: int, radius: int = LONG_RADIUS) -> tuple[list[ExampleRow], str]:
    """The top examples of `feature` with `radius` tokens either side of their peak, from the
    cache's token windows, and a note ('' when every activation was computed). Activations over
    the whole span come from `sae.contexts.context_activations` when the dictionary and cache
    are here; else only the stored context is coloured. ([], why) when the cache is absent."""
    store, page = open_store(path), feature_page(path, feature)
    try:
        from sae.contexts import context_activations
    except ImportError:  # the cache's tokens are enough to show the words
        context_activations = None
    rows, partial = [], False
    for example in page.top:
        computed = context_activations(store, example, radius) if context_activations else None
        if computed is not None:
            tokens, acts = computed
            acts = np.asarray(acts, dtype=float)
            peak = example.position - max(0, example.position - radius)  # as long_context clips
        else:
            span = store.long_context(example, radius)
            if span is None:
                return [], f"the cache {store.meta.get('cache')!r} is not on this machine"
            tokens, low = span
            acts = np.full(len(tokens), np.nan)
            offset = example.start - low
            acts[offset : offset + len(example.activations)] = example.activations
            peak, partial = example.position - low, True
        rows.append(ExampleRow(store.token_texts(list(tokens)), acts.tolist(), peak, example.activation))
    note = "grey tokens lie outside the stored context (the dictionary is not here to compute them)"
    return rows, note if partial else ""


def show_examples(store: FeatureStore, page: FeaturePage) -> None:
    """Top examples (one HTML block), a longer-context toggle, and the quantile groups."""
    st.subheader("Top activations")
    if not page.top:
        st.write("This feature never fired on the analyzed tokens.")
        return
    longer = st.toggle(f"Longer contexts (± {LONG_RADIUS} tokens)", key="long_context")
    rows = [example_row(store, e) for e in page.top]
    if longer:
        try:
            long, note = long_rows(str(store.path), page.feature)
        except WorkbenchError as exc:
            long, note = [], str(exc)
        if long:
            rows = long
        if note:
            st.caption(("Longer contexts: " if long else "No longer contexts: ") + note + ".")
    st.html(examples_html(rows, page.max_activation))
    groups = []
    for group in sorted({e.bin for e in page.quantiles}, reverse=True):
        members = sorted((e for e in page.quantiles if e.bin == group), key=lambda e: -e.activation)
        low, high = members[-1].activation, members[0].activation
        title = f"group {group + 1}: activations {format_activation(low)} – {format_activation(high)}"
        groups.append((title, [example_row(store, e) for e in members]))
    if groups:
        st.subheader("Quantile groups")
        st.html(grouped_examples_html(groups, page.max_activation))


def show_logits(page: FeaturePage) -> None:
    """Tokens the feature's decoder direction promotes and suppresses (direct logit effect)."""
    logits = page.logits
    if logits.empty:
        st.caption("No logit effects: the hook is not of the residual stream's width.")
        return
    for side, title in (("top", "Promotes (top logit effects)"), ("bottom", "Suppresses (bottom)")):
        part = logits[logits.side == side]
        if not part.empty:
            st.markdown(f"**{title}**")
            st.html(logits_html(part.text.tolist(), part.effect.tolist(), positive=side == "top"))


def show_related(store: FeatureStore, page: FeaturePage) -> None:
    """Decoder neighbours and co-occurring features as buttons (id · description · score), and
    the correlated neurons."""
    st.subheader("Decoder neighbours")
    if page.neighbours.empty:
        st.caption("None stored.")
    for row in page.neighbours.itertuples():
        feature_chip(store, row.other, f"neighbour_{row.other}", f"cos {row.cosine:.2f}", here=True)
    st.subheader("Co-occurring features")
    st.caption("rate = P(other fires | this fires); lift = rate / P(other fires)")
    if page.cooccurrence.empty:
        st.caption("None stored.")
    for row in page.cooccurrence.itertuples():
        note = f"rate {row.rate:.2f} · lift {row.lift:.3g}"
        feature_chip(store, row.other, f"cooccur_{row.other}", note, here=True)
    if not page.neurons.empty:
        st.markdown("**Correlated neurons** (of the hook's activation)")
        st.caption(" · ".join(f"{r.neuron} (r {r.correlation:.2f})" for r in page.neurons.itertuples()))


def show_explanation(store: FeatureStore, page: FeaturePage, shown: str = "") -> None:
    """The user's label, the explanation with its detection score, and the data summary (each
    unless it is `shown`, the description already printed as the page's heading)."""
    try:
        label = store.labels.get(page.feature)["label"]
    except WorkbenchError as exc:
        label = ""
        st.error(str(exc))
    if label and label != shown:
        st.markdown(f"**Label:** {escape_markdown(label)}")
    try:
        entry = store.explanations().get(page.feature)
    except WorkbenchError as exc:
        entry = None
        st.error(str(exc))
    if entry and entry.get("explanation"):
        who = escape_markdown(entry.get("explainer") or entry.get("source", ""))
        if entry["explanation"] != shown:
            st.markdown(f"**Explanation** ({who}): {escape_markdown(entry['explanation'])}")
        score = detection_text(entry["detection"]) if entry.get("detection") else "no detection score"
        st.caption(f"Explanation by {who}; {score}")
    if page.summary and page.summary != shown:
        st.caption(f"Summary: {escape_markdown(page.summary)}")


def detection_text(detection: dict) -> str:
    """'detection: accuracy 0.83 · F1 0.80 · precision … · recall … (n = 20)'."""

    def number(key):
        value = detection.get(key)
        return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):.2f}"

    parts = " · ".join(f"{name} {number(key)}" for key, name in _SCORES)
    n = detection.get("n", "?")
    if detection.get("scorer") == "token-match":  # a keyword rule, not a model's judgement
        return f"token-match rule (offline, no language model): {parts} (n = {n}; chance accuracy 0.50)"
    return f"detection score: {parts} (n = {n} contexts, half activating; chance accuracy 0.50)"


_SCORES = (("accuracy", "accuracy"), ("f1", "F1"), ("precision", "precision"), ("recall", "recall"))


def label_editor(store: FeatureStore, feature: int) -> None:
    """A form writing the user's label and notes to the labels file beside the (read-only) store."""
    try:
        current = store.labels.get(feature)
    except WorkbenchError as exc:
        st.error(str(exc))
        return
    with st.form(f"label_form_{feature}"):
        label = st.text_input("Label", value=current["label"], key=f"label_{feature}")
        notes = st.text_area("Notes", value=current["notes"], key=f"notes_{feature}", height=80)
        saved = st.form_submit_button("Save label")
    if saved:
        try:
            store.labels.set(feature, label, notes)
        except WorkbenchError as exc:
            st.error(str(exc))
        else:  # rerun, so the title and every list show the new label
            st.toast(f"Saved to {store.labels.path.name}: {describe_feature(store, feature) or '(cleared)'}")
            st.rerun()
