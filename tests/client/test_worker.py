"""The resident worker's per-message decision (client/worker.py handle_message), in-process, no SuperNode."""

from __future__ import annotations

import hashlib
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.cli.build import build_fab_from_files
from flwr.common.constant import ErrorCode, SubStatus

import client.worker as worker
from tests.flower_messages import instruction, reply

REPO = Path(__file__).resolve().parents[2]


def _fab(modified: bool) -> bytes:
    files = {"pyproject.toml": (REPO / "pyproject.toml").read_bytes(),
             "client/secagg.py": (REPO / "client" / "secagg.py").read_bytes()}
    if modified:
        files["client/secagg.py"] += b"\nimport os  # anything else\n"
    return build_fab_from_files(files)[0]


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_refused_fab_gets_an_error_reply_and_the_clientapp_never_runs(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(worker, "secagg_app", lambda message, context: calls.append(message))
    message = instruction(RecordDict(), dst_node_id=7)
    fab = _fab(modified=True)
    with caplog.at_level("ERROR", logger="fedtune.site.worker"):
        answer, status, details = worker.handle_message(message, _context(), fab, approved_fab_hashes=())
    assert calls == []
    assert answer.has_error() and answer.error.code == ErrorCode.INVALID_FAB
    assert answer.metadata.reply_to_message_id == message.metadata.message_id
    assert status == SubStatus.FAILED and details == answer.error.reason
    assert f"REFUSED run 1: FAB {hashlib.sha256(fab).hexdigest()} is not approved" in caplog.text
    assert "client/secagg.py differs" in caplog.text


def test_approved_fab_runs_the_installed_clientapp(monkeypatch):
    message = instruction(RecordDict(), dst_node_id=7)
    monkeypatch.setattr(worker, "secagg_app", lambda message, context: reply(message, RecordDict()))
    answer, status, _ = worker.handle_message(message, _context(), _fab(modified=False), approved_fab_hashes=())
    assert not answer.has_error() and status == SubStatus.COMPLETED
    # ... and so does an allow-listed one, whatever its files.
    fab = _fab(modified=True)
    answer, status, _ = worker.handle_message(message, _context(), fab, [hashlib.sha256(fab).hexdigest()])
    assert not answer.has_error() and status == SubStatus.COMPLETED


def test_clientapp_exception_becomes_an_error_reply_and_the_worker_goes_on(monkeypatch):
    def broken(message: Message, context: Context) -> Message:
        raise ValueError("bad batch")

    monkeypatch.setattr(worker, "secagg_app", broken)
    answer, status, details = worker.handle_message(instruction(RecordDict(), dst_node_id=7), _context(),
                                                    _fab(modified=False), approved_fab_hashes=())
    assert answer.has_error() and answer.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "bad batch" in answer.error.reason and status == SubStatus.FAILED
