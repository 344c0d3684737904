"""`workbench bench explore`: is the explorer fast enough to use? (issue 20, item 7)

Three measurements, each printed with the issue's target and whether it is met (speed is for
benchmarks: no test asserts these):

pages       `workbench explore` serves the demo store (the one `make demo` builds) on a free
            port, and Debian's headless Chromium, driven by Playwright, opens each page in a
            new tab (Runs, Features, a `?store=&feature=` deep link, Circuits, Steering): one
            untimed round, then `repeats` timed ones, pages interleaved. A load is timed from
            the navigation until the page's main content is visible: its title heading and its
            first table, plot or example (`page_checks`). One browser context throughout, so
            its cache is warm as a returning user's is. Target 1 s.
queries     each FeatureStore query the pages make, on a synthetic store of 16,384 features over
            1 M tokens (`app.bench_explore_store`). Target 50 ms.
generation  what the Steering page runs: 30 new tokens of a baseline and a steered continuation
            (`sae.steering.generate_pair`, one `add` edit) on the store's model, which is loaded
            once as the explorer caches it. Target 3 s.
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
    """Seed of the synthetic store, the queries' arguments and the sampled continuations."""

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
    path: str
    """URL path and query after the server's address."""
    heading: str
    """Regular expression the page's title heading matches."""
    content: str
    """CSS selector of its main content; the first match must be visible."""


TABLE = '[data-testid="stDataFrame"], [data-testid="stTable"], table'
EXAMPLE = ".wb-ex, span.tok"


def page_checks(feature: int, store: str = "0") -> list[PageCheck]:
    """The five pages; `store` is the `?store=` value (an index or a name), `feature` the id the
    Feature page opens."""
    query = f"?store={store}"
    return [
        PageCheck("Runs", f"/{query}", r"^Runs", TABLE),
        PageCheck("Features", f"/features{query}", r"^Features", TABLE),
        PageCheck(
            f"Feature ?feature={feature}",
            f"/feature{query}&feature={feature}",
            rf"^Feature {feature}\b",
            EXAMPLE,
        ),
        PageCheck("Circuits", f"/circuits{query}", r"^Circuits", ".js-plotly-plot"),
        PageCheck("Steering", f"/steering{query}", r"^Steering", 'button:has-text("Generate")'),
    ]


def load_time(context, url: str, check: PageCheck, timeout_s: float = 60) -> float:
    """Seconds from opening `url + check.path` in a new tab until its heading and content are
    visible. Raises TimeoutError (Playwright's) when they are not within `timeout_s`."""
    page = context.new_page()
    try:
        started = time.perf_counter()
        page.goto(url + check.path, wait_until="commit", timeout=timeout_s * 1e3)
        heading = page.get_by_role("heading", name=re.compile(check.heading)).first
        heading.wait_for(state="visible", timeout=timeout_s * 1e3)
        page.locator(check.content).first.wait_for(state="visible", timeout=timeout_s * 1e3)
        return time.perf_counter() - started
    finally:
        page.close()


def time_pages(url: str, checks: list[PageCheck], repeats: int, width: int = 1280) -> list[dict]:
    """One row per page: its first (untimed-round) load, the median and max of `repeats` more,
    in seconds, with the 1 s target. A page whose content never shows reads 'not visible'."""
    from playwright.sync_api import Error as PlaywrightError

    times: dict[str, list[float]] = {c.name: [] for c in checks}
    failed: dict[str, str] = {}
    with headless_chromium(width) as context:
        for _ in range(repeats + 1):
            for check in checks:
                if check.name in failed:
                    continue
                try:
                    times[check.name].append(load_time(context, url, check))
                except PlaywrightError as exc:
                    failed[check.name] = str(exc).splitlines()[0]
    rows = []
    for check in checks:
        seconds = times[check.name]
        later = seconds[1:] or seconds
        row = {"page": check.name, "first_s": round(seconds[0], 2) if seconds else None}
        if check.name in failed and len(seconds) <= 1:
            row.update(median_s=None, max_s=None, target_s=PAGE_TARGET_S, met=f"NO: {failed[check.name]}")
        else:
            middle = median(later)
            row.update(median_s=round(middle, 2), max_s=round(max(later), 2), target_s=PAGE_TARGET_S)
            row["met"] = "yes" if middle <= PAGE_TARGET_S else "NO"
        rows.append(row)
    return rows


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
def generation_rows(store: Path, repeats: int, new_tokens: int = 30, seed: int = 0) -> list[dict]:
    """What the Steering page runs, timed: loading the store's model and dictionary (once per
    server), then `repeats` generate_pair calls (baseline + steered, `new_tokens` each, one `add`
    edit of the densest feature at its max activation) after an untimed one. Raises
    WorkbenchError when the store's dictionary folder is not on this machine."""
    import sae
    from sae.steering import add, generate_pair
    from workbench.models import load_model
    from workbench.store import FeatureStore

    opened = FeatureStore(store)
    meta, top = opened.meta, opened.features(limit=1)
    opened.close()
    folder = meta.get("dictionary_path") or ""
    if not folder or not Path(folder).exists():
        raise WorkbenchError(f"{store}: its dictionary folder {folder!r} is not on this machine")
    started = time.perf_counter()
    model = load_model(meta["model"])
    edit = add(sae.load(folder), int(top.feature[0]), float(top.max_activation[0]))
    load_s = time.perf_counter() - started
    times = []
    for index in range(repeats + 1):
        started = time.perf_counter()
        generate_pair(model, [edit], "ROMEO:", max_new_tokens=new_tokens, seed=seed + index)
        times.append(time.perf_counter() - started)
    later = times[1:]
    return [
        {"case": "load model + dictionary (once per server)", "first_s": round(load_s, 2)},
        {
            "case": f"generate_pair: {new_tokens} tokens, baseline + steered",
            "first_s": round(times[0], 2),
            "median_s": round(median(later), 2),
            "max_s": round(max(later), 2),
            "target_s": GENERATION_TARGET_S,
            "met": "yes" if median(later) <= GENERATION_TARGET_S else "NO",
        },
    ]


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
        say(f"pages: {store} in headless chromium at {config.width} px, {config.repeats} loads each")
        yield "pages", page_rows(store, config)
    if "queries" in config.parts:
        say(f"queries: synthetic store of {config.n_latents:,} features x {config.tokens:,} tokens")
        path = synthetic_store(config.synthetic or None, config.n_latents, config.tokens, config.seed)
        yield "queries", time_queries(path, config.query_repeats, config.seed)
    if "generation" in config.parts and store is not None:
        say(f"generation: {config.new_tokens} tokens on the model of {store}")
        yield "generation", generation_rows(store, config.repeats, config.new_tokens, config.seed)
