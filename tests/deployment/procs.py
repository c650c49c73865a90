"""Real-process helpers for the deployment tests: start in own sessions, wait on logs, kill whole process trees."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

STOP_GRACE_S = 10.0
POLL_S = 0.2


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Every process a test starts, by name; each gets its own session and a log file."""

    def __init__(self, log_dir: Path, env: dict[str, str], cwd: Path):
        self.log_dir = log_dir
        self.env = env
        self.cwd = cwd
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        """Start argv in a new session, output to log_dir/name.log (appended)."""
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def log_path(self, name: str) -> Path:
        """The log file of process `name`."""
        return self.log_dir / f"{name}.log"

    def log(self, name: str) -> str:
        """Everything process `name` printed so far."""
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def send_signal(self, name: str, sig: int) -> None:
        """Send sig to process `name`'s group and every descendant without waiting (e.g. SIGSTOP / SIGCONT)."""
        _signal_tree(self.procs[name].pid, sig)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send sig to the process group and every descendant (Flower detaches some children), then reap."""
        proc = self.procs[name]
        _signal_tree(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_tree(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_GRACE_S)

    def stop_all(self, last: Callable[[str], bool] = lambda name: False) -> None:
        """SIGTERM everything still running, SIGKILL what is left after STOP_GRACE_S; the processes `last` names go
        after the others (a site's SuperNode tells its coordinator that it leaves, and keeps retrying past
        STOP_GRACE_S if the coordinator went first)."""
        self._stop([name for name in self.procs if not last(name)])
        self._stop([name for name in self.procs if last(name)])

    def _stop(self, names: list[str]) -> None:
        procs = {name: self.procs[name] for name in names}
        trees = {name: _tree(proc.pid) for name, proc in procs.items()}
        for name, proc in procs.items():
            if proc.poll() is None:
                _signal_tree(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            time.sleep(POLL_S)
        for name, proc in procs.items():
            for member in trees[name]:
                try:
                    member.kill()
                except psutil.NoSuchProcess:
                    pass
            if proc.poll() is None:
                _signal_tree(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_GRACE_S)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_tree(pid: int, sig: int) -> None:
    members = _tree(pid)
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for member in members:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, context: Callable[[], str] = str):
    """Poll predicate until truthy (returned) or raise AssertionError naming `what` (+ context() output)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{context()}")


def tail(text: str, lines: int = 40) -> str:
    """Last lines of a log, for assertion messages."""
    return "\n".join(text.splitlines()[-lines:])
