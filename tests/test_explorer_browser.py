"""The explorer in a real browser: `workbench explore` serves a store built from the demo model
(cache → train → analyze through the CLI); headless Chromium (Debian's, driven by Playwright)
opens a feature page, finds the histogram and the highlighted examples, and saves a full-page
screenshot in the test's output folder."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "needs Debian's chromium (make test installs it: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def cli(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "app.cli", *argv, "--quiet"], check=True, timeout=600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"workbench explore exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply:
                if reply.read().decode().strip() == "ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the explorer did not answer /_stcore/health in time")


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    cache, run = root / "cache", root / "run"
    cli("cache", "--model", "demo", "--tokens", "32768", "--context-length", "64", "--out", str(cache))
    cli("train", "--cache", str(cache), "--expansion", "4", "--out", str(run))
    folder = next(p for p in run.iterdir() if (p / "config.json").exists())
    cli("analyze", str(folder), "--top", "8")
    return folder / "features.duckdb"


@pytest.mark.slow
def test_feature_page_in_a_real_browser(demo_store, tmp_path):
    from playwright.sync_api import sync_playwright

    from workbench.store import FeatureStore

    executable = chromium()
    feature = int(FeatureStore(demo_store).features(limit=1).feature[0])
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "explore", str(demo_store), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(port, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 2600})
            page.goto(f"http://127.0.0.1:{port}/feature?feature={feature}", timeout=60_000)
            page.get_by_role("heading", name=f"Feature {feature}").wait_for(timeout=60_000)
            histogram = page.locator(".js-plotly-plot").first
            histogram.wait_for(state="visible", timeout=60_000)
            tokens = page.locator("span.tok")
            tokens.first.wait_for(state="visible", timeout=60_000)
            assert histogram.bounding_box()["height"] > 100
            assert tokens.count() >= 8  # at least one highlighted example of several tokens
            lit = tokens.evaluate_all(
                "els => els.filter(e => getComputedStyle(e).backgroundColor !== 'rgba(0, 0, 0, 0)').length"
            )
            assert lit >= 1
            screenshot = tmp_path / "feature-page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 20_000
            browser.close()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
