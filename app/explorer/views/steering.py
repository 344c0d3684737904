"""Steering: every edit of `sae.steering` (add, clamp, ablate, a decoder direction or a difference of
two, codebook codes on/off) at chosen positions, strengths in units of each feature's max
activation; baseline and steered text side by side with the steering report; a dose-response sweep
(`sae.dose_response`) with its figure."""

import time
from dataclasses import dataclass

import pandas as pd
import streamlit as st

from app.explorer.data import (
    cached,
    descriptions,
    live_dictionary,
    live_model,
    live_or_warn,
    open_store,
    selected_store,
)
from workbench.errors import WorkbenchError

EDITS = {
    "add": "add  (x + s·d_f)",
    "clamp": "clamp  (hold a_f at s)",
    "ablate": "ablate  (a_f = 0)",
    "direction": "direction  (x + s·(d_A − d_B))",
    "code_on": "code on",
    "code_off": "code off",
}
# Edits with a strength (in units of the feature's max activation) and a dose-response sweep
# (a comment: Streamlit's magic would print a bare string here on the page).
SCALED = ("add", "clamp", "direction")
POSITIONS = {
    "all": "all positions",
    "prompt": "the prompt only",
    "generated": "generated tokens only",
}
NEUTRAL = "The house stood at the end of the road, and in the morning the people went out to their work."


@cached("cache_data", show_spinner=False)
def max_activations(path: str) -> dict[int, float]:
    """{feature: max activation} over the store's analysis tokens."""
    store = open_store(path)
    table = store.features(order_by="feature", descending=False, limit=store.n_latents)
    return dict(zip(table.feature.tolist(), table.max_activation.astype(float).tolist()))


def scale_of(feature: int) -> float:
    """The unit of strength for `feature`: its max activation (1.0 for a feature that never fired)."""
    value = max_activations(str(store.path)).get(int(feature), 0.0)
    return value if value > 0 else 1.0


def title(feature) -> str:
    text = names.get(int(feature), "")
    return f"#{int(feature)} · {text[:50]}" if text else f"#{int(feature)}"


def strength_input(feature: int, key: str, label: str) -> float:
    """A strength in units of the feature's max activation; returns the absolute value."""
    unit = scale_of(feature)
    default = float(st.session_state.get("steer_strength", 1.0))
    units = st.number_input(label, value=default, step=0.5, format="%.3g", key=key)
    fired = max_activations(str(store.path)).get(int(feature), 0.0) > 0
    st.caption(
        f"= {units * unit:.4g} absolute (#{feature}'s max activation {unit:.3g})"
        if fired
        else f"#{feature} never fired: strength in absolute units"
    )
    return units * unit


@dataclass
class Plan:
    """The edits the controls describe, built on the dictionary only when a run asks for them
    (so the page draws without loading the model)."""

    kind: str
    features: list[int]
    strengths: list[float]  # absolute, one per feature (add, clamp; the direction's for `direction`)
    minus: int | None = None

    def edits(self, dictionary) -> list:
        from sae import steering

        if self.kind == "direction":
            direction = dictionary.W_dec[self.features[0]].detach()
            if self.minus is not None:
                direction = direction - dictionary.W_dec[self.minus].detach()
            return [steering.add_direction(store.meta["hook"], direction, self.strengths[0])]
        if self.kind in ("add", "clamp"):
            make = getattr(steering, self.kind)
            return [make(dictionary, f, s) for f, s in zip(self.features, self.strengths)]
        return [getattr(steering, self.kind)(dictionary, f) for f in self.features]


def plan_edits(kind: str) -> Plan:
    """The feature (or code) pickers and strengths of `kind`."""
    if kind == "direction":
        ids = list(range(store.n_latents))
        first = (st.session_state.get("steer_features") or [0])[0]
        a, b = st.columns(2)
        plus = a.selectbox(
            "Feature A (its decoder row)",
            ids,
            index=min(int(first), len(ids) - 1),
            format_func=title,
            key="dir_a",
        )
        minus = b.selectbox(
            "minus feature B (optional)",
            [None, *ids],
            format_func=lambda f: "—" if f is None else title(f),
            key="dir_b",
        )
        strength = strength_input(int(plus), "strength_direction", f"strength (× max activation of #{plus})")
        st.session_state["steer_features"] = [int(plus)]
        return Plan(kind, [int(plus)], [strength], None if minus is None else int(minus))
    noun = "Codes" if kind.startswith("code") else "Features"
    features = st.multiselect(
        noun,
        list(range(store.n_latents)),
        default=st.session_state.get("steer_features", []),
        format_func=title,
    )
    st.session_state["steer_features"] = features
    strengths = []
    for feature in features if kind in ("add", "clamp") else []:
        what = "strength of" if kind == "add" else "hold"
        label = f"{what} feature {feature} (× its max activation)"
        strengths.append(strength_input(feature, f"strength_{feature}", label))
    return Plan(kind, [int(f) for f in features], strengths)


def show_report(result: dict) -> None:
    a, b = st.columns(2)
    a.subheader("Baseline")
    a.text(result["baseline"])
    b.subheader(f"Steered ({result['kind'].replace('_', ' ')}: {result['label']})")
    b.text(result["steered"])
    report = result["report"]
    st.caption(f"{report} · {result['seconds']:.2f} s for both runs")
    if not any(report.positions_edited.values()):
        st.warning("The edit touched no position: nothing was steered (check the positions).")


def run_generation(plan: Plan) -> None:
    from sae.steering import generate_pair_report

    model = live_model(store.meta["model"])
    started = time.perf_counter()
    try:
        edits = plan.edits(live_dictionary(store.meta["dictionary_path"]))
        baseline, steered, report = generate_pair_report(
            model, edits, prompt, max_new_tokens=tokens, seed=int(seed), do_sample=sample, positions=positions
        )
    except WorkbenchError as exc:
        st.error(str(exc))
        return
    st.session_state["steer_result"] = dict(
        baseline=baseline,
        steered=steered,
        kind=plan.kind,
        label=", ".join(e.label for e in edits),
        report=report,
        seconds=time.perf_counter() - started,
    )


def concept_options(feature: int) -> list[int]:
    logits = open_store(str(store.path)).feature(feature).logits
    return logits[logits.side == "top"].token.astype(int).tolist()


def sweep_section(plan: Plan) -> None:
    """Dose-response of the first edit over strengths in units of its feature's max activation."""
    from sae.dose_response import figure, sweep

    st.subheader("Dose-response")
    if plan.kind not in SCALED or not plan.features:
        st.caption("A sweep varies a strength: pick add, clamp or direction and a feature.")
        return
    feature, unit = plan.features[0], scale_of(plan.features[0])
    st.caption(f"{EDITS[plan.kind]} of #{feature}: strengths in units of its max activation ({unit:.3g})")
    a, b = st.columns(2)
    text = a.text_input("Strengths (× max activation)", "0, 0.5, 1, 2, 4", key="sweep_strengths")
    new_tokens = b.slider("New tokens per prompt", 5, 40, 15, key="sweep_tokens")
    options = concept_options(feature)
    texts = dict(zip(options, open_store(str(store.path)).token_texts(options)))
    concept = st.multiselect(
        "Concept tokens (the rate at which the steered text uses them)",
        options,
        default=options[:5],
        format_func=lambda t: repr(texts[t]),
        key="sweep_concept",
    )
    prompts = st.text_area("Prompts (one per line)", prompt, key="sweep_prompts").splitlines()
    neutral = st.text_area("Neutral text (KL and CE measured here)", NEUTRAL, key="sweep_neutral")
    if not st.button("Run sweep", key="sweep_run"):
        return
    try:
        units = [float(x) for x in text.replace(",", " ").split()]
        edit = plan.edits(live_dictionary(store.meta["dictionary_path"]))[0]
        rows = sweep(
            live_model(store.meta["model"]),
            edit,
            [u * unit for u in units],
            [p for p in prompts if p.strip()],
            concept,
            neutral,
            max_new_tokens=new_tokens,
            positions=positions,
        )
    except ValueError:
        st.error(f"strengths must be numbers separated by commas, not {text!r}")
        return
    except WorkbenchError as exc:
        st.error(str(exc))
        return
    fig = figure(
        rows,
        title=f"dose-response: {EDITS[plan.kind]} of #{feature}, "
        f"{min(units):g} to {max(units):g} × max activation",
    )
    for trace in fig.data:
        trace.x = units
    fig.update_layout(xaxis_title=f"strength (× max activation {unit:.3g})")
    table = pd.DataFrame([r.__dict__ for r in rows]).rename(columns={"strength": "absolute strength"})
    table.insert(0, "strength (× max)", units)
    st.session_state["sweep_result"] = (fig, table)


store = selected_store()
if store is None:
    st.stop()
st.title("Steering")
if not live_or_warn(store, "Steering"):
    st.stop()
names = descriptions(store)
codebook = store.meta.get("architecture") == "codebook"
st.caption(
    f"model {store.meta.get('model')} · hook {store.meta.get('hook')} · {store.meta.get('architecture')}"
)
kinds = [k for k in EDITS if codebook or not k.startswith("code")]
kind = st.radio("Edit", kinds, format_func=EDITS.get, horizontal=True, key="steer_kind")
plan = plan_edits(kind)
positions = st.radio(
    "Positions", list(POSITIONS), format_func=POSITIONS.get, horizontal=True, key="steer_positions"
)
prompt = st.text_input("Prompt", value="ROMEO:", key="steer_prompt")
left, middle, right = st.columns(3)
tokens = left.slider("New tokens", 5, 100, 30, key="steer_tokens")
seed = middle.number_input("Seed", value=0, step=1, key="steer_seed")
sample = right.toggle("Sample (else greedy)", value=True, key="steer_sample")
if st.button("Generate", key="steer_generate", disabled=not plan.features):
    run_generation(plan)
if "steer_result" in st.session_state:
    show_report(st.session_state["steer_result"])
sweep_section(plan)
if "sweep_result" in st.session_state:
    fig, table = st.session_state["sweep_result"]
    st.plotly_chart(fig, key="sweep_figure")
    st.dataframe(table, hide_index=True)
