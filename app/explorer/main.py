"""Entry point of the explorer (`workbench explore` runs `streamlit run` on this file)."""

import streamlit as st

st.set_page_config(page_title="Workbench explorer", layout="wide")
navigation = st.navigation(
    [
        st.Page("views/runs.py", title="Runs", default=True),
        st.Page("views/features.py", title="Features"),
        st.Page("views/feature.py", title="Feature", url_path="feature"),
        st.Page("views/circuits.py", title="Circuits"),
        st.Page("views/steering.py", title="Steering"),
    ]
)
navigation.run()
