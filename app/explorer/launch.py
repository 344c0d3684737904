"""`workbench explore`: start the Streamlit server on the explorer, bound to one address; stopping
`workbench explore` (SIGTERM, SIGINT) stops the server (`workbench.processes.run_child`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.processes import run_child
from workbench.store import find_stores

MAIN = Path(__file__).with_name("main.py")
STORES_ENV = "WORKBENCH_STORES"
DEVICE_ENV = "WORKBENCH_EXPLORER_DEVICE"
"""Where the explorer's live model (and its dictionaries) run: a `--device` value (unset: auto)."""


def streamlit_command(port: int, host: str = "127.0.0.1") -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(MAIN),
        "--server.headless",
        "true",
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--global.developmentMode",
        "false",
        "--client.toolbarMode",
        "minimal",
    ]


def launch(roots: list[str], port: int = 8501, host: str = "127.0.0.1", device: str = "auto") -> int:
    """Serve the explorer on the stores under `roots` until the server exits or this process is
    stopped; returns the server's exit status. `device` (a `--device` value, resolved by the
    caller so that a missing GPU fails before the server starts) is where the live model runs.
    Raises WorkbenchError if no store is found."""
    stores = find_stores(roots)
    if not stores:
        raise WorkbenchError(
            f"no feature store under {', '.join(map(str, roots))} (run `workbench analyze` first)"
        )
    # The roots, not the stores found: stores added later show up, and the Circuits page looks
    # for *.circuit.json under the same folders.
    env = {
        **os.environ,
        STORES_ENV: os.pathsep.join(str(Path(root).resolve()) for root in roots),
        DEVICE_ENV: device,
    }
    print(f"explorer on http://{host}:{port} with {len(stores)} store(s); Ctrl-C stops it", flush=True)
    return run_child(streamlit_command(port, host), env=env).status
