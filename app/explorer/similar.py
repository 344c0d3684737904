"""Features of another store of the same hook that are most like one feature of this store, by
the cosine of their decoder directions (the rows of both dictionaries' W_dec), as Neuronpedia's
and SAEDashboard's cross-dictionary "similar features" lists do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from app.explorer.data import (
    cached,
    describe_feature,
    go_to_feature,
    open_store,
    store_key,
    store_paths,
    store_roots,
)
from app.explorer.formats import escape_markdown, shorten
from workbench.errors import WorkbenchError
from workbench.store import FeatureStore

TOP = 8


@cached("cache_resource", max_entries=8, show_spinner="Reading the decoder ...")
def unit_decoder(folder: str) -> np.ndarray:
    """The dictionary at `folder`'s decoder rows scaled to unit length, [n_latents, d_in] float32,
    on the CPU. Raises DictionaryError for a folder it cannot read."""
    import sae

    rows = sae.load(folder, device="cpu").W_dec.detach().float().numpy()
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def same_hook_stores(store: FeatureStore, paths: list[str]) -> list[str]:
    """The stores among `paths`, other than `store`, made at the same hook of the same model."""
    found = []
    for path in paths:
        if Path(path).resolve() == store.path.resolve():
            continue
        try:
            meta = open_store(path).meta
        except WorkbenchError:
            continue
        if meta.get("hook") == store.meta.get("hook") and meta.get("model") == store.meta.get("model"):
            found.append(path)
    return found


def why_not_comparable(store: FeatureStore, other: FeatureStore) -> str:
    """'' when both stores' dictionary folders are on this machine, else why not."""
    for each in (store, other):
        folder = each.meta.get("dictionary_path")
        if not folder or not Path(folder).is_dir():
            return f"the dictionary folder {folder!r} of {store_key(each.path)} is not on this machine"
    return ""


def similar_features(store: FeatureStore, other: FeatureStore, feature: int, top: int = TOP):
    """[(other feature, cosine)] of the `top` decoder rows of `other` closest to `feature`'s
    row in `store`, highest cosine first. Raises WorkbenchError when a dictionary cannot be read
    or the two are of different widths."""
    mine = unit_decoder(store.meta["dictionary_path"])
    theirs = unit_decoder(other.meta["dictionary_path"])
    if mine.shape[1] != theirs.shape[1]:
        raise WorkbenchError(f"the dictionaries' widths differ ({mine.shape[1]} vs {theirs.shape[1]})")
    cosine = theirs @ mine[int(feature)]
    order = np.argsort(-cosine, kind="stable")[:top]
    return [(int(i), float(cosine[i])) for i in order]


def show_similar(store: FeatureStore, feature: int) -> None:
    """On demand: the most similar features of another store of the same hook, as buttons that
    open them there."""
    others = same_hook_stores(store, store_paths(tuple(store_roots())))
    if not others:
        st.caption("No other store of this hook to compare with.")
        return
    if not st.toggle("Similar features in another store", key="similar_on"):
        return
    chosen = st.selectbox("Store", others, format_func=store_key, key="similar_store")
    other = open_store(chosen)
    why = why_not_comparable(store, other)
    if why:
        st.caption(f"Cannot compare decoders: {why}.")
        return
    try:
        pairs = similar_features(store, other, feature)
    except WorkbenchError as exc:
        st.error(str(exc))
        return
    for other_feature, cosine in pairs:
        text = shorten(describe_feature(other, other_feature), 50)
        label = escape_markdown(f"#{other_feature} (cos {cosine:.2f}) · {text}")
        if st.button(label, key=f"similar_{other_feature}", type="tertiary"):
            go_to_feature(other_feature, store=chosen)
