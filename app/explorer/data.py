"""What the pages share: the stores, the selected store and feature, and the live model."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import streamlit as st

from app.explorer.launch import DEVICE_ENV, STORES_ENV
from workbench.store import FeatureStore, StoreError, find_stores

MAX_LIVE_TOKENS = 256


def cached(kind: str, **options):
    """`st.cache_data` / `st.cache_resource`, applied on the first call: decorating at import
    time would need Streamlit's runtime (and warns without one), and importing runs nothing."""

    def wrap(fn):
        made = None

        @functools.wraps(fn)
        def call(*args):
            nonlocal made
            if made is None:
                made = getattr(st, kind)(**options)(fn)
            return made(*args)

        return call

    return wrap


def store_roots() -> list[str]:
    value = os.environ.get(STORES_ENV, "")
    return [p for p in value.split(os.pathsep) if p] or ["runs"]


@cached("cache_data", ttl=30, show_spinner=False)
def store_paths(roots: tuple[str, ...]) -> list[str]:
    return [str(p) for p in find_stores(list(roots))]


@cached("cache_resource", show_spinner=False)
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


def clicked_feature(circuit, points: list) -> tuple[str | None, int] | None:
    """(store, feature) of the first clicked feature node of a circuit graph, else None."""
    nodes = {n.id: n for n in circuit.nodes}
    for point in points:
        node = nodes.get(point.get("customdata"))
        if node is not None and node.kind == "feature" and node.feature is not None:
            return node.store, int(node.feature)
    return None


def live_device():
    """The torch.device of the live model and dictionaries: `workbench explore --device` (passed
    in DEVICE_ENV), auto when unset. Raises DeviceError for a device this machine lacks."""
    from workbench.devices import resolve_device

    return resolve_device(os.environ.get(DEVICE_ENV) or "auto")


@cached("cache_resource", show_spinner="Loading the model ...")
def live_model(spec: str):
    """The model `spec` on the live device."""
    from workbench.models import load_model

    return load_model(spec, device=live_device())


@cached("cache_resource", show_spinner="Loading the dictionary ...")
def live_dictionary(path: str):
    """The dictionary folder `path` on the live device (where the live model runs)."""
    import sae

    return sae.load(path).to(live_device())


def live_available(store: FeatureStore) -> str:
    """'' when the store's dictionary and model can be loaded, else why not."""
    path = store.meta.get("dictionary_path")
    if not path or not Path(path).exists():
        return f"the dictionary folder {path!r} is not on this machine"
    return ""


def live_or_warn(store: FeatureStore, what: str) -> bool:
    """True when the live model and dictionary can run; else a warning saying why `what` cannot."""
    why_not = live_available(store)
    if why_not:
        st.warning(f"{what} needs the model and dictionary: {why_not}.")
    return not why_not


def live_activations(store: FeatureStore, text: str) -> tuple[list[str], np.ndarray]:
    """Token strings of `text` and every feature's activation on each token, [tokens, features]
    (the BOS position is shown with zeros: dictionaries are trained and analyzed without it)."""
    import torch

    model = live_model(store.meta["model"])
    dictionary = live_dictionary(store.meta["dictionary_path"])
    tokens = model.tokenize(text)[:, :MAX_LIVE_TOKENS]
    with torch.no_grad():
        x = model.run_with_cache(tokens, [store.meta["hook"]])[store.meta["hook"]][0]
        acts = dictionary.encode(x).to_dense().cpu().numpy()
    acts[0] = 0.0
    return model.to_str_tokens(tokens[0]), acts
