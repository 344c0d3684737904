"""What the pages share: the stores, the selected store and feature, and the live model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import streamlit as st

from app.explorer.launch import STORES_ENV
from workbench.store import FeatureStore, StoreError, find_stores

MAX_LIVE_TOKENS = 256


def store_roots() -> list[str]:
    value = os.environ.get(STORES_ENV, "")
    return [p for p in value.split(os.pathsep) if p] or ["runs"]


@st.cache_data(ttl=30, show_spinner=False)
def store_paths(roots: tuple[str, ...]) -> list[str]:
    return [str(p) for p in find_stores(list(roots))]


@st.cache_resource(show_spinner=False)
def open_store(path: str) -> FeatureStore:
    return FeatureStore(path)


def selected_store() -> FeatureStore | None:
    """The store chosen on the Runs page (or in the URL), else the first one found."""
    paths = store_paths(tuple(store_roots()))
    wanted = st.session_state.get("store") or st.query_params.get("store")
    if wanted not in paths:
        wanted = paths[0] if paths else None
    if wanted is None:
        st.info("No feature store found. Build one with `workbench analyze RUN`.")
        return None
    st.session_state["store"] = wanted
    try:
        return open_store(wanted)
    except StoreError as exc:
        st.error(str(exc))
        return None


# Pages talk through plain session keys (never widget keys, which Streamlit drops when their
# page is not drawn): "store", "feature_id", "steer_features".
def go_to_feature(feature: int) -> None:
    st.session_state["feature_id"] = int(feature)
    st.switch_page("views/feature.py")


def go_to_steering(feature: int) -> None:
    st.session_state["steer_features"] = [int(feature)]
    st.switch_page("views/steering.py")


def show_feature(feature: int) -> None:
    """A button callback: the feature page shows `feature` on the rerun."""
    st.session_state["feature_id"] = int(feature)


@st.cache_resource(show_spinner="Loading the model ...")
def live_model(spec: str):
    from workbench.models import load_model

    return load_model(spec)


@st.cache_resource(show_spinner="Loading the dictionary ...")
def live_dictionary(path: str):
    import sae

    return sae.load(path)


def live_available(store: FeatureStore) -> str:
    """'' when the store's dictionary and model can be loaded, else why not."""
    path = store.meta.get("dictionary_path")
    if not path or not Path(path).exists():
        return f"the dictionary folder {path!r} is not on this machine"
    return ""


def live_activations(store: FeatureStore, text: str) -> tuple[list[str], np.ndarray]:
    """Token strings of `text` and every feature's activation on each token, [tokens, features]
    (the BOS position is shown with zeros: dictionaries are trained and analyzed without it)."""
    import torch

    model = live_model(store.meta["model"])
    dictionary = live_dictionary(store.meta["dictionary_path"])
    tokens = model.tokenize(text)[:, :MAX_LIVE_TOKENS]
    with torch.no_grad():
        x = model.run_with_cache(tokens, [store.meta["hook"]])[store.meta["hook"]][0]
        acts = dictionary.encode(x).to_dense().numpy()
    acts[0] = 0.0
    return model.to_str_tokens(tokens[0]), acts
