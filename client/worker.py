"""The site's resident ClientApp worker: one long-lived process serves every message of every run.

Flower 1.41's SuperNode in its default ``subprocess`` isolation starts ``flower-superexec``, which starts
one ``flwr-clientapp`` process per message; that process installs the run's FAB, imports the ClientApp
from it and exits after one reply. So every message re-imports torch and reloads the base model, and a
site runs whatever code the coordinator ships. ``fedtune site`` therefore starts
``flower-supernode --isolation process`` (which spawns nothing) plus this worker, which does what
flower-superexec + flwr-clientapp do, in one process that stays:

    loop: AcquireTask (claim the next pending ClientApp task, get its token)
          -> pull_task_input (message, context, run, FAB) with the task's token
          -> the FAB is checked (client/approval.py); never installed, never imported
          -> approved: run the INSTALLED client.secagg.secagg_app in this process, so client.app's
             process-wide runtime keeps the base model resident across messages and runs;
             refused: log "REFUSED run ..." and reply with an error
          -> push_message (the reply) and push_task_output (the updated context)

The per-task calls are Flower's own (flwr.supernode.runtime.run_clientapp's pull_task_input,
push_message, push_task_output and the task heartbeat), so the wire protocol is Flower's.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Collection, Mapping

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client.approval import check_fab, installed_file_hashes
from client.secagg import secagg_app

log = logging.getLogger("fedtune.site.worker")

# How often an idle worker asks the SuperNode for a task (Flower's SuperExec polls every 1 s).
DEFAULT_POLL_INTERVAL_S = 0.5
RETRY_AFTER_ERROR_S = 2.0


class TaskAborted(Exception):
    """The SuperNode ended the current task (Flower signals it with SIGINT: failed heartbeat, revoked token)."""


def _runtime_client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    # The Runtime API listens on 127.0.0.1 without TLS (fedtune site starts the SuperNode that way).
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def handle_message(message: Message, context: Context, fab_content: bytes, approved_fab_hashes: Collection[str],
                   installed: Mapping[str, str] | None = None) -> tuple[Message, str, str]:
    """(reply, Flower sub-status, details) for one message: refused unless its FAB is approved, else secagg_app's reply.

    `installed`: the worker's snapshot of the installed files (client.approval.installed_file_hashes).
    """
    approval = check_fab(fab_content, approved_fab_hashes, installed)
    if not approval.approved:
        reason = (f"REFUSED run {message.metadata.run_id}: FAB {approval.fab_sha256} is not approved by this "
                  f"site: {approval.reason}. Only the installed fedtune ClientApp runs here; add the hash to "
                  "approved_fab_hashes in site.yaml to approve this bundle.")
        log.error("%s", reason)
        return Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message), SubStatus.FAILED, reason
    try:
        return secagg_app(message=message, context=context), SubStatus.COMPLETED, ""
    except Exception as exc:  # pylint: disable=broad-exception-caught
        # As flwr-clientapp does: the coordinator gets an error reply, the worker goes on.
        log.exception("ClientApp raised an exception on %s message of run %d", message.metadata.message_type,
                      message.metadata.run_id)
        reason = f"{type(exc)}:<'{exc}'>"
        return (Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message),
                SubStatus.FAILED, reason)


def run_task(address: str, token: str, approved_fab_hashes: Collection[str], installed: Mapping[str, str]) -> None:
    """Serve one claimed task: pull its input, answer it, push the reply and the context back."""
    client = _runtime_client(address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    context = None
    sub_status, details = SubStatus.FAILED, "the resident worker failed before answering"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        started = time.perf_counter()
        reply, sub_status, details = handle_message(message, context, fab.content, approved_fab_hashes, installed)
        push_message(client, reply, context)
        log.info("run %d: %s %s message in %.2f s", run.run_id,
                 "answered" if sub_status == SubStatus.COMPLETED else "error reply to", message.metadata.message_type,
                 time.perf_counter() - started)
    finally:
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()


def serve(address: str, approved_fab_hashes: Collection[str], stop: threading.Event,
          poll_interval_s: float = DEFAULT_POLL_INTERVAL_S) -> None:
    """Claim and serve ClientApp tasks of the SuperNode at `address` until `stop` is set."""
    # The installed code as this process imported it (hashed now, not per message: see installed_file_hashes).
    installed = installed_file_hashes()
    acquirer = _runtime_client(address, "SuperExec")
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    try:
        while not stop.is_set():
            response = acquirer.AcquireTask(request)
            if not (response.HasField("task") and response.token):
                stop.wait(poll_interval_s)
                continue
            try:
                run_task(address, response.token, approved_fab_hashes, installed)
            except TaskAborted:
                log.warning("task %d of run %d was ended by the SuperNode; waiting for the next one",
                            response.task.task_id, response.task.run_id)
            except Exception:  # pylint: disable=broad-exception-caught
                # E.g. the run was stopped while its message waited: that task is lost, the worker is not.
                log.exception("task %d of run %d failed outside the ClientApp; waiting for the next one",
                              response.task.task_id, response.task.run_id)
    finally:
        acquirer.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m client.worker --runtime-api-address 127.0.0.1:PORT [--approved-fab-hash H ...]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    parser.add_argument("--approved-fab-hash", action="append", default=[], help="sha256 of an approved FAB")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_sigterm(_signum, _frame):
        stop.set()
        raise SystemExit(0)

    def on_sigint(_signum, _frame):
        # Flower's Runtime client and task heartbeat raise SIGINT in-process when the SuperNode ends a task;
        # that ends the task, not this worker (fedtune site stops the worker with SIGTERM).
        raise TaskAborted()

    if not logging.getLogger("fedtune").handlers:  # client.app attaches one under fedtune site (FEDTUNE_LOG_LEVEL)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigint)
    log.info("resident ClientApp worker ready (SuperNode Runtime API %s, %d allow-listed FAB hashes)",
             args.runtime_api_address, len(args.approved_fab_hash))
    while not stop.is_set():
        try:
            serve(args.runtime_api_address, args.approved_fab_hash, stop)
        except TaskAborted:
            continue  # a SIGINT between tasks
        except Exception:  # pylint: disable=broad-exception-caught
            # The Runtime API refused or failed the task request itself; keep the resident model and ask again.
            log.exception("asking the SuperNode for the next task failed; retrying in %.0f s", RETRY_AFTER_ERROR_S)
            stop.wait(RETRY_AFTER_ERROR_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
