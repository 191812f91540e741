"""Run a launcher (torchrun, a training script) as a subprocess that can never outlive its test."""

import contextlib
import os
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest


def run_process_tree(command: list[str], *, timeout: float, **popen: Any) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to its end, capturing its output; past ``timeout`` seconds kill it and all its descendants.

    torchrun starts each worker in a session of its own, so killing the launcher, or its process group, orphans a hung
    worker (one was still alive 70 minutes later). The launcher runs in a new session here; on timeout its group is
    stopped, so that it neither exits nor starts anything while its descendants are listed, and then every descendant's
    process group and its own are killed. The test then fails with what the processes had printed.
    """
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **popen
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException as error:  # the timeout, or an interrupted test run: leave nothing behind
        _kill_tree(process.pid)
        stdout, stderr = process.communicate(timeout=30)  # the pipes close with the last killed process
        if not isinstance(error, subprocess.TimeoutExpired):
            raise
        pytest.fail(
            f"still running after {timeout:g} s, killed with all its processes: {shlex.join(command)}\n"
            f"--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-3000:]}"
        )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGSTOP)
    groups = {pid}
    for child in _descendants(pid):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(child))
            os.kill(child, signal.SIGKILL)
    for group in groups - {os.getpgrp()}:  # never our own, should a descendant have joined it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """The ids of every process below ``pid``, from /proc (Linux) or else from ``ps``."""
    parents: list[tuple[int, int]] = []  # (process, its parent)
    if Path("/proc/self/stat").exists():
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                # "pid (command) state ppid ...": the command may hold spaces and parentheses.
                parents.append((int(stat.parent.name), int(stat.read_text().rpartition(")")[2].split()[1])))
    else:
        listing = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=True)
        parents = [(int(line.split()[0]), int(line.split()[1])) for line in listing.stdout.splitlines()]
    children: dict[int, list[int]] = {}
    for child, parent in parents:
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    pending = [pid]
    while pending:
        below = children.get(pending.pop(), [])
        found += below
        pending += below
    return found
