"""Keep library noise off a simulation's console and in the run directory's log file instead.

A default `fedtune simulate` would interleave, from the driver and every Ray actor, Flower's INFO lines and
deprecation notices, transformers' FutureWarnings and weight-loading bars, bitsandbytes' import warnings and Ray's
log-dedup notices with the progress bars and the round table. `with library_output_to(path):` (the CLI's
simulate) writes all of that to `path` and leaves the console to fedtune's own lines:

- this process: every log record goes to the file; the console handlers pass only "fedtune" records and other
  libraries' errors; Python warnings become log records (logging.captureWarnings), so they land in the file;
- processes it starts (Ray's ClientApp actors inherit the environment): `redirect_output_if_asked()`, called when
  client.app is imported, points their stdout and stderr at the same file (O_APPEND: whole lines interleave), so
  nothing of theirs reaches Ray's log forwarding (and there are no lines for Ray to deduplicate).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LOG_FILE_NAME = "fedtune.log"
PROCESS_LOG_ENV = "FEDTUNE_PROCESS_LOG"
# The process that set PROCESS_LOG_ENV keeps its console (the in-process engine imports client.app there too).
PROCESS_LOG_OWNER_ENV = "FEDTUNE_PROCESS_LOG_OWNER"
CONSOLE_LOGGERS = ("fedtune", "__main__")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _for_the_console(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or record.name.split(".")[0] in CONSOLE_LOGGERS


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def library_output_to(path: str | Path) -> Iterator[Path]:
    """Within the block, route this process's log records and warnings, and its children's output, to `path`.

    See the module doc. On exit everything is put back (filters, handlers, levels, warning capture, progress bars,
    environment): a CLI command run in-process (tests, a notebook) must not keep filtering its caller's handlers.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root_level = root.level
    # Flower's logger has its own console handler and does not propagate: its INFO lines and deprecation notices
    # go to the file, its errors still to the console.
    # (A filter, not a level: Flower resets its handler's level when it configures logging again.)
    import flwr.common  # noqa: F401  (Flower adds its console handler on import: the filter must reach it)

    flwr = logging.getLogger("flwr")
    filtered = [(handler, _for_the_console) for handler in root.handlers if _is_console(handler)]
    filtered += [(handler, _errors_only) for handler in flwr.handlers if _is_console(handler)]
    # logging keeps the replaced warnings.showwarning here while it captures warnings (no public accessor).
    was_capturing = getattr(logging, "_warnings_showwarning", None) is not None
    bars_were_on = _weight_loading_bars(False)
    environment = {name: os.environ.get(name) for name in (PROCESS_LOG_ENV, PROCESS_LOG_OWNER_ENV)}
    for handler, console_filter in filtered:
        handler.addFilter(console_filter)
    root.addHandler(file_handler)
    flwr.addHandler(file_handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    os.environ[PROCESS_LOG_ENV] = str(path)
    os.environ[PROCESS_LOG_OWNER_ENV] = str(os.getpid())
    try:
        yield path
    finally:
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        logging.captureWarnings(was_capturing)
        _weight_loading_bars(bars_were_on)
        root.setLevel(root_level)
        root.removeHandler(file_handler)
        flwr.removeHandler(file_handler)
        file_handler.close()
        for handler, console_filter in filtered:
            handler.removeFilter(console_filter)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _weight_loading_bars(on: bool) -> bool:
    """Turn transformers' tqdm bars on or off; whether they were on.

    The bars write straight to this process's stderr, the console (the in-process engine loads models here);
    the actors' bars reach the file with the rest of their stderr.
    """
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    were_on = transformers_logging.is_progress_bar_enabled()
    if on:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()
    return were_on


def redirect_output_if_asked() -> bool:
    """In a process started under `library_output_to`: stdout and stderr to its file. True if redirected."""
    path = os.environ.get(PROCESS_LOG_ENV)
    if not path or os.environ.get(PROCESS_LOG_OWNER_ENV) == str(os.getpid()):
        return False
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for stream, target in ((sys.stdout, 1), (sys.stderr, 2)):
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass
        os.dup2(fd, target)
    os.close(fd)
    return True
