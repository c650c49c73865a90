"""Keep library noise off a simulation's console and in the run directory's log file instead.

A default `fedtune simulate` would interleave, from the driver and every Ray actor, Flower's INFO lines and
deprecation notices, transformers' FutureWarnings and weight-loading bars, bitsandbytes' import warnings and Ray's
log-dedup notices with the progress bars and the round table. `send_library_output_to(path)` (the CLI calls it)
writes all of that to `path` and leaves the console to fedtune's own lines:

- this process: every log record goes to the file; the console handlers pass only "fedtune" records and other
  libraries' errors; Python warnings become log records (logging.captureWarnings), so they land in the file;
- processes it starts (Ray's ClientApp actors inherit the environment): `redirect_output_if_asked()`, called when
  client.app is imported, points their stdout and stderr at the same file (O_APPEND: whole lines interleave), so
  nothing of theirs reaches Ray's log forwarding (and there are no lines for Ray to deduplicate).
"""

from __future__ import annotations

import logging
import os
import sys
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


def send_library_output_to(path: str | Path) -> Path:
    """Route this process's log records and warnings, and its children's output, to `path` (see module doc)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_for_the_console)
    root.addHandler(file_handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    # Flower's logger has its own console handler and does not propagate: its INFO lines and deprecation notices
    # go to the file, its errors still to the console.
    # (A filter, not a level: Flower resets its handler's level when it configures logging again.)
    import flwr.common  # noqa: F401  (Flower adds its console handler on import: the filter must reach it)

    flwr = logging.getLogger("flwr")
    for handler in flwr.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_errors_only)
    flwr.addHandler(file_handler)
    logging.captureWarnings(True)
    _no_weight_loading_bars_here()
    os.environ[PROCESS_LOG_ENV] = str(path)
    os.environ[PROCESS_LOG_OWNER_ENV] = str(os.getpid())
    return path


def _no_weight_loading_bars_here() -> None:
    # tqdm bars write straight to this process's stderr, the console (the in-process engine loads models here);
    # the actors' bars reach the file with the rest of their stderr.
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    transformers_logging.disable_progress_bar()


def redirect_output_if_asked() -> bool:
    """In a process started under `send_library_output_to`: stdout and stderr to its file. True if redirected."""
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
