"""The site's resident ClientApp worker: one long-lived process serves every message of every run.

Flower 1.41's SuperNode in its default ``subprocess`` isolation starts ``flower-superexec``, which starts
one ``flwr-clientapp`` process per message; that process installs the run's FAB, imports the ClientApp
from it and exits after one reply. So every message re-imports torch and reloads the base model, and a
site runs whatever code the coordinator ships. ``fedtune site`` therefore starts
``flower-supernode --isolation process`` (which spawns nothing) plus this worker, which does what
flower-superexec + flwr-clientapp do, in one process that stays:

    loop: AcquireTask (claim the next pending ClientApp task, get its token, start its heartbeat)
          -> pull_task_input (message, context, run, FAB) with the task's token, in a thread of its own
          -> in the main thread, one message at a time: the FAB is checked (client/approval.py); never installed, never imported
          -> approved: run the INSTALLED client.app.app in this process, so client.app's
             process-wide runtime keeps the base model resident across messages and runs;
             refused: log "REFUSED run ..." and reply with an error
          -> push_reply (the reply) and push_task_output (the updated context)

The per-task calls are Flower's own (flwr.supernode.runtime.run_clientapp's pull_task_input, push_task_output,
HeartbeatSender; push_reply is its push_message with the object ids computed once), so the wire protocol is
Flower's.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import queue
import secrets
import signal
import sys
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import httpx

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.app.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PushAppMessagesRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_push_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import push_objects
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import RunNotRunningException
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_task_output

from federation.protocol import SITE_POLICY_REFUSED_ERROR

from client.approval import check_fab, installed_file_hashes
from client.app import app as client_app
from client.site_policy import NODE_POLICY_KEY, SitePolicy, SiteRefusal, policy_summary
from client.task import freeze_resident_objects

log = logging.getLogger("fedtune.site.worker")

# How often an idle worker asks the SuperNode for a task (Flower's SuperExec polls every 1 s).
DEFAULT_POLL_INTERVAL_S = 0.5
RETRY_AFTER_ERROR_S = 2.0


def _runtime_client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    # The Runtime API listens on 127.0.0.1 without TLS (fedtune site starts the SuperNode that way).
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def handle_message(message: Message, context: Context, fab_content: bytes, approved_fab_hashes: Collection[str],
                   installed: Mapping[str, str] | None = None,
                   policy: SitePolicy | None = None) -> tuple[Message, str, str]:
    """(reply, Flower sub-status, details) for one message: refused unless its FAB is approved, else client_app's reply.

    `installed`: the worker's snapshot of the installed files (client.approval.installed_file_hashes).
    `policy`: the site's (client/site_policy.py); the ClientApp sees it in its node config and enforces it.
    """
    approval = check_fab(fab_content, approved_fab_hashes, installed)
    if not approval.approved:
        reason = (f"REFUSED run {message.metadata.run_id}: FAB {approval.fab_sha256} is not approved by this "
                  f"site: {approval.reason}. Only the installed fedtune ClientApp runs here; add the hash to "
                  "approved_fab_hashes in site.yaml to approve this bundle.")
        log.error("%s", reason)
        return Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message), SubStatus.FAILED, reason
    node_config = context.node_config
    if policy is not None:
        context.node_config = {**node_config, NODE_POLICY_KEY: policy.to_json()}
    try:
        return client_app(message=message, context=context), SubStatus.COMPLETED, ""
    except SiteRefusal as refusal:  # raised once training had begun (the privacy ledger): the reason is the reply
        log.error("REFUSED %s message of run %d: %s", message.metadata.message_type, message.metadata.run_id, refusal)
        reason = f"REFUSED by the site's policy: {refusal}"
        return (Message(Error(code=SITE_POLICY_REFUSED_ERROR, reason=reason), reply_to=message),
                SubStatus.FAILED, reason)
    except Exception as exc:  # pylint: disable=broad-exception-caught
        # As flwr-clientapp does: the coordinator gets an error reply, the worker goes on. An exception's message
        # may quote site data (a library error echoing a text), so by default only its type leaves the site.
        incident = secrets.token_hex(4)
        log.exception("ClientApp raised an exception on %s message of run %d (incident %s)",
                      message.metadata.message_type, message.metadata.run_id, incident)
        if policy is None or policy.error_details:
            reason = f"{type(exc)}:<'{exc}'>"
        else:
            reason = (f"{type(exc).__name__} at the site (incident {incident}: the site's log has the details; "
                      "this site sends no error messages, policy.error_details)")
        return (Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message),
                SubStatus.FAILED, reason)
    finally:
        context.node_config = node_config  # the SuperNode keeps the Context it gets back: as it sent it


@dataclass
class ClaimedTask:
    """A task this worker claimed: its Runtime API client and heartbeat, and (once pulled) its input."""

    task_id: int
    run_id: int
    client: RuntimeHttpClient
    heartbeat: HeartbeatSender
    message: Message | None = None
    context: Context | None = None
    fab_content: bytes = b""


def _heartbeat_fn(client: RuntimeHttpClient, task_id: int):
    """Flower's task heartbeat, without its SIGINT on a lapsed task.

    flwr's make_task_heartbeat_fn_http raises SIGINT in the process when the SuperNode no longer knows the
    task, which ends a one-task flwr-clientapp process; here it would interrupt whichever task the worker is
    running, so a lapsed task is only logged (its reply is then refused by the SuperNode).
    """
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except (httpx.HTTPStatusError, RunNotRunningException) as exc:
            log.warning("task %d: heartbeat refused (%s); the SuperNode ended it", task_id, exc)
            return True  # do not retry: the task is over
        if not response.success:
            log.warning("task %d: the SuperNode no longer counts this task as running", task_id)
        return True

    return beat


def claim(address: str, token: str, task_id: int, run_id: int) -> ClaimedTask:
    """Start the heartbeat of a task just claimed with `token`."""
    client = _runtime_client(address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(_heartbeat_fn(client, task_id))
    heartbeat.start()
    return ClaimedTask(task_id, run_id, client, heartbeat)


def finish(task: ClaimedTask, sub_status: str, details: str) -> None:
    """Report the task's outcome and updated context to the SuperNode; stop its heartbeat."""
    try:
        push_task_output(client=task.client, context=task.context, sub_status=sub_status, details=details)
    except RunNotRunningException:
        log.warning("task %d: run %d is no longer running; outcome not reported", task.task_id, task.run_id)
    finally:
        if task.heartbeat.is_running:
            task.heartbeat.stop()
        task.client.close()


def fetch(task: ClaimedTask, ready: queue.Queue) -> None:
    """Pull the task's input (message, context, run, FAB) and queue it for the ClientApp; runs in its own thread.

    Pulls run in their own threads because one may wait a long time (up to Flower's 2 h object-pull limit):
    the SuperNode creates a task before it has downloaded the message, and a message whose run stopped
    during that download never completes. Such a pull must not hold up the other tasks.
    """
    try:
        task.message, task.context, _, fab = pull_task_input(task.client)
        task.fab_content = fab.content
    except (Exception, RunNotRunningException) as exc:  # pylint: disable=broad-exception-caught
        log.warning("task %d of run %d: could not pull its message (%s: %s); dropped", task.task_id, task.run_id,
                    type(exc).__name__, exc)
        finish(task, SubStatus.FAILED, f"pulling the task input failed: {exc}")
        return
    ready.put(task)


def push_reply(client: RuntimeHttpClient, message: Message, context: Context) -> None:
    """Flower 1.41's run_clientapp.push_message, with the reply's object ids computed once instead of twice.

    Flower's computes the message id (deflating and hashing every chunk of the payload) before it enters
    no_object_id_recompute, and builds the object tree inside it, which computes every id again: ~8 of 88 ms for
    an 11.3 MB reply on the 2-core VM (BENCHMARKS.md, "The reply's push"). Here both are inside one
    no_object_id_recompute; the requests are byte-identical to Flower's (tests/client/test_worker.py).
    """
    with no_object_id_recompute():
        message.metadata.__dict__["_message_id"] = message.object_id
        proto_message = message_to_proto(remove_content_from_message(message))
        object_tree = get_object_tree(message)
        pushed = client.PushMessages(PushAppMessagesRequest(messages_list=[proto_message],
                                                            message_object_trees=[object_tree]))
        del proto_message
        all_objects = get_all_nested_objects(message)
        del message
        push_objects(all_objects,
                     make_push_object_fn_protobuf(client.PushObject, Node(node_id=context.node_id),
                                                  run_id=context.run_id, session_id=pushed.session_id),
                     object_ids_to_push=set(pushed.objects_to_push))


def answer(task: ClaimedTask, approved_fab_hashes: Collection[str], installed: Mapping[str, str],
           policy: SitePolicy | None = None) -> None:
    """Run the ClientApp (or refuse) on a pulled task, push the reply and report the task's outcome."""
    assert task.message is not None and task.context is not None
    sub_status, details = SubStatus.FAILED, "the resident worker failed before answering"
    # Flower stamps new instruction messages with the running task's identity (process-wide); pulls of other
    # tasks may have set it since this task's pull.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task.task_id, task.run_id, task.context.node_id
    try:
        started = time.perf_counter()
        reply, sub_status, details = handle_message(task.message, task.context, task.fab_content,
                                                    approved_fab_hashes, installed, policy=policy)
        push_reply(task.client, reply, task.context)
        log.info("run %d: %s %s message in %.2f s", task.run_id,
                 "answered" if sub_status == SubStatus.COMPLETED else "error reply to",
                 task.message.metadata.message_type, time.perf_counter() - started)
    except (Exception, RunNotRunningException) as exc:  # pylint: disable=broad-exception-caught
        log.warning("task %d of run %d: reply not delivered (%s: %s)", task.task_id, task.run_id,
                    type(exc).__name__, exc)
        sub_status, details = SubStatus.FAILED, f"reply not delivered: {exc}"
    finally:
        finish(task, sub_status, details)
    freeze_resident_objects()  # off the reply's path: once per base model load


def serve(address: str, approved_fab_hashes: Collection[str], installed: Mapping[str, str], stop: threading.Event,
          poll_interval_s: float = DEFAULT_POLL_INTERVAL_S, policy: SitePolicy | None = None) -> None:
    """Claim every ClientApp task of the SuperNode at `address` and answer them one at a time until `stop` is set.

    Each claimed task's input is pulled in its own thread; the ClientApp runs only in this (the main)
    thread, one message at a time, in the order their inputs became complete.
    """
    acquirer = _runtime_client(address, "SuperExec")
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    ready: queue.Queue[ClaimedTask] = queue.Queue()
    try:
        while not stop.is_set():
            while not ready.empty():
                answer(ready.get(), approved_fab_hashes, installed, policy=policy)
            response = acquirer.AcquireTask(request)
            if response.HasField("task") and response.token:
                task = claim(address, response.token, response.task.task_id, response.task.run_id)
                threading.Thread(target=fetch, args=(task, ready), daemon=True,
                                 name=f"fetch-task-{task.task_id}").start()
                continue  # there may be more pending tasks
            try:
                answer(ready.get(timeout=poll_interval_s), approved_fab_hashes, installed, policy=policy)
            except queue.Empty:
                pass
    finally:
        acquirer.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m client.worker --runtime-api-address 127.0.0.1:PORT [--approved-fab-hash H ...]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    parser.add_argument("--approved-fab-hash", action="append", default=[], help="sha256 of an approved FAB")
    parser.add_argument("--site-policy", help="the site's policy as JSON (client/site_policy.py; fedtune site "
                        "passes site.yaml's); without it the worker enforces none")
    args = parser.parse_args(argv)
    policy = None if args.site_policy is None else SitePolicy.from_json(args.site_policy)
    stop = threading.Event()

    def on_sigterm(_signum, _frame):
        if stop.is_set():
            return  # already exiting (the daemon and a process-group signal may both send SIGTERM)
        stop.set()
        raise SystemExit(0)

    def on_sigint(_signum, _frame):
        # Flower's Runtime client raises SIGINT in-process when the SuperNode rejects a task's token (401), to end
        # a one-task flwr-clientapp process; here that task's calls fail on their own and the worker goes on.
        # (fedtune site stops the worker with SIGTERM.)
        log.debug("SIGINT ignored")

    if not logging.getLogger("fedtune").handlers:  # client.app attaches one under fedtune site (FEDTUNE_LOG_LEVEL)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, on_sigterm)
    # `kill -USR1 <worker pid>` prints every thread's stack: how to see where a stuck worker waits.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGINT, on_sigint)
    log.info("resident ClientApp worker ready (SuperNode Runtime API %s, %d allow-listed FAB hashes)",
             args.runtime_api_address, len(args.approved_fab_hash))
    if policy is not None:
        log.info("site policy: %s", policy_summary(policy))
    else:
        log.warning("no site policy: every message is served as the coordinator configures it")
    # The installed code as this process imported it (hashed once: see client.approval.installed_file_hashes).
    installed = installed_file_hashes()
    while not stop.is_set():
        try:
            serve(args.runtime_api_address, args.approved_fab_hash, installed, stop, policy=policy)
        except (Exception, RunNotRunningException):  # pylint: disable=broad-exception-caught
            # The Runtime API refused or failed the task request itself; keep the resident model and ask again.
            log.exception("asking the SuperNode for the next task failed; retrying in %.0f s", RETRY_AFTER_ERROR_S)
            stop.wait(RETRY_AFTER_ERROR_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
