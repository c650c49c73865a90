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
             "client/app.py": (REPO / "client" / "app.py").read_bytes()}
    if modified:
        files["client/app.py"] += b"\nimport os  # anything else\n"
    return build_fab_from_files(files)[0]


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_refused_fab_gets_an_error_reply_and_the_clientapp_never_runs(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(worker, "client_app", lambda message, context: calls.append(message))
    message = instruction(RecordDict(), dst_node_id=7)
    fab = _fab(modified=True)
    with caplog.at_level("ERROR", logger="fedtune.site.worker"):
        answer, status, details = worker.handle_message(message, _context(), fab, approved_fab_hashes=())
    assert calls == []
    assert answer.has_error() and answer.error.code == ErrorCode.INVALID_FAB
    assert answer.metadata.reply_to_message_id == message.metadata.message_id
    assert status == SubStatus.FAILED and details == answer.error.reason
    assert f"REFUSED run 1: FAB {hashlib.sha256(fab).hexdigest()} is not approved" in caplog.text
    assert "client/app.py differs" in caplog.text


def test_approved_fab_runs_the_installed_clientapp(monkeypatch):
    message = instruction(RecordDict(), dst_node_id=7)
    monkeypatch.setattr(worker, "client_app", lambda message, context: reply(message, RecordDict()))
    answer, status, _ = worker.handle_message(message, _context(), _fab(modified=False), approved_fab_hashes=())
    assert not answer.has_error() and status == SubStatus.COMPLETED
    # ... and so does an allow-listed one, whatever its files.
    fab = _fab(modified=True)
    answer, status, _ = worker.handle_message(message, _context(), fab, [hashlib.sha256(fab).hexdigest()])
    assert not answer.has_error() and status == SubStatus.COMPLETED


def test_clientapp_exception_becomes_an_error_reply_and_the_worker_goes_on(monkeypatch):
    def broken(message: Message, context: Context) -> Message:
        raise ValueError("bad batch")

    monkeypatch.setattr(worker, "client_app", broken)
    answer, status, details = worker.handle_message(instruction(RecordDict(), dst_node_id=7), _context(),
                                                    _fab(modified=False), approved_fab_hashes=())
    assert answer.has_error() and answer.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "bad batch" in answer.error.reason and status == SubStatus.FAILED


class _FakeAcquirer:
    """Hands out the given (task id, run id) tasks once each, then no task."""

    def __init__(self, tasks):
        from flwr.proto.runtime_pb2 import AcquireTaskResponse
        from flwr.proto.task_pb2 import Task

        self.responses = [AcquireTaskResponse(task=Task(task_id=t, run_id=r), token=f"token-{t}") for t, r in tasks]

    def AcquireTask(self, request):  # noqa: N802 - Flower's method name
        from flwr.proto.runtime_pb2 import AcquireTaskResponse

        return self.responses.pop(0) if self.responses else AcquireTaskResponse()

    def close(self):
        pass


class _Closable:
    is_running = False

    def close(self):
        pass


def test_a_pull_that_never_completes_does_not_hold_up_the_next_task(monkeypatch):
    """The SuperNode may hand out a task whose message never arrives (its run stopped mid-download)."""
    import threading

    from flwr.app import Context, RecordDict

    stop, answered, finished = threading.Event(), [], []
    monkeypatch.setattr(worker, "_runtime_client", lambda *args, **kwargs: _FakeAcquirer([(1, 10), (2, 20)]))
    monkeypatch.setattr(worker, "claim", lambda address, token, task_id, run_id: worker.ClaimedTask(
        task_id, run_id, _Closable(), _Closable()))

    pulls = iter([10, 20])

    def pull_task_input(client):
        run_id = next(pulls)
        if run_id == 10:
            stop.wait()  # blocks like Flower's object pull of a message that never arrives
            raise RuntimeError("gave up")
        message = instruction(RecordDict(), dst_node_id=7)
        context = Context(run_id=run_id, node_id=7, node_config={}, state=RecordDict(), run_config={})
        return message, context, None, type("Fab", (), {"content": b""})()

    def handle_message(message, context, fab_content, approved, installed, policy=None):
        answered.append(context.run_id)
        stop.set()
        return reply(message, RecordDict()), SubStatus.COMPLETED, ""

    monkeypatch.setattr(worker, "pull_task_input", pull_task_input)
    monkeypatch.setattr(worker, "handle_message", handle_message)
    monkeypatch.setattr(worker, "push_reply", lambda client, message, context: None)
    monkeypatch.setattr(worker, "push_task_output", lambda client, context, sub_status, details:
                        finished.append((context.run_id if context else None, sub_status)))
    server = threading.Thread(target=worker.serve, args=("127.0.0.1:1", (), {}, stop, 0.01), daemon=True)
    server.start()
    server.join(timeout=10)
    assert not server.is_alive(), "the worker waited for the stuck pull"
    assert answered == [20] and (20, SubStatus.COMPLETED) in finished


class _RecordingRuntime:
    """The two Runtime API calls a reply push makes, recorded as the bytes Flower would send."""

    def __init__(self):
        self.requests: list[bytes] = []

    def PushMessages(self, request):  # noqa: N802 (Flower's RPC name)
        from flwr.proto.runtime_pb2 import PushAppMessagesResponse  # pylint: disable=E0611

        self.requests.append(request.SerializeToString(deterministic=True))
        tree = request.message_object_trees[0]
        ids, stack = [], [tree]
        while stack:
            node = stack.pop()
            ids.append(node.object_id)
            stack.extend(node.children)
        return PushAppMessagesResponse(objects_to_push=ids, session_id="s")

    def PushObject(self, request):  # noqa: N802
        from flwr.proto.message_pb2 import PushObjectResponse  # pylint: disable=E0611

        self.requests.append(request.SerializeToString(deterministic=True))
        return PushObjectResponse(stored=True)


def test_push_reply_sends_exactly_what_flowers_push_message_sends():
    import copy

    import numpy as np
    from flwr.app import Array, ArrayRecord, MetricRecord
    from flwr.supernode.runtime.run_clientapp import push_message

    content = RecordDict({"arrays": ArrayRecord({"packed": Array(np.arange(300_000, dtype=np.uint8))}),
                          "metrics": MetricRecord({"num-examples": 12})})
    message = reply(instruction(RecordDict(), 7), content)
    sent = []
    for push in (push_message, worker.push_reply):
        runtime = _RecordingRuntime()
        push(runtime, copy.deepcopy(message), _context())
        sent.append(runtime.requests)
    assert len(sent[0]) >= 2  # the message with its object tree, then at least one object
    assert sent[0] == sent[1]
