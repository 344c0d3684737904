"""Features: a sortable, filterable table; search by token and by free text."""

import numpy as np
import pandas as pd
import streamlit as st

from app.explorer.data import go_to_feature, live_activations, live_or_warn, selected_store

store = selected_store()
if store is None:
    st.stop()
meta = store.meta
st.title(f"Features · {meta['architecture']} · {meta['hook']}")
st.caption(f"{meta['n_latents']:,} features, {meta['tokens_analyzed']:,} tokens analyzed · {store.path}")

by_token, by_text = st.columns(2)
with by_token:
    query = st.text_input("Search by token", key="token_query", placeholder="e.g. ' the' or 'ROMEO'")
    if query:
        hits = store.search_tokens(query)
        st.write(f"{len(hits)} features whose top examples peak on a token containing {query!r}")
        st.dataframe(hits, hide_index=True, key="token_hits")
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
                    "on_token": [tokens[int(acts[:, f].argmax())] for f in ranked],
                    "tokens_fired": (acts[:, ranked] > 0).sum(axis=0),
                }
            )
    if "text_hits" in st.session_state:
        st.dataframe(st.session_state["text_hits"], hide_index=True, key="text_hits_table")

st.subheader("All features")
left, middle, right = st.columns(3)
order = left.selectbox("Sort by", ["density", "max_activation", "mean_activation", "feature"], key="order_by")
descending = middle.toggle("Descending", value=True, key="descending")
low, high = right.slider("log10 density", -8.0, 0.0, (-8.0, 0.0), step=0.5, key="density_range")
table = store.features(
    order, descending, min_density=10**low if low > -8 else 0.0, max_density=10**high, limit=5000
)
event = st.dataframe(
    table,
    hide_index=True,
    on_select="rerun",
    selection_mode="single-row",
    key="feature_table",
    width="stretch",
    height=360,
)
chosen = event.selection.rows if event is not None else []
pick, go = st.columns([3, 1])
number = pick.number_input(
    "Open feature", min_value=0, max_value=store.n_latents - 1, step=1, key="open_number"
)
if chosen:
    go_to_feature(int(table.iloc[chosen[0]].feature))
if go.button("Open", key="open_feature"):
    go_to_feature(int(number))
