"""Entry point of the explorer (`workbench explore` runs `streamlit run` on this file).

The sidebar's links are drawn here rather than by Streamlit's navigation so that each carries
the store (and the Feature link the last feature seen): a move between pages is then one
browser-history entry whose URL names what it shows, and Back returns to the page before."""

import streamlit as st

from app.explorer.data import page_params

st.set_page_config(page_title="Workbench explorer", layout="wide")
pages = [
    st.Page("views/runs.py", title="Runs", default=True),
    st.Page("views/features.py", title="Features"),
    st.Page("views/feature.py", title="Feature", url_path="feature"),
    st.Page("views/circuits.py", title="Circuits"),
    st.Page("views/steering.py", title="Steering"),
]
navigation = st.navigation(pages, position="hidden")
with st.sidebar:
    for page in pages:
        st.page_link(page, query_params=page_params(feature_page=page.url_path == "feature"))
navigation.run()
