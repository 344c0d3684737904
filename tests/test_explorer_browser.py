"""The explorer in a real browser (issue 20): `workbench explore` serves the session's small
store (a tiny GPT-2's cache → TopK dictionary → analyze), started in a folder whose runs/ holds a
circuit written by `workbench circuits` with its default --out. One server and one headless
Chromium (Debian's, driven by Playwright) serve every check, each in its own browser context:
examples wrap inside their column at 1280 px, a summary in the Features table opens its
feature, `?store=&feature=` links (and malformed ones), Back, the Circuits page, a click on a
feature node of an attribution graph, and a steering run with clamp and a dose-response sweep.
Screenshots go to each test's tmp folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.bench_explore import CHROMIUM_ARGS, explorer

pytestmark = pytest.mark.slow
WAIT_MS = 90_000
FEATURE_HEADING = re.compile(r"^Feature \d+")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "needs Debian's chromium (make test installs it: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def cli(*argv: str, cwd: Path | None = None) -> None:
    subprocess.run([sys.executable, "-m", "app.cli", *argv], check=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def demo_store(tiny_run, tiny_model, tmp_path_factory) -> Path:
    """A store of the session's small TopK dictionary (tests/conftest.py `tiny_run`: a 2-layer
    GPT-2 trained on tiny-shakespeare, its cache, a dictionary the AppTests have built already),
    analyzed again at analyze's default context (24 + 8 tokens, long enough to wrap): a store of
    its own through the CLI cost this file 52 s of the suite's 20 minutes."""
    from sae.analyze import AnalyzeConfig, analyze
    from sae.io import load

    out = tmp_path_factory.mktemp("browser-store") / "tiny" / "features.duckdb"
    config = AnalyzeConfig(top=8, out=str(out))
    return analyze(load(tiny_run), config, folder=tiny_run, model=tiny_model, progress=False)


@pytest.fixture(scope="module")
def server_folder(demo_store, tmp_path_factory) -> Path:
    """Where the explorer runs: `workbench circuits` wrote its default
    runs/circuits/or-gate-eap.circuit.json here; runs/graphs/ holds an attribution graph whose
    features are `demo_store`'s (tests/test_explorer_graphs.py's synthetic graph)."""
    from tests.test_explorer_graphs import synthetic_graph
    from workbench.store import FeatureStore

    root = tmp_path_factory.mktemp("browser")
    cli("circuits", "--task", "or-gate", "--method", "eap", cwd=root)
    assert (root / "runs" / "circuits" / "or-gate-eap.circuit.json").is_file()
    store = FeatureStore(demo_store)
    fired = [int(f) for f in store.features(limit=3).feature]
    store.close()
    (root / "runs" / "graphs").mkdir()
    graph = synthetic_graph(str(demo_store), fired)
    (root / "runs" / "graphs" / "tiny-graph.circuit.json").write_text(json.dumps(graph))
    return root


@pytest.fixture(scope="module")
def site(demo_store, server_folder):
    """(url, store, browser): the explorer on `demo_store`, started in `server_folder`."""
    executable = chromium()
    root = server_folder
    from playwright.sync_api import sync_playwright

    with explorer([str(demo_store)], cwd=root) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield url, demo_store, browser
        browser.close()


@pytest.fixture(scope="module")
def facts(demo_store):
    """What the pages should show, read from the store: the densest feature, its first decoder
    neighbour, the number of features."""
    from workbench.store import FeatureStore

    store = FeatureStore(demo_store)
    first = int(store.features(limit=1).feature[0])
    neighbour = int(store.feature(first).neighbours.other[0])
    n = store.n_latents
    store.close()
    return {"first": first, "neighbour": neighbour, "n_latents": n}


def open_page(site, path: str, width: int = 1280):
    url, _, browser = site
    page = browser.new_context(viewport={"width": width, "height": 1600}).new_page()
    page.goto(url + path, timeout=WAIT_MS)
    return page


def heading(page, pattern) -> str:
    found = page.get_by_role("heading", name=pattern).first
    found.wait_for(timeout=WAIT_MS)
    return found.inner_text()


def shown_feature(page) -> int:
    return int(re.match(r"Feature (\d+)", heading(page, FEATURE_HEADING)).group(1))


def test_examples_wrap_inside_their_column_at_1280_px(site, facts, tmp_path):
    page = open_page(site, f"/feature?store=0&feature={facts['first']}")
    assert shown_feature(page) == facts["first"]
    histogram = page.locator(".js-plotly-plot").first
    histogram.wait_for(state="visible", timeout=WAIT_MS)
    assert histogram.bounding_box()["height"] > 100
    contexts = page.locator(".wb-ctx")
    contexts.first.wait_for(state="visible", timeout=WAIT_MS)
    assert contexts.count() >= 8  # the top examples (quantile groups are folded)
    assert "&nbsp;" not in contexts.first.inner_html()
    layout = contexts.evaluate_all(
        """els => els.filter(e => e.offsetParent !== null).map(e => {
            const column = e.closest('[data-testid="stColumn"]') || e.parentElement;
            const box = e.getBoundingClientRect(), outer = column.getBoundingClientRect();
            const style = getComputedStyle(e);
            return {over: box.right - outer.right, clipped: e.scrollWidth - e.clientWidth,
                    lines: box.height / parseFloat(style.lineHeight), wrap: style.whiteSpace};
        })"""
    )
    assert layout and all(item["wrap"] == "pre-wrap" for item in layout)
    assert all(item["over"] <= 1 and item["clipped"] <= 1 for item in layout), layout
    assert any(item["lines"] > 1.5 for item in layout), "no example is long enough to wrap at 1280 px"
    values = page.locator(".wb-act").all_inner_texts()
    assert values and all(re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?", v.strip()) for v in values[:8]), values[:8]
    lit = page.locator("span.tok").evaluate_all(
        "els => els.filter(e => getComputedStyle(e).backgroundColor !== 'rgba(0, 0, 0, 0)').length"
    )
    assert lit >= 1
    page.screenshot(path=str(tmp_path / "feature-1280.png"), full_page=True)


def test_a_summary_in_the_features_table_opens_its_feature(site, facts, tmp_path):
    from playwright.sync_api import expect

    page = open_page(site, "/features?store=0")
    heading(page, re.compile(r"^Features"))
    table = page.locator('[data-testid="stDataFrame"]').last  # "All features", densest first
    table.wait_for(state="visible", timeout=WAIT_MS)
    headers = table.locator('[role="columnheader"]')
    expect(headers.nth(1)).to_have_text("summary", timeout=WAIT_MS)
    assert headers.nth(0).inner_text() == "feature"
    box = table.bounding_box()
    page.screenshot(path=str(tmp_path / "features.png"), full_page=True)
    # the summary cell of the first row: past the row marker and the feature column, below the header
    page.mouse.click(box["x"] + 220, box["y"] + 35 + 17)
    opened = page_showing(page.context, f"Feature {facts['first']}")  # this tab, or a tab it opened
    assert f"feature={facts['first']}" in opened.url
    opened.screenshot(path=str(tmp_path / "opened-from-table.png"), full_page=True)


def page_showing(context, title: str, timeout_s: float = WAIT_MS / 1e3):
    """The first tab of `context` whose heading reads `title` (waiting for one)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for page in context.pages:
            if page.get_by_role("heading", name=title, exact=True).count():
                return page
        context.pages[0].wait_for_timeout(300)
    raise AssertionError(f"no tab shows {title!r}: {[p.url for p in context.pages]}")


def test_links_name_store_and_feature_and_back_returns_to_the_previous_feature(site, facts, tmp_path):
    page = open_page(site, f"/feature?store=0&feature={facts['first']}")
    assert shown_feature(page) == facts["first"]
    name = re.search(r"[?&]store=([^&]+)", page.url).group(1)  # the page names its store in the URL
    assert name != "0"
    page.get_by_role("button", name=re.compile(rf"^#{facts['neighbour']}\b")).first.click()
    page.get_by_role("heading", name=f"Feature {facts['neighbour']}").wait_for(timeout=WAIT_MS)
    assert f"feature={facts['neighbour']}" in page.url
    page.go_back()
    page.get_by_role("heading", name=f"Feature {facts['first']}").wait_for(timeout=WAIT_MS)
    assert shown_feature(page) == facts["first"]

    shared = open_page(site, f"/feature?store={name}&feature={facts['neighbour']}")
    assert shown_feature(shared) == facts["neighbour"]
    for bad in (str(facts["n_latents"] + 99_999), "abc", "-3"):
        wrong = open_page(site, f"/feature?store={name}&feature={bad}")
        alert = wrong.locator('[data-testid="stAlert"]').first
        alert.wait_for(timeout=WAIT_MS)
        assert bad.lstrip("-") in alert.inner_text() and alert.inner_text().count("\n") == 0
        assert wrong.get_by_role("heading", name=FEATURE_HEADING).count() == 0
    wrong.screenshot(path=str(tmp_path / "bad-feature.png"), full_page=True)


def test_the_circuits_page_finds_the_circuit_in_the_runs_folder(site, server_folder, tmp_path):
    from playwright.sync_api import expect

    _, store, _ = site
    page = open_page(site, "/circuits?store=0")
    heading(page, re.compile(r"^Circuits"))
    picker = (
        page.locator('[data-testid="stSelectbox"]').filter(has_text="Circuit file").get_by_role("combobox")
    )
    folder = server_folder / "runs" / "circuits"
    expect(picker).to_have_value(
        re.compile(rf"^or-gate-eap\.circuit\.json .*{re.escape(str(folder))}$"), timeout=WAIT_MS
    )
    graph = page.locator(".js-plotly-plot").first
    graph.wait_for(state="visible", timeout=WAIT_MS)
    assert graph.bounding_box()["height"] > 200 and "or-gate" in graph.inner_text()
    page.screenshot(path=str(tmp_path / "circuits.png"), full_page=True)


def test_steering_with_clamp_and_a_dose_response_sweep(site, facts, tmp_path):
    page = open_page(site, f"/feature?store=0&feature={facts['first']}")
    assert shown_feature(page) == facts["first"]
    page.get_by_role("button", name=re.compile(r"^Steer")).first.click()
    heading(page, re.compile(r"^Steering"))
    page.get_by_text(re.compile(r"^clamp")).first.click()
    page.get_by_text(re.compile(rf"^hold feature {facts['first']}\b")).first.wait_for(timeout=WAIT_MS)
    page.get_by_role("button", name="Generate").click()
    page.get_by_role("heading", name=re.compile(r"^Steered \(clamp")).wait_for(timeout=WAIT_MS)
    page.get_by_text(re.compile(r"s for both runs")).first.wait_for(timeout=WAIT_MS)
    strengths = page.get_by_label("Strengths (× max activation)")
    strengths.fill("0, 2")
    strengths.press("Enter")
    page.get_by_role("button", name="Run sweep").click()
    figure = page.locator(".js-plotly-plot").first
    figure.wait_for(state="visible", timeout=WAIT_MS * 2)
    assert "dose-response" in figure.inner_text()
    page.screenshot(path=str(tmp_path / "steering.png"), full_page=True)


def test_a_click_on_an_attribution_graph_feature_opens_its_page(site, tmp_path):
    """The attribution graph (runs/graphs/, picked in the Circuits page's file box) renders with
    its tokens as x ticks; a click on a feature node opens that feature in its transcoder's store."""
    page = open_page(site, "/circuits?store=0")
    heading(page, re.compile(r"^Circuits"))
    picker = (
        page.locator('[data-testid="stSelectbox"]').filter(has_text="Circuit file").get_by_role("combobox")
    )
    picker.click()
    page.get_by_role("option", name=re.compile(r"^tiny-graph\.circuit\.json")).click()
    graph = page.locator(".js-plotly-plot").filter(has_text="ROMEO").first
    graph.wait_for(state="visible", timeout=WAIT_MS)
    page.screenshot(path=str(tmp_path / "attribution-graph.png"), full_page=True)
    point = graph.evaluate(
        """gd => {
            const trace = gd._fullData.find(t => t.name === 'transcoder feature');
            const layout = gd._fullLayout, box = gd.getBoundingClientRect();
            return {x: box.left + layout._size.l + layout.xaxis.l2p(trace.x[0]),
                    y: box.top + layout._size.t + layout.yaxis.l2p(trace.y[0]), id: trace.customdata[0]};
        }"""
    )
    feature = int(point["id"].split(".")[-1])
    page.mouse.click(point["x"], point["y"])
    page.get_by_role("heading", name=f"Feature {feature}").wait_for(timeout=WAIT_MS)
    assert f"feature={feature}" in page.url
