"""One feature: statistics, histogram, examples, logit effects, neighbours, a live box."""

import streamlit as st

from app.explorer.data import go_to_steering, live_activations, live_or_warn, selected_store, show_feature
from app.explorer.plots import highlight_html, histogram_figure, logit_figure
from workbench.store import StoreError

store = selected_store()
if store is None:
    st.stop()

if "feature_id" not in st.session_state:
    from_url = st.query_params.get("feature", "")
    st.session_state["feature_id"] = (
        int(from_url) if from_url.isdigit() else int(store.features(limit=1).feature[0])
    )
feature = int(
    st.number_input(
        "Feature",
        min_value=0,
        max_value=store.n_latents - 1,
        step=1,
        value=min(int(st.session_state["feature_id"]), store.n_latents - 1),
    )
)
st.session_state["feature_id"] = feature
st.query_params["feature"] = str(feature)
try:
    page = store.feature(feature)
except StoreError as exc:
    st.error(str(exc))
    st.stop()

st.title(f"Feature {feature}")
a, b, c, d = st.columns(4)
a.metric("density", f"{page.density:.3%}")
b.metric("fired on", f"{page.fired:,} tokens")
c.metric("mean activation", f"{page.mean_activation:.3g}")
d.metric("max activation", f"{page.max_activation:.3g}")
if st.button("Steer with this feature →", key="steer_this"):
    go_to_steering(feature)

left, right = st.columns([3, 2])
with left:
    st.plotly_chart(histogram_figure(store.histogram_edges(), page.histogram), key="histogram")
    st.subheader("Top activations")
    if not page.top:
        st.write("This feature never fired on the analyzed tokens.")
    for example in page.top:
        st.html(
            highlight_html(
                store.token_texts(example.tokens),
                example.activations,
                page.max_activation,
                peak=example.position - example.start,
            )
        )
    st.subheader("Quantile groups")
    for group in sorted({e.bin for e in page.quantiles}, reverse=True):
        members = [e for e in page.quantiles if e.bin == group]
        low, high = min(e.activation for e in members), max(e.activation for e in members)
        with st.expander(
            f"group {group + 1}: activations {low:.3g} – {high:.3g}",
            expanded=group == max(e.bin for e in page.quantiles),
        ):
            for example in members:
                st.html(
                    highlight_html(
                        store.token_texts(example.tokens),
                        example.activations,
                        page.max_activation,
                        peak=example.position - example.start,
                    )
                )
with right:
    logits = page.logits
    if logits.empty:
        st.caption("No logit effects: the hook is not of the residual stream's width.")
    for side, title in (("top", "Top logit effects"), ("bottom", "Bottom logit effects")):
        part = logits[logits.side == side]
        if not part.empty:
            st.plotly_chart(
                logit_figure(part.text.tolist(), part.token.tolist(), part.effect.tolist(), title),
                key=f"logits_{side}",
            )
    st.subheader("Decoder neighbours")
    for row in page.neighbours.itertuples():
        st.button(
            f"feature {row.other} · cosine {row.cosine:.3f}",
            key=f"neighbour_{row.other}",
            on_click=show_feature,
            args=(row.other,),
        )
    st.subheader("Correlated neurons")
    st.dataframe(page.neurons, hide_index=True)
    st.subheader("Co-occurring features")
    st.dataframe(page.cooccurrence, hide_index=True)

st.subheader("Try it on your text")
text = st.text_area("Text", value="", key="live_text", height=80)
if st.button("Run", key="live_run") and text.strip():
    if live_or_warn(store, "The live box"):
        tokens, acts = live_activations(store, text)
        column = acts[:, feature]
        st.html(highlight_html(tokens, column, max(page.max_activation, float(column.max()))))
        st.caption(
            f"max activation on your text: {column.max():.3g} "
            f"(fired on {(column > 0).sum()} of {len(tokens)} tokens)"
        )
