"""Where the resident worker's push of a train reply spends its time, step by step, against a real SuperNode API.

    python -m simulations.bench.reply_push [--model llama-1b-random] [--repeats 5] [--out result.json]

The reply is built as a site builds it (client/task.py build_train_reply): the delta of the model's LoRA adapter
(random, seeded per repeat) encoded by the run's upload codec with error feedback and packed into one Array
(federation/packing.py), plus a MetricRecord and a ConfigRecord. The receiver is Flower's own SuperNode Runtime
API (flwr.supernode.main.create_app: FastAPI under uvicorn, in-memory NodeState and ObjectStore) in a process of
its own, as at a site; it holds one claimed ClientApp task per push. Each repeat pushes a different reply (its
chunks are new to the store, as every round's are).

The steps are those of Flower's push_message (flwr.supernode.runtime.run_clientapp), done one by one with Flower's own functions: the message's object id (every object deflated and its
content hashed; an Array's chunks are sliced and hashed here), the message proto, the object tree (inside
no_object_id_recompute, where each object's id is computed once more), the PushMessages call, the nested
objects, then per object to push its deflated content, the PushObjectRequest's serialization and the HTTP call
(the SuperNode parses the request, re-hashes and checks the content, stores it). "push_message" is Flower's
function end to end on another fresh reply, "push_reply" client/worker.py's (the same with every object id
computed once) on a third. sha256 counts the bytes hashed by object ids (in this
process) per push.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

RUN_ID = 1
NODE_ID = 1
STEPS = ("pack", "message-id", "message-proto", "object-tree", "push-messages-call", "nested-objects", "deflate",
         "request-serialize", "push-object-calls", "calls-worker-cpu", "calls-receiver-cpu", "steps-total",
         "push_message", "push_reply")
# Per repeat: the step-by-step push, Flower's push_message, and client/worker.py's push_reply (each its own task).
PUSHES_PER_REPEAT = 3


def serve_receiver(tasks: int) -> None:
    """The receiver process: Flower's SuperNode Runtime API with a run and `tasks` claimed ClientApp tasks.

    Prints "PORT TOKEN..." once listening, then serves until killed.
    """
    import logging
    import socket
    import threading

    import uvicorn

    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode.main import create_app
    from flwr.supernode.nodestate import NodeStateFactory

    # The receiver knows no instruction messages, so Flower logs an error per reply; it is not the benchmark's.
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    state = factory.state()
    state.set_node_id(NODE_ID)
    state.store_run(Run.create_empty(RUN_ID))
    tokens = []
    for _ in range(tasks):
        task_id = state.create_task(TaskType.CLIENT_APP, RUN_ID)
        tokens.append(state.claim_task(task_id))
        state.activate_task(task_id)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app=create_app(state_factory=factory), host="127.0.0.1", port=port,
                                           access_log=False, log_level="warning", workers=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    print(port, *tokens, flush=True)
    thread.join()


def reply_message(model: str, seed: int):
    """A train reply as client/task.py builds it: the packed, codec-encoded delta, metrics and a ConfigRecord."""
    import numpy as np

    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from federation.compression import ErrorFeedback, UploadCodec
    from federation.model import lora_shapes
    from federation.packing import pack_arrays
    from federation.protocol import DATA_FINGERPRINT_RECORD

    cfg = _config(model)
    rng = np.random.default_rng(seed)
    delta = {key: rng.standard_normal(shape, dtype=np.float32) * 1e-3
             for key, shape in lora_shapes(cfg.model, cfg.lora).items()}
    codec = UploadCodec(cfg.federation.upload_codec, **dict(cfg.federation.upload_codec_params))
    encoded = ErrorFeedback().encode(delta, codec)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, NODE_ID, seed
    instruction = Message(RecordDict(), dst_node_id=NODE_ID, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    started = time.perf_counter()
    record = pack_arrays(encoded)
    pack_seconds = time.perf_counter() - started
    # Small records of the reply's shape; their values do not matter here (the seed makes every reply new).
    metrics = MetricRecord({"num-examples": 1, "train-loss": 1.0, "train-seconds": 1.0, "seed": seed})
    fingerprint = ConfigRecord({"sha256": "0" * 64, "examples": 1})
    reply = Message(content=RecordDict({"arrays": record, "metrics": metrics, DATA_FINGERPRINT_RECORD: fingerprint}),
                    reply_to=instruction)
    return reply, pack_seconds


@functools.cache
def _config(model: str):
    """The run config with model=<model> (its LoRA shapes and upload codec), composed once per model."""
    from federation.compose import compose_config

    return compose_config([f"model={model}"])


class HashCounter:
    """Counts the calls and bytes of Flower's object-id hashing (flwr.supercore.inflatable.get_object_id)."""

    def __init__(self):
        self.calls, self.bytes = 0, 0

    @contextmanager
    def installed(self):
        """Wrap get_object_id where the object_id property looks it up."""
        from flwr.supercore.inflatable import inflatable_object

        original = inflatable_object.get_object_id

        def counted(content):
            self.calls += 1
            self.bytes += len(content)
            return original(content)

        inflatable_object.get_object_id = counted
        try:
            yield self
        finally:
            inflatable_object.get_object_id = original


def push_step_by_step(client, reply, receiver_cpu_seconds) -> dict[str, float]:
    """Flower's push_message, step by step with its own functions; seconds per step.

    Also the CPU seconds of this process and of the receiver (receiver_cpu_seconds()) during the PushObject calls.
    """
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=E0611
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PushAppMessagesRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_object import (get_all_nested_objects, get_object_tree,
                                                             no_object_id_recompute)

    seconds = dict.fromkeys(("deflate", "request-serialize", "push-object-calls", "calls-worker-cpu",
                             "calls-receiver-cpu"), 0.0)
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = seconds.get(step, 0.0) + now - clock
        clock = now

    reply.metadata.__dict__["_message_id"] = reply.object_id
    lap("message-id")
    proto_message = message_to_proto(remove_content_from_message(reply))
    lap("message-proto")
    with no_object_id_recompute():
        object_tree = get_object_tree(reply)
        lap("object-tree")
        response = client.PushMessages(PushAppMessagesRequest(messages_list=[proto_message],
                                                              message_object_trees=[object_tree]))
        lap("push-messages-call")
        to_push = set(response.objects_to_push)
        objects = get_all_nested_objects(reply)
        lap("nested-objects")
        node = Node(node_id=NODE_ID)
        for object_id, obj in objects.items():
            if object_id not in to_push:
                continue
            content = obj.deflate()
            lap("deflate")
            request = PushObjectRequest(node=node, run_id=RUN_ID, object_id=object_id, object_content=content,
                                        session_id=response.session_id)
            request.SerializeToString(deterministic=True)  # what the HTTP client sends (it serializes again)
            lap("request-serialize")
            worker_cpu, receiver_cpu = time.process_time(), receiver_cpu_seconds()
            if not client.PushObject(request).stored:
                raise RuntimeError(f"the SuperNode did not store object {object_id}")
            seconds["calls-worker-cpu"] += time.process_time() - worker_cpu
            seconds["calls-receiver-cpu"] += receiver_cpu_seconds() - receiver_cpu
            lap("push-object-calls")
    # The HTTP client serializes the request itself: the serialization timed above is also inside the calls.
    seconds["push-object-calls"] -= seconds["request-serialize"]
    return seconds


def measure(model: str, repeats: int) -> tuple[list[dict[str, float]], dict]:
    """`repeats` + 1 timed pushes (the first is a warm-up) against a fresh receiver process."""
    import psutil

    from flwr.app import Context, RecordDict
    from flwr.supernode.runtime.run_clientapp import push_message

    from client.worker import _runtime_client, push_reply

    receiver = subprocess.Popen([sys.executable, "-m", "simulations.bench.reply_push", "--receiver",
                                 str(PUSHES_PER_REPEAT * (repeats + 1))], stdout=subprocess.PIPE, text=True)
    try:
        port, *tokens = receiver.stdout.readline().split()
        receiver_process = psutil.Process(receiver.pid)

        def receiver_cpu_seconds() -> float:
            times = receiver_process.cpu_times()
            return times.user + times.system

        address = f"127.0.0.1:{port}"
        context = Context(run_id=RUN_ID, node_id=NODE_ID, state=RecordDict(), run_config={}, node_config={})
        measured, sizes = [], {}
        for repeat in range(repeats + 1):
            token = iter(tokens[PUSHES_PER_REPEAT * repeat:PUSHES_PER_REPEAT * (repeat + 1)])
            client = _runtime_client(address, "flwr-clientapp", next(token))
            reply, pack_seconds = reply_message(model, seed=PUSHES_PER_REPEAT * repeat)
            counter = HashCounter()
            started = time.perf_counter()
            with counter.installed():
                steps = push_step_by_step(client, reply, receiver_cpu_seconds)
            steps["steps-total"] = time.perf_counter() - started
            steps["pack"] = pack_seconds
            steps["sha256-calls"], steps["sha256-mb"] = counter.calls, counter.bytes / 1e6
            client.close()
            for offset, (name, push) in enumerate((("push_message", push_message), ("push_reply", push_reply)), 1):
                client = _runtime_client(address, "flwr-clientapp", next(token))
                reply, _ = reply_message(model, seed=PUSHES_PER_REPEAT * repeat + offset)
                counter = HashCounter()
                started = time.perf_counter()
                with counter.installed():
                    push(client, reply, context)
                steps[name] = time.perf_counter() - started
                steps[f"{name}-sha256-mb"] = counter.bytes / 1e6
                client.close()
            if repeat:
                measured.append(steps)
            sizes = {"reply_bytes": reply.content["arrays"].count_bytes(),
                     "chunks": len(reply.content["arrays"]["fedtune.packed"].slice_array())}
        return measured, sizes
    finally:
        receiver.kill()
        receiver.wait()
        receiver.stdout.close()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the step table and (with --out) writes the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b-random", help="conf/model option whose LoRA adapter is sent")
    parser.add_argument("--repeats", type=int, default=5, help="timed pushes (after one warm-up push)")
    parser.add_argument("--receiver", type=int, metavar="TASKS", help=argparse.SUPPRESS)  # the receiver process
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.receiver is not None:
        serve_receiver(args.receiver)
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    from simulations.bench import machine_info, write_result

    measured, sizes = measure(args.model, args.repeats)
    names = [*STEPS, "sha256-calls", "sha256-mb"]
    table = {name: {"median": statistics.median(r[name] for r in measured), "min": min(r[name] for r in measured),
                    "max": max(r[name] for r in measured)} for name in names}
    info = machine_info()
    print(f"push of one train reply ({sizes['reply_bytes']} bytes in {sizes['chunks']} chunks, model={args.model}), "
          f"{args.repeats} pushes after a warm-up; {info['cpu_model']}, {info['usable_cores']} cores, "
          f"flwr {info.get('flwr')}")
    print(f"  {'step':20s} {'median':>9s} {'min':>9s} {'max':>9s}")
    for name, row in table.items():
        print(f"  {name:20s} {row['median']:9.4f} {row['min']:9.4f} {row['max']:9.4f}")
    write_result(args.out or "", {"benchmark": "resident worker's push of a train reply, by step",
                                  "machine": info, "settings": {"model": args.model, "repeats": args.repeats, **sizes},
                                  "steps": table, "pushes": measured})
    return 0


if __name__ == "__main__":
    sys.exit(main())
