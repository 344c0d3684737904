"""`workbench bench explore`: is the explorer fast enough to use? (issue 20, item 7)

Three measurements, each printed with the issue's target and whether it is met (speed is for
benchmarks: no test asserts these):

pages       `workbench explore` serves the demo store (the one `make demo` builds) on a free
            port, and Debian's headless Chromium, driven by Playwright, opens each page (Runs,
            Features, a `?store=&feature=` deep link, Circuits, Steering) two ways: in a new tab
            (a shared link: Streamlit's scripts load again) and by a click on its sidebar link
            in one open tab (moving between pages); one untimed round, then `repeats` timed
            ones, pages interleaved. A load is timed until the page's main content is visible:
            its title heading and its first table, plot or example (`page_checks`), never the
            previous page's stale elements. One browser context throughout, so its cache is warm
            as a returning user's is. Target 1 s.
queries     each FeatureStore query the pages make, on a synthetic store of 16,384 features over
            1 M tokens (`app.bench_explore_store`). Target 50 ms.
generation  what the Steering page runs on Generate: a baseline and a steered continuation of
            30 new tokens each (`add`, then `clamp`) on the store's model, loaded once as the
            explorer caches it, in a process with the server's environment (`app.bench_steer`).
            Target 3 s.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from workbench.bench import median
from workbench.errors import ConfigError, WorkbenchError

PAGE_TARGET_S = 1.0
GENERATION_TARGET_S = 3.0
PARTS = ("pages", "queries", "generation")
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
"""Debian's chromium, offline and in a container (no sandbox, no GPU, no background traffic)."""


@dataclass(frozen=True)
class ExploreBenchConfig:
    """What `workbench bench explore` measures (its flags derive from it)."""

    store: str = ""
    """Feature store the pages and the generation use; empty means the demo store (`make demo`)."""
    repeats: int = 5
    """Timed loads of each page and timed generations (after one untimed round)."""
    port: int = 0
    """Port of the explorer; 0 picks a free one."""
    width: int = 1280
    """Browser viewport width in pixels."""
    n_latents: int = 16_384
    """Features of the synthetic store the queries run on."""
    tokens: int = 1_048_576
    """Tokens the synthetic store stands for."""
    synthetic: str = ""
    """Folder that keeps the synthetic store between runs; empty means one in the temp folder."""
    query_repeats: int = 20
    """Timed calls of each store query (after its first)."""
    parts: tuple[str, ...] = PARTS
    """The measurements to run: pages, queries, generation."""
    new_tokens: int = 30
    """Tokens generated per continuation."""
    seed: int = 0
    """Seed of the synthetic store and of the queries' arguments."""

    def __post_init__(self):
        if min(self.repeats, self.query_repeats, self.n_latents, self.tokens, self.new_tokens) < 1:
            raise ConfigError("repeats, query_repeats, n_latents, tokens and new_tokens must be positive")
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown:
            raise ConfigError(f"unknown part {unknown[0]!r} (choose from {', '.join(PARTS)})")


def demo_store() -> Path:
    """The store `make demo` builds (`workbench analyze` of the default `workbench train` run).
    Raises WorkbenchError, saying how to build it, when it is not there."""
    from sae.train_config import TrainConfig
    from sae.training import default_output_dir
    from workbench.activations import CacheConfig
    from workbench.cache_reader import ActivationCache
    from workbench.store import find_stores

    cache = CacheConfig().output_dir()
    hook = ActivationCache(cache).hooks[0] if (cache / "manifest.json").exists() else ""
    run = default_output_dir(TrainConfig(), hook)
    found = find_stores([run])
    if not found:
        raise WorkbenchError(f"no demo store under {run}: build it with `make demo` (or give --store FILE)")
    return found[0]


# --- the explorer and the browser ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def explorer(
    stores: list[str], port: int = 0, flags: tuple[str, ...] = (), cwd: str | Path | None = None
) -> Iterator[str]:
    """`workbench explore STORES --port P FLAGS` running (in `cwd`), until the block ends; yields
    its URL once /_stcore/health answers. Raises WorkbenchError (with the end of the server's
    output) if it exits or does not answer within two minutes."""
    port = port or free_port()
    log = tempfile.TemporaryFile()
    command = [sys.executable, "-m", "app.cli", "explore", *map(str, stores), "--port", str(port), *flags]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    try:
        _wait_healthy(port, process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def _wait_healthy(port: int, process: subprocess.Popen, log, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise WorkbenchError(f"workbench explore exited with {process.returncode}: {' / '.join(tail)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply:
                if reply.read().decode().strip() == "ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise WorkbenchError(f"the explorer did not answer on port {port} within {timeout:.0f} s")


def chromium_path() -> str:
    """Debian's chromium (Playwright's own browsers are never downloaded). Raises WorkbenchError."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise WorkbenchError("needs Debian's chromium: sudo apt-get install chromium (make test installs it)")
    return path


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 1000):
    """A Playwright browser context of Debian's headless chromium at `width` x `height` pixels."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise WorkbenchError("needs playwright: pip install -e '.[dev]'") from None
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser.new_context(viewport={"width": width, "height": height})
        finally:
            browser.close()


# --- pages -------------------------------------------------------------------------------------
class PageCheck(NamedTuple):
    """A page, and what "its main content is visible" means there."""

    name: str
    link: str
    """Its title in the sidebar's navigation."""
    path: str
    """URL path and query after the server's address."""
    heading: str
    """Regular expression the page's title heading matches."""
    content: str
    """CSS selector of its main content; the first match must be visible."""


TABLE = '[data-testid="stDataFrame"], [data-testid="stTable"]'
EXAMPLE = ".wb-ex, span.tok"
_FRESH = '[data-testid="stElementContainer"]:not([data-stale="true"]) '
"""An element of the current script run: the previous page's elements stay on screen, marked
stale, until the new run replaces them."""


def page_checks(feature: int, store: str = "0") -> list[PageCheck]:
    """The five pages; `store` is the `?store=` value (an index or a name), `feature` the id the
    Feature page's deep link opens."""
    query = f"?store={store}"
    return [
        PageCheck("Runs", "Runs", f"/{query}", r"^Runs", TABLE),
        PageCheck("Features", "Features", f"/features{query}", r"^Features", TABLE),
        PageCheck(
            f"Feature ?feature={feature}",
            "Feature",
            f"/feature{query}&feature={feature}",
            rf"^Feature {feature}\b",
            EXAMPLE,
        ),
        PageCheck("Circuits", "Circuits", f"/circuits{query}", r"^Circuits", ".js-plotly-plot"),
        PageCheck("Steering", "Steering", f"/steering{query}", r"^Steering", 'button:has-text("Generate")'),
    ]


def _visible(page, heading: str, content: str, timeout_s: float) -> None:
    """Wait until a current heading matching `heading` and the first current `content` show."""
    fresh = page.locator(_FRESH.strip())
    fresh.get_by_role("heading", name=re.compile(heading)).first.wait_for(timeout=timeout_s * 1e3)
    selector = ", ".join(_FRESH + part.strip() for part in content.split(","))
    page.locator(selector).first.wait_for(state="visible", timeout=timeout_s * 1e3)


def load_time(context, url: str, check: PageCheck, timeout_s: float = 60) -> float:
    """Seconds from opening `url + check.path` in a new tab until its heading and content are
    visible. Raises Playwright's TimeoutError when they are not within `timeout_s`."""
    page = context.new_page()
    try:
        started = time.perf_counter()
        page.goto(url + check.path, wait_until="commit", timeout=timeout_s * 1e3)
        _visible(page, check.heading, check.content, timeout_s)
        return time.perf_counter() - started
    finally:
        page.close()


def navigation_time(page, check: PageCheck, timeout_s: float = 60) -> float:
    """Seconds from clicking `check`'s link in the sidebar of an open tab until the page's
    heading and content are visible (any feature id, for the Feature page)."""
    heading = r"^Feature \d+" if check.link == "Feature" else check.heading
    started = time.perf_counter()
    link = page.get_by_test_id("stSidebar").get_by_role("link", name=check.link, exact=True)
    link.click(timeout=timeout_s * 1e3)
    _visible(page, heading, check.content, timeout_s)
    return time.perf_counter() - started


def time_pages(url: str, checks: list[PageCheck], repeats: int, width: int = 1280) -> list[dict]:
    """One row per page: its first load in a new tab, then the median and max of `repeats` more
    (`new_tab_*`) and of `repeats` clicks on its sidebar link from the page before it in one
    tab (`in_app_*`), in seconds, with the 1 s target met or not by each median. A page whose
    content did not show says why (`failed`)."""
    from playwright.sync_api import Error as PlaywrightError

    new_tab: dict[str, list[float]] = {c.name: [] for c in checks}
    in_app: dict[str, list[float]] = {c.name: [] for c in checks}
    failed: dict[str, str] = {}

    def timed(name: str, times: list[float], measure) -> None:
        if name in failed:  # one wait for a page that does not show is enough
            return
        try:
            times.append(measure())
        except PlaywrightError as exc:
            failed[name] = str(exc).splitlines()[0]

    with headless_chromium(width) as context:
        tab = context.new_page()
        tab.goto(url + checks[0].path)
        _visible(tab, checks[0].heading, checks[0].content, 60)
        for round_ in range(repeats + 1):
            for check in checks:
                timed(check.name, new_tab[check.name], lambda: load_time(context, url, check))
            for check in checks[1:] + checks[:1]:
                if round_ > 0:
                    timed(check.name, in_app[check.name], lambda: navigation_time(tab, check))
    return [_page_row(c.name, new_tab[c.name], in_app[c.name], failed.get(c.name)) for c in checks]


def _page_row(name: str, new_tab: list[float], in_app: list[float], failure: str | None) -> dict:
    """Medians and maxima of each way in, and whether each median meets the 1 s target."""
    row: dict = {"page": name, "first_s": round(new_tab[0], 2) if new_tab else None}
    for label, times in (("new_tab", new_tab[1:]), ("in_app", in_app)):
        middle = median(times) if times else None
        row[f"{label}_median_s"] = None if middle is None else round(middle, 2)
        row[f"{label}_max_s"] = round(max(times), 2) if times else None
    row["target_s"] = PAGE_TARGET_S
    for label in ("new_tab", "in_app"):
        middle = row[f"{label}_median_s"]
        row[f"met_{label}"] = "yes" if middle is not None and middle <= PAGE_TARGET_S else "NO"
    if failure:
        row["failed"] = failure
    return row


def _circuit_flags(store: Path, folder: Path) -> tuple[str, ...]:
    """`--circuits FOLDER` holding a cheap circuit (OR gate, EAP) when the explorer would find
    none (under ./runs or beside the store), so the Circuits page draws a graph."""
    for root in (Path("runs"), store.parent):
        if root.is_dir() and next(root.rglob("*.circuit.json"), None) is not None:
            return ()
    out = folder / "or-gate-eap.circuit.json"
    command = [sys.executable, "-m", "app.cli", "circuits", "--task", "or-gate", "--method", "eap"]
    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True, timeout=600)
    return ("--circuits", str(folder))


def page_rows(store: Path, config: ExploreBenchConfig) -> list[dict]:
    """The pages part (see the module docstring) on `store`."""
    from workbench.store import FeatureStore

    chromium_path()  # a missing browser is one line before the server starts
    opened = FeatureStore(store)
    feature = int(opened.features(limit=1).feature[0])
    opened.close()
    with tempfile.TemporaryDirectory() as folder:
        flags = _circuit_flags(store, Path(folder))
        with explorer([str(store)], config.port, flags) as url:
            return time_pages(url, page_checks(feature), config.repeats, config.width)


# --- generation --------------------------------------------------------------------------------
def generation_rows(store: Path, repeats: int, new_tokens: int = 30) -> list[dict]:
    """What the Steering page runs on Generate, timed by `app.bench_steer` in a process with the
    explorer server's environment (its OpenMP settings): loading the store's model and dictionary
    (once per server), one continuation, and `add` and `clamp` runs (a baseline and a steered
    continuation, `new_tokens` each, of the store's densest feature at its max activation),
    medians of `repeats` after a warm-up, with the 3 s target on the two steering runs. Raises
    WorkbenchError when the store's dictionary folder is not on this machine."""
    from app.bench_steer import bench_steering_in_explorer_env

    rows = []
    for row in bench_steering_in_explorer_env(store, tokens=new_tokens, repeats=repeats):
        case = {
            "load": "load model + dictionary (once per server)",
            "generate": f"one continuation, {new_tokens} tokens",
            "add": f"Generate with add: baseline + steered, {new_tokens} tokens each",
            "clamp": f"Generate with clamp: baseline + steered, {new_tokens} tokens each",
        }.get(row["case"], row["case"])
        shown = {"case": case, "median_s": round(row["median_s"], 2), "min_s": round(row["min_s"], 2)}
        if row["case"] in ("add", "clamp"):
            shown.update(
                target_s=GENERATION_TARGET_S, met="yes" if row["median_s"] <= GENERATION_TARGET_S else "NO"
            )
        rows.append(shown)
    return rows


def _load() -> str:
    """The machine's load, said with each part: other work on a 2-core machine slows every number."""
    return f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"


def run_explore_benchmark(config: ExploreBenchConfig, say=print) -> Iterator[tuple[str, list[dict]]]:
    """(part, rows) of each part in `config.parts`, as each finishes; `say` reports what runs.
    Raises WorkbenchError for a missing store, browser or dictionary."""
    from app.bench_explore_store import synthetic_store, time_queries

    store = Path(config.store) if config.store else None
    if {"pages", "generation"} & set(config.parts):
        store = store or demo_store()
        if not store.is_file():
            raise WorkbenchError(f"{store}: no feature store here")
    if "pages" in config.parts and store is not None:
        say(f"pages: {store} in headless chromium at {config.width} px, {config.repeats} loads each{_load()}")
        yield "pages", page_rows(store, config)
    if "queries" in config.parts:
        say(f"queries: synthetic store of {config.n_latents:,} features x {config.tokens:,} tokens{_load()}")
        path = synthetic_store(config.synthetic or None, config.n_latents, config.tokens, config.seed)
        yield "queries", time_queries(path, config.query_repeats, config.seed)
    if "generation" in config.parts and store is not None:
        say(f"generation: {config.new_tokens} tokens on the model of {store}{_load()}")
        yield "generation", generation_rows(store, config.repeats, config.new_tokens)
