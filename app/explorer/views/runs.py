"""Runs: every store found, with its run's metrics; pick the one the other pages show."""

import pandas as pd
import streamlit as st

from app.explorer.data import open_store, store_paths, store_roots
from workbench.store import StoreError

st.title("Runs")
paths = store_paths(tuple(store_roots()))
if not paths:
    st.info(f"No feature store under {', '.join(store_roots())}. Build one with `workbench analyze RUN`.")
    st.stop()

rows = []
for path in paths:
    try:
        meta = open_store(path).meta
    except StoreError as exc:
        st.warning(str(exc))
        continue
    metrics = meta.get("metrics", {})
    rows.append(
        {
            "store": path,
            "model": meta.get("model"),
            "hook": meta.get("hook"),
            "architecture": meta.get("architecture"),
            "latents": meta.get("n_latents"),
            "k": meta.get("k"),
            "tokens": meta.get("tokens_analyzed"),
            **{m: metrics.get(m) for m in ("fvu", "l0", "ce_loss_score", "kl_score")},
        }
    )
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
readable = [row["store"] for row in rows]
if readable:
    current = st.session_state.get("store")
    chosen = st.selectbox(
        "Store to explore", readable, index=readable.index(current) if current in readable else 0
    )
    st.session_state["store"] = chosen
    st.page_link("views/features.py", label="Browse its features →")
