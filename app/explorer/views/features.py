"""Features: every feature with its summary (and label, explanation) in a sortable,
filterable table; search by exact token, by words in summaries / labels / explanations, and by
what fires on a text. A click on any row opens that feature."""

import numpy as np
import pandas as pd
import streamlit as st

from app.explorer.data import go_to_feature, live_activations, live_or_warn, selected_store
from app.explorer.formats import parse_token_query, visible_token
from workbench.errors import WorkbenchError

store = selected_store()
if store is None:
    st.stop()
meta = store.meta
st.title(f"Features · {meta['architecture']} · {meta['hook']}")
st.caption(f"{meta['n_latents']:,} features, {meta['tokens_analyzed']:,} tokens analyzed · {store.path}")
DENSITY = st.column_config.NumberColumn("density", format="%.2e")
SUMMARY = st.column_config.TextColumn("summary", width="large")


def clickable(frame: pd.DataFrame, key: str, height: int | None = None) -> None:
    """`frame` as a table whose row click opens that row's feature."""
    options = {"height": height} if height else {}
    event = st.dataframe(
        frame,
        hide_index=True,
        on_select="rerun",
        selection_mode=["single-row", "single-cell"],  # a click on any cell opens its row
        key=key,
        width="stretch",
        column_config={"density": DENSITY, "summary": SUMMARY},
        **options,
    )
    selection = event.selection if event is not None else {}
    rows = list(selection.get("rows", [])) + [cell[0] for cell in selection.get("cells", [])]
    if rows:
        go_to_feature(int(frame.iloc[rows[0]].feature))


def with_texts(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with, after `feature`, the user's label and the explanation (columns present when
    any feature has one) and the data summary."""
    ids = [int(f) for f in frame.feature]
    summaries = store.summaries(ids)
    out = frame.drop(columns=[c for c in ("summary",) if c in frame])
    columns = {"summary": [summaries.get(f, "") for f in ids]}
    try:
        labels, explained = store.labels.all(), store.explanations()
    except WorkbenchError as exc:
        st.error(str(exc))
        labels, explained = {}, {}
    texts = {f: explained.get(f, {}).get("explanation", "") for f in ids}
    texts = {f: t if t != summaries.get(f, "") else "" for f, t in texts.items()}  # offline: the summary
    if any(texts.values()):
        columns = {"explanation": [texts[f] for f in ids], **columns}
    if labels:
        columns = {"label": [labels.get(f, {}).get("label", "") for f in ids], **columns}
    for position, (name, values) in enumerate(columns.items(), start=1):
        out.insert(position, name, values)
    return out


by_token, by_words, by_text = st.tabs(["Token search", "Summaries, labels, explanations", "Fires on a text"])
with by_token:
    query = st.text_input(
        "Token (exact, spaces count; \\n is a newline, \\t a tab, \\s a space)",
        key="token_query",
        placeholder="e.g.  the   or  KING  or  \\n",
    )
    if query:
        token = parse_token_query(query)
        hits = store.search_tokens(token)
        st.caption(
            f"{hits.total:,} features fire on token {visible_token(token)} (showing {len(hits.table):,}); "
            "peaks = examples whose maximum is on it, hits = positions where it fired"
        )
        if hits.total == 0 and not store.token_ids(token):
            st.caption(f"No token of this vocabulary is exactly {visible_token(token)}.")
        if len(hits.table):
            clickable(with_texts(hits.table), "token_hits")
with by_words:
    words = st.text_input("Words in a label, note, explanation or summary", key="words_query")
    if words.strip():
        try:
            found = store.search_text(words)
        except WorkbenchError as exc:
            st.error(str(exc))
        else:
            total = found.attrs.get("total", len(found))
            st.caption(f"{total:,} feature{'s' if total != 1 else ''} match (showing {len(found):,})")
            if len(found):
                clickable(found, "word_hits")
with by_text:
    text = st.text_area("Which features fire on this text?", key="text_query", height=90)
    if st.button("Find features", key="find_features") and text.strip():
        if live_or_warn(store, "Live search"):
            tokens, acts = live_activations(store, text)
            peak = acts.max(axis=0)
            ranked = np.argsort(-peak)[:20]
            ranked = ranked[peak[ranked] > 0]
            st.session_state["text_hits"] = pd.DataFrame(
                {
                    "feature": ranked,
                    "max_activation": peak[ranked],
                    "on_token": [visible_token(tokens[int(acts[:, f].argmax())]) for f in ranked],
                    "tokens_fired": (acts[:, ranked] > 0).sum(axis=0),
                }
            )
    if "text_hits" in st.session_state:
        clickable(with_texts(st.session_state["text_hits"]), "text_hits_table")

st.subheader("All features")
left, middle, right = st.columns(3)
order = left.selectbox("Sort by", ["density", "max_activation", "mean_activation", "feature"], key="order_by")
descending = middle.toggle("Descending", value=True, key="descending")
low, high = right.slider("log10 density", -8.0, 0.0, (-8.0, 0.0), step=0.5, key="density_range")
table = store.features(
    order, descending, min_density=10**low if low > -8 else 0.0, max_density=10**high, limit=5000
)
st.caption(f"{len(table):,} features (at most 5,000 shown); click a row to open it")
clickable(with_texts(table), "feature_table", height=420)
