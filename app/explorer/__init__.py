"""The Streamlit explorer: runs, features, feature pages, circuits, steering. Reads stores; never trains."""
