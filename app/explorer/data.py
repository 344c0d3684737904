"""What the pages share: the stores, the selected store and feature, and the live model."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import streamlit as st

from app.explorer.formats import escape_markdown, shorten
from app.explorer.launch import DEVICE_ENV, STORES_ENV
from workbench.errors import WorkbenchError
from workbench.store import STORE_FILE, FeatureStore, StoreError, find_stores

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


# --- stores and their names in links ------------------------------------------------------
@cached("cache_data", ttl=30, show_spinner=False)
def store_names(roots: tuple[str, ...]) -> dict[str, str]:
    """{name: store path} for every store under `roots`, in order. A name is the store's path
    relative to its root, without a trailing `/features.duckdb` (or `.duckdb`), e.g. `demo/topk`;
    a store that is itself a root is named by its folder. A name already taken falls back to
    the store's index."""
    names: dict[str, str] = {}
    for root in map(Path, roots):
        for path in find_stores([root]):
            path_text = os.path.realpath(path)
            if path_text in names.values():
                continue
            name = _name_in(path, root)
            names[name if name not in names else str(len(names))] = path_text
    return names


def _name_in(path: Path, root: Path) -> str:
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    relative = relative.parent if relative.name == STORE_FILE else relative.with_suffix("")
    name = relative.as_posix()
    if name in ("", "."):
        name = root.name if root.is_dir() else path.parent.name
    return name


@cached("cache_data", ttl=30, show_spinner=False)
def store_paths(roots: tuple[str, ...]) -> list[str]:
    """Every store path under `roots` (absolute), in the order of `store_names`."""
    return list(store_names(roots).values())


def store_key(path: str | os.PathLike) -> str:
    """The short name of the store at `path` for `?store=` (see `store_names`); a store outside
    the explorer's roots (named by a circuit, say) is named by its absolute path."""
    path_text = os.path.realpath(path)
    for name, known in store_names(tuple(store_roots())).items():
        if known == path_text:
            return name
    return path_text


def store_from_key(key: str) -> str | None:
    """The store path a `?store=` value names: a name from `store_names`, an index into them, or
    an absolute path to a `.duckdb` file on this machine; None when it names none."""
    names = store_names(tuple(store_roots()))
    key = str(key).strip()
    if key in names:
        return names[key]
    if key.isdigit() and int(key) < len(names):
        return list(names.values())[int(key)]
    if os.path.isabs(key) and key.endswith(".duckdb") and os.path.isfile(key):
        return os.path.realpath(key)
    return None


@cached("cache_resource", show_spinner=False)
def open_store(path: str) -> FeatureStore:
    return FeatureStore(path)


def choose_store(path: str) -> None:
    """Make `path` the store every page shows (session and URL)."""
    st.session_state["store"] = os.path.realpath(path)
    st.query_params["store"] = store_key(path)


def selected_store() -> FeatureStore | None:
    """The store the URL names (`?store=`), else the one chosen in this session, else the first
    found; the URL is then made to name it. Shows a one-line error (and returns None) for a
    `?store=` that names no store here, or for a store that cannot be read."""
    key = st.query_params.get("store")
    if key:
        path = store_from_key(key)
        if path is None:
            known = ", ".join(store_names(tuple(store_roots()))) or "none"
            st.error(f"No store named {key!r} here (stores: {known}).")
            return None
    else:
        paths = store_paths(tuple(store_roots()))
        path = st.session_state.get("store") or (paths[0] if paths else None)
    if path is None:
        st.info("No feature store found. Build one with `workbench analyze RUN`.")
        return None
    path = os.path.realpath(path)
    st.session_state["store"] = path
    if st.query_params.get("store") != (name := store_key(path)):
        st.query_params["store"] = name
    try:
        return open_store(path)
    except StoreError as exc:
        st.error(str(exc))
        return None


# --- feature descriptions, links and navigation -------------------------------------------
# Pages talk through plain session keys (never widget keys, which Streamlit drops when their
# page is not drawn): "store" (a store path), "feature_id" (a request to open a feature; the
# Feature page takes it), "steer_features" ([ids]) and "steer_strength" (in units of each
# feature's max activation), read by the Steering page.
def describe_feature(store: FeatureStore, feature: int) -> str:
    """What to print next to a feature id: the user's label, else its explanation, else its
    data-derived summary ('' when it has none)."""
    return descriptions(store, [feature]).get(int(feature), "")


def descriptions(store: FeatureStore, features=None) -> dict[int, str]:
    """{feature: description} (see `describe_feature`) for `features` (all when None), read
    once per call from the labels, explanations and summaries."""
    summaries = store.summaries(None if features is None else [int(f) for f in features])
    labels, explained = _labels(store), _explanations(store)
    out = {}
    for feature, summary in summaries.items():
        label = labels.get(feature, {}).get("label", "")
        explanation = explained.get(feature, {}).get("explanation", "")
        out[feature] = label or explanation or summary
    return out


def _labels(store: FeatureStore) -> dict[int, dict]:
    try:
        return store.labels.all()
    except WorkbenchError:  # a damaged labels file: the label editor says so; tables go on
        return {}


def _explanations(store: FeatureStore) -> dict[int, dict]:
    try:
        return store.explanations()
    except WorkbenchError:
        return {}


def feature_title(store: FeatureStore, feature: int, note: str = "", width: int = 60) -> str:
    """`#12 · KING ×14 → EDWARD`, or with a note `#12 (cos 0.41) · KING ×14 → EDWARD` (the note
    first, so a narrow column cuts the description, not the score)."""
    head = f"#{int(feature)}" + (f" ({note})" if note else "")
    text = describe_feature(store, feature)
    return f"{head} · {shorten(text, width)}" if text else head


def feature_chip(store: FeatureStore, feature: int, key: str, note: str = "", here: bool = False) -> None:
    """A button `#id (note) · description` that opens `feature` (the full description on hover).
    `here`: the caller is the Feature page, which the button reruns on the new feature (no page
    switch, one history entry); elsewhere it switches to the Feature page."""
    label = escape_markdown(feature_title(store, feature, note))
    help_text = escape_markdown(describe_feature(store, feature)) or None
    if here:
        st.button(label, key=key, help=help_text, type="tertiary", on_click=show_feature, args=(feature,))
    elif st.button(label, key=key, help=help_text, type="tertiary"):
        go_to_feature(feature)


def feature_url(store_path: str, feature: int) -> str:
    """The feature page's link, relative to the app: `feature?store=NAME&feature=N`."""
    from urllib.parse import urlencode

    return "feature?" + urlencode({"store": store_key(store_path), "feature": int(feature)})


def go_to_feature(feature: int, store: str | None = None) -> None:
    """Open the Feature page on `feature` (of `store`, a path; else the session's store), with
    both in the URL (a new browser-history entry). Call from the script body, not a callback."""
    if store:
        st.session_state["store"] = os.path.realpath(store)
    path = st.session_state.get("store")
    params = {"feature": str(int(feature))}
    if path:
        params["store"] = store_key(path)
    st.session_state.pop("feature_id", None)
    st.switch_page("views/feature.py", query_params=params)


def page_params(feature_page: bool = False) -> dict[str, str]:
    """The query a link to another page carries: the current store's name and, for the Feature
    page, the last feature seen in that store ({} before any store is known)."""
    key = st.query_params.get("store")
    path = (store_from_key(key) if key else None) or st.session_state.get("store")
    if not path:
        return {}
    params = {"store": store_key(path)}
    last = st.session_state.get("last_feature", {}).get(os.path.realpath(path))
    if feature_page and last is not None:
        params["feature"] = str(last)
    return params


def show_feature(feature: int) -> None:
    """A callback on the Feature page: rerun it on `feature` (the URL changes, so Back returns)."""
    st.session_state.pop("feature_id", None)
    st.query_params["feature"] = str(int(feature))


def go_to_steering(feature: int, strength: float = 1.0) -> None:
    """Open the Steering page on `feature` at `strength` x its max activation."""
    st.session_state["steer_features"] = [int(feature)]
    st.session_state["steer_strength"] = float(strength)
    st.switch_page("views/steering.py")


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
