"""library_output_to (federation/run_log.py): library output to the run's file within the block, and nothing of
it left behind afterwards (the CLI runs in-process in tests and notebooks: its caller's handlers stay as they were)."""

from __future__ import annotations

import logging
import os
import warnings

from federation.run_log import PROCESS_LOG_ENV, PROCESS_LOG_OWNER_ENV, library_output_to


def _state(*handlers: logging.Handler) -> tuple:
    import flwr.common  # noqa: F401  (importing Flower adds its console handler: not the block's doing)

    root, flwr = logging.getLogger(), logging.getLogger("flwr")
    return (list(root.handlers), list(flwr.handlers), root.level, [list(h.filters) for h in handlers],
            getattr(logging, "_warnings_showwarning", None) is not None,
            os.environ.get(PROCESS_LOG_ENV), os.environ.get(PROCESS_LOG_OWNER_ENV))


def test_the_block_routes_library_output_to_the_file_and_puts_everything_back(tmp_path, monkeypatch):
    from transformers.utils import logging as transformers_logging

    monkeypatch.delenv(PROCESS_LOG_ENV, raising=False)
    monkeypatch.setenv(PROCESS_LOG_OWNER_ENV, "an earlier owner")
    console = logging.StreamHandler()
    logging.getLogger().addHandler(console)
    try:
        bars_before = transformers_logging.is_progress_bar_enabled()
        before = _state(console)
        with library_output_to(tmp_path / "run" / "fedtune.log") as path:
            assert console.filters  # the console passes fedtune's records and others' errors only
            assert os.environ[PROCESS_LOG_ENV] == str(path)
            logging.getLogger("some.library").warning("library notice")
            warnings.warn("a library's FutureWarning", FutureWarning)
            assert not transformers_logging.is_progress_bar_enabled()
        text = path.read_text()
        assert "library notice" in text and "a library's FutureWarning" in text
        assert _state(console) == before
        assert transformers_logging.is_progress_bar_enabled() == bars_before
        logging.getLogger("some.library").warning("after the block")
        assert "after the block" not in path.read_text()
    finally:
        logging.getLogger().removeHandler(console)


def test_the_block_puts_everything_back_when_the_run_fails(tmp_path):
    console = logging.StreamHandler()
    logging.getLogger().addHandler(console)
    try:
        before = _state(console)
        try:
            with library_output_to(tmp_path / "fedtune.log"):
                raise RuntimeError("the run failed")
        except RuntimeError:
            pass
        assert _state(console) == before
    finally:
        logging.getLogger().removeHandler(console)
