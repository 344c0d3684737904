"""Child processes that stop when the workbench is stopped.

`run_child(command)` runs a command and waits for it, as `subprocess.call` does, but a SIGTERM or
SIGINT that reaches this process meanwhile is passed on to the child, which then stops (and
stops its own children: torchrun its ranks) before this process returns the child's status.
Without it, `kill PID` on `workbench explore` ended the CLI and left its Streamlit server
answering on the port, and `subprocess.call` answered Ctrl-C by SIGKILLing the child 0.25 s
later, too soon for torchrun to stop its ranks (they run in sessions of their own).

A SIGINT is not passed on when this process is in the foreground of its terminal: Ctrl-C
already reached the child, which shares our process group, and a second SIGINT would cut short
the child's own shutdown (torchrun's, which stops the ranks). Every launch site uses this one
helper: `workbench explore` (Streamlit) and `--nproc N` (torchrun).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Mapping, NamedTuple, Sequence

FORWARDED = (signal.SIGTERM, signal.SIGINT)


class ChildExit(NamedTuple):
    status: int
    """The child's exit status as a shell reports it: its exit code, or 128 + N if signal N ended it."""
    signal: int | None
    """The signal (SIGTERM or SIGINT) this process received while the child ran, if any."""


def run_child(command: Sequence[str], env: Mapping[str, str] | None = None) -> ChildExit:
    """Run `command` (argv list; `env` replaces the environment if given) until it exits,
    passing SIGTERM/SIGINT received meanwhile on to it; never leaves it running. Signals are only
    handled from the main thread (elsewhere Python cannot install handlers): there this is a plain wait.
    Raises OSError if the command cannot be started."""
    if threading.current_thread() is not threading.main_thread():
        return ChildExit(_shell_status(subprocess.call(list(command), env=env)), None)
    received: list[int] = []
    child: list[subprocess.Popen] = []

    def pass_on(signum: int) -> None:
        if child and child[0].poll() is None and not (signum == signal.SIGINT and _in_terminal_foreground()):
            child[0].send_signal(signum)

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        pass_on(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        child.append(subprocess.Popen(list(command), env=env))
        for signum in list(received):  # arrived while the child was being started
            pass_on(signum)
        code = child[0].wait()
    finally:
        if child and child[0].poll() is None:  # only if wait() itself failed: never leave it behind
            child[0].kill()
            child[0].wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return ChildExit(_shell_status(code), received[0] if received else None)


def _shell_status(code: int) -> int:
    return 128 - code if code < 0 else code  # Popen reports death by signal N as -N


def _in_terminal_foreground() -> bool:
    """Whether this process's group is the foreground group of its controlling terminal (then
    a Ctrl-C there went to the whole group, the child included)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY)
    except OSError:  # no controlling terminal: the signal came from kill, a supervisor, a script
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)
