"""`workbench explore`: start the Streamlit server on the explorer, bound to one address; stopping
`workbench explore` (SIGTERM, SIGINT) stops the server (`workbench.processes.run_child`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from workbench.errors import WorkbenchError
from workbench.processes import run_child
from workbench.store import find_stores

MAIN = Path(__file__).with_name("main.py")
STORES_ENV = "WORKBENCH_STORES"
DEVICE_ENV = "WORKBENCH_EXPLORER_DEVICE"
"""Where the explorer's live model (and its dictionaries) run: a `--device` value (unset: auto)."""
CIRCUITS_ENV = "WORKBENCH_CIRCUITS"
"""Circuit JSON files or folders searched for them (`--circuits DIR`, and the default runs folder)."""
DEFAULT_RUNS = "runs"
"""Where `workbench circuits` (and every other command) writes by default, relative to the CWD."""


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


def explorer_env(roots: Sequence[str], device: str = "auto", circuits: Sequence[str] = ()) -> dict[str, str]:
    """The environment the explorer's server runs in: the store roots, the live device, and the
    circuit folders (each `--circuits` folder, then ./runs, all absolute: the server may be
    asked from anywhere). OMP_WAIT_POLICY=PASSIVE (unless set): the server shares the CPU with
    the browser and other work, and OpenMP threads that spin while another process holds a core
    made each one-token decode step of the live model 10-30x slower (steering took 10-27 s for
    30 tokens on the demo model on 2 busy cores; 0.3-0.8 s with the policy). Raises
    WorkbenchError for a `--circuits` folder that does not exist."""
    missing = [c for c in circuits if not Path(c).exists()]
    if missing:
        raise WorkbenchError(f"--circuits {missing[0]}: no such file or folder")
    folders = [*(str(Path(c).resolve()) for c in circuits), str(Path(DEFAULT_RUNS).resolve())]
    return {
        **os.environ,
        STORES_ENV: os.pathsep.join(str(Path(root).resolve()) for root in roots),
        DEVICE_ENV: device,
        CIRCUITS_ENV: os.pathsep.join(dict.fromkeys(folders)),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }


def launch(
    roots: list[str],
    port: int = 8501,
    host: str = "127.0.0.1",
    device: str = "auto",
    circuits: Sequence[str] = (),
) -> int:
    """Serve the explorer on the stores under `roots` until the server exits or this process is
    stopped; returns the server's exit status. `device` (a `--device` value, resolved by the
    caller so that a missing GPU fails before the server starts) is where the live model runs;
    `circuits`: folders (or files) of circuit JSONs shown besides those under ./runs and the
    store roots. Raises WorkbenchError if no store is found or a `circuits` path is missing."""
    stores = find_stores(roots)
    if not stores:
        raise WorkbenchError(
            f"no feature store under {', '.join(map(str, roots))} (run `workbench analyze` first)"
        )
    # The roots, not the stores found: stores added later show up, and the Circuits page looks
    # for *.circuit.json under the same folders.
    env = explorer_env(roots, device, circuits)
    print(f"explorer on http://{host}:{port} with {len(stores)} store(s); Ctrl-C stops it", flush=True)
    return run_child(streamlit_command(port, host), env=env).status
