"""Progress of long work: simulation rounds, a site's local steps (tokens/s) and evaluation.

On a terminal: rich progress bars, all in one rich Progress per process (rich shows one live display per console,
and the in-process engine nests a site's step bar inside the coordinator's round bar). Anywhere else (CI logs,
redirected output, Ray actors, a site daemon's log): plain lines on the "fedtune.progress" logger, at most one per
PLAIN_INTERVAL_S per task plus one when it finishes, so a log stays readable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("fedtune.progress")

PLAIN_INTERVAL_S = 10.0
# Off a terminal rich assumes 80 columns and would wrap or elide the coordinator's summary table; a log file has
# no width, so print as wide as the table needs up to this (COLUMNS, when set, still wins).
PLAIN_CONSOLE_WIDTH = 240

_lock = threading.RLock()
_console = None
_bars = None  # the process's rich Progress while any bar is shown
_bars_in_use = 0


def console():
    """The process's rich Console for progress bars and the coordinator's lines (one, so the two interleave)."""
    global _console
    with _lock:
        if _console is None:
            from rich.console import Console

            _console = Console()
            if not _console.is_terminal and "COLUMNS" not in os.environ:
                _console = Console(width=PLAIN_CONSOLE_WIDTH)
        return _console


def use_console(new_console) -> None:
    """Make `new_console` the process's console (tests: rich Console(force_terminal=..., file=StringIO()))."""
    global _console
    with _lock:
        _console = new_console


class Task:
    """One unit of long work being counted: `advance` after each step, with what the rate is measured in."""

    def __init__(self, description: str, total: int, unit: str, rate_unit: str | None, plain: bool):
        self.description, self.total, self.unit, self.rate_unit, self.plain = description, total, unit, rate_unit, plain
        self.completed, self.rate_count = 0, 0.0
        self.start = self.last_line = time.perf_counter()
        self.bar_id = None

    def rate(self) -> str:
        """'1,234 tokens/s' (empty without a rate unit or before any time has passed)."""
        seconds = time.perf_counter() - self.start
        if not self.rate_unit or seconds <= 0:
            return ""
        return f"{self.rate_count / seconds:,.0f} {self.rate_unit}/s"

    def line(self) -> str:
        """The plain-mode words: 'description: 3/10 steps, 1,234 tokens/s, 2.1 s'."""
        parts = [f"{self.completed}/{self.total} {self.unit}", self.rate(),
                 f"{time.perf_counter() - self.start:.1f} s"]
        return f"{self.description}: " + ", ".join(p for p in parts if p)

    def advance(self, steps: int = 1, rate_count: float = 0.0) -> None:
        """Count `steps` more done and `rate_count` more of the rate unit (e.g. the step's tokens)."""
        self.completed += steps
        self.rate_count += rate_count
        if self.bar_id is not None:
            with _lock:
                if _bars is not None:
                    _bars.update(self.bar_id, advance=steps, rate=self.rate())
            return
        now = time.perf_counter()
        if self.plain and self.completed < self.total and now - self.last_line >= PLAIN_INTERVAL_S:
            self.last_line = now
            log.info(self.line())


def _start_bar(task: Task, completed: int) -> None:
    global _bars, _bars_in_use
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with _lock:
        if _bars is None:
            # transient: finished bars vanish, so the console keeps the round lines and the summary table.
            _bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[rate]}"),
                             TimeElapsedColumn(), console=console(), transient=True)
            _bars.start()
        _bars_in_use += 1
        task.bar_id = _bars.add_task(task.description, total=task.total, completed=completed, unit=task.unit,
                                     rate="")


def _stop_bar(task: Task) -> None:
    global _bars, _bars_in_use
    with _lock:
        if _bars is None or task.bar_id is None:
            return
        _bars.remove_task(task.bar_id)
        _bars_in_use -= 1
        if _bars_in_use == 0:
            _bars.stop()
            _bars = None


@contextmanager
def track(description: str, total: int, unit: str = "steps", rate_unit: str | None = None, completed: int = 0,
          plain: bool = True) -> Iterator[Task]:
    """A bar for `total` steps on a terminal console, else plain log lines (none when plain=False: the caller
    already prints a line per step, as the coordinator does per round)."""
    task = Task(description, total, unit, rate_unit, plain)
    task.completed = completed
    if console().is_terminal:
        _start_bar(task, completed)
    try:
        yield task
    finally:
        _stop_bar(task)
        if task.bar_id is None and plain and task.total > 0:
            log.info(task.line())
