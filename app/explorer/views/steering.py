"""Steering playground: add features at chosen strengths; baseline and steered side by side."""

import streamlit as st

from app.explorer.data import live_dictionary, live_model, live_or_warn, selected_store

store = selected_store()
if store is None:
    st.stop()
st.title("Steering")
if not live_or_warn(store, "Steering"):
    st.stop()

features = st.multiselect(
    "Features", list(range(store.n_latents)), default=st.session_state.get("steer_features", [])
)
st.session_state["steer_features"] = features
strengths = {
    f: st.number_input(f"strength of feature {f}", value=8.0, step=1.0, key=f"strength_{f}") for f in features
}
prompt = st.text_input("Prompt", value="ROMEO:", key="steer_prompt")
left, middle, right = st.columns(3)
tokens = left.slider("New tokens", 5, 100, 30, key="steer_tokens")
seed = middle.number_input("Seed", value=0, step=1, key="steer_seed")
sample = right.toggle("Sample (else greedy)", value=True, key="steer_sample")
if st.button("Generate", key="steer_generate", disabled=not features):
    from sae.steering import add, generate_pair

    model = live_model(store.meta["model"])
    dictionary = live_dictionary(store.meta["dictionary_path"])
    edits = [add(dictionary, f, s) for f, s in strengths.items()]
    baseline, steered = generate_pair(
        model, edits, prompt, max_new_tokens=tokens, seed=int(seed), do_sample=sample
    )
    st.session_state["steer_result"] = (baseline, steered, ", ".join(e.label for e in edits))
if "steer_result" in st.session_state:
    baseline, steered, label = st.session_state["steer_result"]
    a, b = st.columns(2)
    a.subheader("Baseline")
    a.text(baseline)
    b.subheader(f"Steered ({label})")
    b.text(steered)
