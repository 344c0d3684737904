"""The Steering page under Streamlit's AppTest: every edit, positions, strengths in units of the
feature's max activation, the steering report, and the dose-response sweep with its figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.store import FeatureStore

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "explorer" / "main.py")
PROMPT = "ROMEO:"


@pytest.fixture
def page(tiny_run, monkeypatch):
    """The Steering page on the tiny store's most frequent feature (and that feature)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_STORES", str(tiny_run))
    feature = int(FeatureStore(tiny_run).features(limit=1).feature[0])
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.session_state["steer_features"] = [feature]
    at.session_state["steer_strength"] = 0.5
    at.switch_page("views/steering.py").run()
    assert not at.exception, at.exception
    return at, feature


def captions(at) -> str:
    return "\n".join(c.value for c in at.caption)


def generate(at, **choices):
    for key, value in choices.items():
        widget = at.number_input(key=key) if key.startswith("strength") else at.radio(key=key)
        widget.set_value(value)
    at.button(key="steer_generate").click().run()
    assert not at.exception, at.exception
    return at.session_state["steer_result"]


def test_strength_is_in_units_of_max_activation_and_the_report_is_shown(page, tiny_run):
    at, feature = page
    top = FeatureStore(tiny_run).feature(feature).max_activation
    box = at.number_input(key=f"strength_{feature}")
    assert box.value == 0.5  # carried from the Feature page's "steer" jump
    assert f"= {0.5 * top:.4g} absolute" in captions(at)
    result = generate(at, **{f"strength_{feature}": 3.0})
    assert result["label"] == f"feature {feature} x {3.0 * top:g}"
    report = result["report"]
    assert str(report) in captions(at) and sum(report.positions_edited.values()) > 0
    baseline, steered = (t.value for t in at.text)
    assert baseline.startswith(PROMPT) and (baseline, steered) == (result["baseline"], result["steered"])


def test_positions_choose_what_is_edited(page, tiny_model):
    at, feature = page
    at.slider(key="steer_tokens").set_value(6)
    prompt_length = tiny_model.tokenize(PROMPT).shape[1]
    report = generate(at, steer_positions="prompt")["report"]
    assert list(report.positions_edited.values()) == [prompt_length]
    report = generate(at, steer_positions="generated")["report"]
    passes = list(report.passes.values())[0]
    assert list(report.positions_edited.values()) == [passes - 1]  # one per decode step after the prompt


def test_clamp_then_a_sweep_draws_its_figure(page, tiny_run):
    at, feature = page
    top = FeatureStore(tiny_run).feature(feature).max_activation
    at.radio(key="steer_kind").set_value("clamp").run()
    result = generate(at, **{f"strength_{feature}": 2.0})
    assert result["label"] == f"feature {feature} = {2.0 * top:g}"
    at.text_input(key="sweep_strengths").input("0, 2")
    at.slider(key="sweep_tokens").set_value(5)
    at.button(key="sweep_run").click().run()
    assert not at.exception, at.exception
    spec = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert [t["name"] for t in spec["data"]] == ["concept rate", "KL on neutral text"]
    assert spec["data"][0]["x"] == [0.0, 2.0] and "max activation" in spec["layout"]["xaxis"]["title"]["text"]
    table = at.dataframe[-1].value
    assert table["absolute strength"].tolist() == pytest.approx([0.0, 2.0 * top])
    assert table.kl_neutral[1] > table.kl_neutral[0] >= 0  # holding it at 2x its max costs more than at 0


def test_ablate_and_a_difference_of_two_decoder_directions(page):
    at, feature = page
    at.radio(key="steer_kind").set_value("ablate").run()
    result = generate(at)
    assert result["label"] == f"feature {feature} = 0"
    at.radio(key="steer_kind").set_value("direction").run()
    other = (feature + 1) % 48
    at.selectbox(key="dir_b").set_value(other)
    result = generate(at, strength_direction=50.0)
    assert result["label"] == "direction" and result["steered"] != result["baseline"]


def test_codes_are_offered_for_codebooks_only(page):
    at, _ = page
    assert (
        "code on" not in at.radio(key="steer_kind").options
        and "ablate  (a_f = 0)" in at.radio(key="steer_kind").options
    )


def test_a_codebook_store_offers_code_on_and_off(tiny_run, tiny_model_dir, tmp_path, monkeypatch):
    """A copy of the tiny store made to describe a (fresh, untrained) codebook of the same width."""
    import duckdb
    from streamlit.testing.v1 import AppTest

    from sae.base import create
    from sae.config import DictionaryConfig
    from sae.io import save
    from tests.conftest import STORE_HOOK

    store = FeatureStore(tiny_run)
    book = create(DictionaryConfig(architecture="codebook", d_in=store.meta["d_in"], n_latents=48, k=2))
    save(book, tmp_path / "book", hook=STORE_HOOK, model=str(tiny_model_dir))
    copied = tmp_path / "book" / "features.duckdb"
    copied.write_bytes((tiny_run / "features.duckdb").read_bytes())
    with duckdb.connect(str(copied)) as con:
        for key, value in (("dictionary_path", str(tmp_path / "book")), ("architecture", "codebook")):
            con.execute("UPDATE meta SET value = ? WHERE key = ?", [json.dumps(value), key])
    monkeypatch.setenv("WORKBENCH_STORES", str(copied))
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.session_state["steer_features"] = [3]
    at.switch_page("views/steering.py").run()
    assert "code on" in at.radio(key="steer_kind").options
    at.radio(key="steer_kind").set_value("code_on").run()
    result = generate(at, steer_positions="all")
    assert result["label"] == "code 3 on" and sum(result["report"].positions_edited.values()) > 0
    at.radio(key="steer_kind").set_value("code_off").run()
    assert generate(at)["label"] == "code 3 off"
