"""Front ends: the `workbench` CLI and the Streamlit explorer. May import every layer."""
