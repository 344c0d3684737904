"""Stopping the workbench stops what it started: a SIGTERM or SIGINT sent to the CLI reaches its
children (`workbench explore`'s Streamlit server, `--nproc`'s torchrun), the CLI waits for them and
exits with their status, and nothing is left running or answering."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Reports its pid, then waits; on SIGTERM/SIGINT exits with 40 + the signal's number.
CHILD = (
    "import os, signal, sys, time\n"
    "for s in (signal.SIGTERM, signal.SIGINT): signal.signal(s, lambda n, f: sys.exit(40 + n))\n"
    "print(os.getpid(), flush=True)\n"
    "time.sleep(60)\n"
)
# Runs CHILD (or a child that keeps the default handlers) under run_child; exits with its status.
PARENT = (
    "import sys\n"
    "from workbench.processes import run_child\n"
    "sys.exit(run_child([sys.executable, '-c', sys.argv[1]]).status)\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as reply:
            return reply.read().decode().strip() == "ok"
    except OSError:
        return False


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def wait_gone(pids: list[int], seconds: float = 5) -> list[int]:
    """The pids still running after up to `seconds` (an orphan is reaped by init, not at once)."""
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


def is_rank(process: psutil.Process) -> bool:
    try:
        argv = process.cmdline()
    except psutil.Error:  # gone already
        return False
    return "app.cli" in argv and "torch.distributed.run" not in argv


def start(argv: list[str]) -> subprocess.Popen:
    # Its own session: no controlling terminal (as under a supervisor), and a group to clean up.
    return subprocess.Popen(
        argv, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def clean_up(process: subprocess.Popen, started: list[psutil.Process] = ()) -> None:
    """SIGKILL whatever a failed test left: the process group, and `started` (torchrun's ranks leave it)."""
    for child in started:
        try:
            child.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_child_passes_the_signal_on_and_exits_with_the_childs_status(sig):
    parent = start([sys.executable, "-c", PARENT, CHILD])
    try:
        child = int(parent.stdout.readline())
        assert psutil.Process(child).ppid() == parent.pid
        parent.send_signal(sig)
        assert parent.wait(timeout=10) == 40 + sig
        assert wait_gone([child]) == []
    finally:
        clean_up(parent)


def test_a_child_ended_by_the_signal_gives_the_shells_status():
    default = "import os; print(os.getpid(), flush=True); import time; time.sleep(60)"
    parent = start([sys.executable, "-c", PARENT, default])
    try:
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=10) == 128 + signal.SIGTERM
        assert wait_gone([child]) == []
    finally:
        clean_up(parent)


def test_explore_stopped_with_sigterm_leaves_no_server(tmp_path):
    store = tmp_path / "features.duckdb"  # the server answers /_stcore/health before any page opens it
    store.write_bytes(b"")
    port = free_port()
    parent = start([sys.executable, "-m", "app.cli", "explore", str(store), "--port", str(port)])
    try:
        deadline = time.monotonic() + 60
        while not answers(port):
            assert parent.poll() is None, parent.stdout.read()
            assert time.monotonic() < deadline, "the explorer did not answer /_stcore/health"
            time.sleep(0.1)
        children = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
        assert children, "explore serves from a child process"
        parent.send_signal(signal.SIGTERM)
        status = parent.wait(timeout=20)
        assert wait_gone(children) == [], "the server outlived workbench explore"
        assert not answers(port)
        assert status == 0  # Streamlit's own status: it stops cleanly on SIGTERM
    finally:
        clean_up(parent)


def test_cache_with_nproc_stopped_with_sigterm_leaves_no_torchrun_or_rank(tmp_path):
    parent = start(
        [
            sys.executable,
            "-m",
            "app.cli",
            "cache",
            "--model",
            "demo",
            "--tokens",
            "65536",
            "--nproc",
            "2",
            "--out",
            str(tmp_path / "cache"),
        ]
    )
    started = []
    try:
        deadline = time.monotonic() + 120
        while True:  # torchrun's ranks run in sessions of their own: only torchrun can stop them
            started = psutil.Process(parent.pid).children(recursive=True)
            if sum(is_rank(p) for p in started) == 2:
                break
            assert parent.poll() is None, parent.stdout.read()
            assert time.monotonic() < deadline, "torchrun did not start two ranks"
            time.sleep(0.05)
        parent.send_signal(signal.SIGTERM)
        status = parent.wait(timeout=60)
        assert wait_gone([p.pid for p in started]) == [], "torchrun or a rank outlived workbench cache"
        assert status != 0 and "stopped by SIGTERM" in parent.stdout.read()
    finally:
        clean_up(parent, started)
