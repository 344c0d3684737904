"""Runs: every store found, side by side with its run's metrics (FVU, L0, CE and KL scores, dead
features), a plot of sparsity against reconstruction, and the choice of the store the other
pages show (it goes into the URL, `?store=NAME`)."""

import pandas as pd
import plotly.express as px
import streamlit as st

from app.explorer.data import (
    cached,
    choose_store,
    open_store,
    selected_store,
    store_key,
    store_names,
    store_roots,
)
from workbench.store import StoreError

METRICS = {  # column: (meta metrics key, what it is)
    "FVU": ("fvu", "fraction of variance unexplained (lower is better)"),
    "L0": ("l0", "active features per token"),
    "CE score": ("ce_loss_score", "1 = spliced model as good as the clean one, 0 = as bad as ablating"),
    "KL score": ("kl_score", "1 = no KL divergence from the clean model, 0 = as much as ablating"),
    "KL": ("kl_sae", "KL(clean || spliced) per token, nats"),
}


@cached("cache_data", ttl=60, show_spinner=False)
def run_row(name: str, path: str) -> dict:
    """One store's row: what it was made from and its metrics; dead % counts the features that
    never fired on the analyzed tokens (from the store's features table)."""
    store = open_store(path)
    meta, metrics = store.meta, store.meta.get("metrics") or {}
    dead = len(store.features(max_density=0.0, limit=max(store.n_latents, 1)))
    return {
        "store": name,
        "architecture": meta.get("architecture"),
        "latents": meta.get("n_latents"),
        "k": meta.get("k"),
        **{column: _number(metrics.get(key)) for column, (key, _) in METRICS.items()},
        "dead %": 100.0 * dead / store.n_latents if store.n_latents else None,
        "hook": meta.get("hook"),
        "model": meta.get("model"),
        "tokens analyzed": meta.get("tokens_analyzed"),
        "path": path,
    }


def _number(value):
    return float(value) if isinstance(value, (int, float)) else None


st.title("Runs")
names = store_names(tuple(store_roots()))
if not names:
    st.info(f"No feature store under {', '.join(store_roots())}. Build one with `workbench analyze RUN`.")
    st.stop()

rows = []
for name, path in names.items():
    try:
        rows.append(run_row(name, path))
    except StoreError as exc:
        st.warning(str(exc))
table = pd.DataFrame(rows)
help_text = {column: what for column, (_, what) in METRICS.items()}
st.dataframe(
    table,
    key="runs_table",
    hide_index=True,
    width="stretch",
    column_config={
        **{c: st.column_config.NumberColumn(c, help=h, format="%.4g") for c, h in help_text.items()},
        "dead %": st.column_config.NumberColumn(
            "dead %", help="never fired on the analyzed tokens", format="%.1f"
        ),
    },
)
if len(table) > 1:
    y = st.radio("Against L0", ["FVU", "CE score", "KL score", "dead %"], horizontal=True, key="runs_y")
    plotted = table.dropna(subset=["L0", y])
    if len(plotted):
        figure = px.scatter(
            plotted, x="L0", y=y, color="architecture", hover_name="store", text="store",
            hover_data=["FVU", "CE score", "KL score", "dead %", "latents"],
        )  # fmt: skip
        figure.update_traces(textposition="top center").update_layout(height=340, margin=dict(t=20, b=40))
        st.plotly_chart(figure, key="runs_plot")
    else:
        st.caption(f"No store has both L0 and {y} in its metrics (run `workbench eval`).")


def _chosen() -> None:
    choose_store(names[st.session_state["run_choice"]])


if rows:
    current = selected_store()  # the URL's or the session's store (and puts it in the URL)
    keys = [row["store"] for row in rows]
    current_key = store_key(current.path) if current is not None else keys[0]
    st.session_state["run_choice"] = current_key if current_key in keys else keys[0]  # follows the URL
    st.selectbox("Store to explore", keys, key="run_choice", on_change=_chosen)
    st.page_link(
        "views/features.py",
        label="Browse its features →",
        query_params={"store": st.session_state["run_choice"]},
    )
