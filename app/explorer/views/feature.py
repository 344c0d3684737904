"""One feature, as Neuronpedia shows it and more: its description (label, explanation, summary),
statistics, activation histogram, top and quantile examples (wrapped, each with its activation,
longer contexts on demand), logit effects, related features (all clickable), a label editor,
similar features in another store, the live box, and a jump to steering. For an attention-output
(hook_z) dictionary, its decoder weight per head and the source tokens that drive an example.

The URL names the store and the feature (`?store=NAME&feature=N`) and every move to another
feature sets it, so Back returns to the previous feature and a link opens the same page."""

import os

import streamlit as st

from app.explorer.data import (
    describe_feature,
    go_to_steering,
    live_activations,
    live_or_warn,
    selected_store,
    show_feature,
    store_key,
)
from app.explorer.feature_sections import (
    feature_page,
    label_editor,
    show_examples,
    show_explanation,
    show_logits,
    show_related,
)
from app.explorer.formats import escape_markdown, format_activation, format_density, parse_feature_id
from app.explorer.head_sections import show_heads
from app.explorer.plots import highlight_html, histogram_figure
from app.explorer.similar import show_similar
from workbench.store import StoreError

store = selected_store()
if store is None:
    st.stop()
path = os.path.realpath(store.path)
last_seen = st.session_state.setdefault("last_feature", {})

pending = st.session_state.pop("feature_id", None)  # another page asked for a feature
if pending is not None:
    st.query_params["feature"] = str(pending)
raw = st.query_params.get("feature")
if raw is None:  # a bare link, or a page Streamlit reached without its query: the last one seen
    raw = str(last_seen.get(path, int(store.features(limit=1).feature[0]) if store.n_latents else 0))
    st.query_params["feature"] = raw
feature, problem = parse_feature_id(raw, store.n_latents)


def _typed() -> None:
    if st.session_state.get("feature_box") is not None:
        show_feature(int(st.session_state["feature_box"]))


st.session_state["feature_box"] = feature  # follows the URL (Back, links) before it is drawn
st.number_input(
    "Feature", min_value=0, max_value=max(store.n_latents - 1, 0), step=1, key="feature_box", on_change=_typed
)
if problem:
    st.error(problem)
    st.stop()
last_seen[path] = feature
try:
    page = feature_page(path, feature)
except StoreError as exc:
    st.error(str(exc))
    st.stop()

st.title(f"Feature {feature}")
where = (  # a transcoder's store records the hook it writes, too
    f"transcoder: reads {store.meta.get('hook', '')}, writes {store.meta['out_hook']}"
    if store.meta.get("out_hook")
    else f"at {store.meta.get('hook', '')}"
)
st.caption(  # with several stores open, a clicked similar feature may be in another one
    f"store {store_key(store.path)} · {store.meta.get('architecture', '')} {where} "
    f"· {store.n_latents:,} features"
)
description = describe_feature(store, feature)
if description:
    st.markdown(f"### {escape_markdown(description)}")
st.markdown(
    f"**density** {format_density(page.density)} &nbsp;·&nbsp; **fired on** {page.fired:,} tokens "
    f"&nbsp;·&nbsp; **mean activation** {format_activation(page.mean_activation)} "
    f"&nbsp;·&nbsp; **max activation** {format_activation(page.max_activation)}"
)
show_explanation(store, page, shown=description)

scale_box, steer_button, _ = st.columns([2, 1, 4], vertical_alignment="bottom")
scale = scale_box.number_input(
    "steering strength (× max activation)",
    value=1.0,
    step=0.5,
    key="steer_scale",
    help=f"1 = the max activation on the analyzed tokens, {format_activation(page.max_activation)}",
)
if steer_button.button("Steer →", key="steer_this"):
    go_to_steering(feature, scale)

left, right = st.columns([3, 2])
with left:
    st.plotly_chart(histogram_figure(store.histogram_edges(), page.histogram), key="histogram")
    show_heads(store, page)  # hook_z stores only
    show_examples(store, page)
with right:
    show_logits(page)
    show_related(store, page)
    with st.expander("Your label and notes", expanded=False):
        label_editor(store, feature)
    show_similar(store, feature)

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
