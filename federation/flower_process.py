"""Supervise a Flower CLI process (flower-superlink / flower-supernode) and everything it spawns.

Shared by the site daemon (client/daemon.py) and the coordinator (server/coordinator.py), so neither imports
the other.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger("fedtune.site")  # the logger these lines always went to (site and coordinator alike)

DEFAULT_STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.2
DEFAULT_HEALTH_INTERVAL_S = 5.0
OUTPUT_TAIL_LINES = 200



def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux only: if the daemon is SIGKILLed, the kernel stops its Flower child too, so a killed
    # daemon never leaves an orphan SuperNode/SuperLink holding the port (or the node's identity).
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class FlowerProcess:
    """A Flower CLI process (flower-superlink / flower-supernode) supervised from the foreground.

    Flower detaches some of its own children (the SuperLink starts ``flower-superexec`` in a new
    session), so stopping only the direct child can leave them running; ``stop`` snapshots the whole
    process tree with psutil (a Flower dependency) and stops every member.
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                 stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S, keep_output_tail: bool = False,
                 on_line: Callable[[str], None] | None = None, name: str | None = None):
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name  # in log lines; e.g. flower-supernode run as `python -m ...`
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen | None = None
        self.stop_requested = False
        self.unhealthy = False
        self.keep_output_tail = keep_output_tail
        # Last lines of its combined stdout/stderr (with keep_output_tail), to explain a failure.
        self.output_tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
        self._reader: threading.Thread | None = None
        self.on_line = on_line

    def start(self) -> None:
        """Start the process; its output goes to this process's stdout (copied line by line with keep_output_tail)."""
        if not self.keep_output_tail:
            self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, preexec_fn=_die_with_parent)
            return
        self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, preexec_fn=_die_with_parent,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace", bufsize=1)
        self._reader = threading.Thread(target=self._forward_output, daemon=True)
        self._reader.start()

    def _forward_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.output_tail.append(line)
            if self.on_line is not None:
                self.on_line(line)

    def poll(self) -> int | None:
        """Exit code, or None while running."""
        return None if self.process is None else self.process.poll()

    def stop(self) -> int:
        """SIGTERM the process tree, SIGKILL what is left after stop_timeout_s; returns the child's exit code."""
        import psutil

        assert self.process is not None, "not started"
        try:
            tree = [psutil.Process(self.process.pid)] + psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        # Flower shuts its children down itself on SIGTERM; the rest of the tree only gets a signal if
        # something is still alive afterwards.
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", self.name, self.stop_timeout_s)
        leftovers = [p for p in tree if _is_alive(p)]
        for proc in leftovers:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(leftovers, timeout=self.stop_timeout_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        code = self.process.wait()
        if self._reader is not None:
            # Children that outlive it may hold the pipe open; do not wait for them forever.
            self._reader.join(timeout=self.stop_timeout_s)
        return code

    def output_contains(self, text: str) -> bool:
        """Whether `text` is in the last OUTPUT_TAIL_LINES lines of output (needs keep_output_tail)."""
        return any(text in line for line in list(self.output_tail))

    def run_in_foreground(self, health_check: Callable[[], bool] | None = None,
                          health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S,
                          before_requested_stop: Callable[[], None] | None = None) -> int:
        """Start, wait until it exits, this process gets SIGINT/SIGTERM or health_check() is False (then stop it).

        Returns the exit code (0 after a requested stop); `unhealthy` says whether the health check stopped it.
        before_requested_stop() runs after SIGINT/SIGTERM, before the process is stopped.
        """

        def request_stop(signum, _frame):
            log.info("received %s, stopping %s", signal.Signals(signum).name, self.name)
            self.stop_requested = True

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.process is None:
                self.start()
            next_check = time.monotonic() + health_interval_s
            while self.poll() is None and not self.stop_requested:
                time.sleep(POLL_INTERVAL_S)
                if health_check is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + health_interval_s
                    if self.poll() is None and not health_check():
                        self.unhealthy = True
                        break
            if self.stop_requested and before_requested_stop is not None:
                before_requested_stop()
            code = self.stop()
            return 0 if self.stop_requested else code
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _is_alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def flower_executable(name: str) -> str:
    """Path of a Flower console script: next to this interpreter first (venv), then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH; is flwr installed?")
    return found


def flower_env(flwr_home: str | Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: offline, no telemetry, own FLWR_HOME, and Flower's scripts on PATH."""
    env = dict(os.environ)
    # The SuperLink/SuperNode spawn flower-superexec, flwr-serverapp and flwr-clientapp by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env.update(extra or {})
    return env
