"""A site's time per train message outside the training loop: resident worker vs a fresh process per message (CPU).

    python -m simulations.bench.site_worker [--messages 5] [--out result.json] [hydra overrides, default model=tiny]

Both modes run the installed ClientApp (client.app.app) on the same train message (demo data,
partition 0 of 2); "outside the training loop" is the handler's wall time minus the trainer's own
`train-seconds` metric (and minus the benchmark's own building of the message).

  resident     what `fedtune site` does now (client/worker.py): one process answers every message; the base
               model is loaded by the first message and stays. The first message is reported separately.
  per_process  what Flower 1.41's default SuperNode did before: every message in a fresh Python process that
               imports torch/transformers/flwr, loads the base model, answers one message and exits. Timed
               from process start to exit; Flower's own per-message work on top (starting flwr-clientapp,
               installing the FAB, the Runtime API round trips) is NOT included, so this is a lower bound.
Prints one JSON document with the machine, the settings and per-mode seconds (each message, mean, median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

DEFAULT_OVERRIDES = ["model=tiny", "train.local_steps=2", "train.batch_size=4"]


def _train_message(overrides: list[str]):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from federation.protocol import RUN_CONFIG_KEY
    from federation.adapter import to_array_record
    from federation.config import run_config_to_json
    from federation.compose import compose_config
    from federation.model import initial_adapter

    cfg = compose_config(overrides)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    content = RecordDict({"arrays": to_array_record(initial_adapter(cfg.model, cfg.lora)),
                          "config": ConfigRecord({RUN_CONFIG_KEY: run_config_to_json(cfg), "server-round": 1})})
    message = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                      run_config={})
    return message, context


def _answer(overrides: list[str]) -> dict:
    """Build the message and answer it with the installed ClientApp; seconds of the handler and of its training."""
    from client.app import app as client_app

    start = time.perf_counter()
    message, context = _train_message(overrides)
    build = time.perf_counter() - start
    start = time.perf_counter()
    reply = client_app(message, context)
    handler = time.perf_counter() - start
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    return {"handler_seconds": handler, "train_seconds": float(reply.content["metrics"]["train-seconds"]),
            "build_message_seconds": build}


def _summary(outside: list[float]) -> dict:
    return {"outside_training_seconds": [round(s, 4) for s in outside],
            "mean": round(statistics.fmean(outside), 4), "median": round(statistics.median(outside), 4)}


def main(argv: list[str] | None = None) -> int:
    """Run both modes; prints (and with --out writes) the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5, help="train messages per mode")
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("--one-message", action="store_true", help=argparse.SUPPRESS)  # the per-process child
    parser.add_argument("overrides", nargs="*", default=DEFAULT_OVERRIDES)
    args = parser.parse_args(argv)
    if args.one_message:
        print(json.dumps(_answer(args.overrides)))
        return 0

    per_process = []
    for _ in range(args.messages):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "simulations.bench.site_worker", "--one-message",
                               *args.overrides], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        timing = json.loads(done.stdout.strip().splitlines()[-1])
        # The benchmark's own message building (hydra compose) is not site work.
        per_process.append(wall - timing["train_seconds"] - timing["build_message_seconds"])

    start = time.perf_counter()
    first = _answer(args.overrides)
    # Incl. the imports and the base model load; not the benchmark's message building.
    first_outside = time.perf_counter() - start - first["train_seconds"] - first["build_message_seconds"]
    resident = []
    for _ in range(args.messages):
        timing = _answer(args.overrides)
        resident.append(timing["handler_seconds"] - timing["train_seconds"])

    from simulations.bench import machine_info, write_result

    result = {
        "benchmark": "site time per train message outside the training loop, CPU",
        "machine": machine_info(),
        "settings": {"messages": args.messages, "overrides": args.overrides},
        "per_process": _summary(per_process),
        "resident": {"first_message_outside_training_seconds": round(first_outside, 4), **_summary(resident)},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
