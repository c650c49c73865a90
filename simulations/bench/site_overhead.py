"""A deployed site's time per train message, phase by phase: how much of a round is spent outside the training loop.

    python -m simulations.bench.site_overhead [--model tiny] [--device cpu] [--rounds 5] [--out result.json]
        [hydra overrides ...]
    # on a GPU, the issue's setting: --model llama-1b-random --device cuda (4-bit, LoRA r=8 all-linear, 10 x 16)

Runs the installed ClientApp (client.app.app, what the resident worker client/worker.py calls) in this process on
one train message per round, built as the coordinator sends it: the global adapter, the run config, the round and
a federation run id, to a site with a round-state directory, so the bf16 upload codec's error-feedback residual is
loaded from and saved to disk as at a deployed site (node config ``round-state-dir``; demo data, partition 0 of 2).
Each round's global adapter is the previous one plus the site's decoded upload (one-site FedAvg). The first round
(base model load, tokenization, first-use costs) is a warm-up and is left out.

Phases are those the site logs every round (client/task.py): prepare, train-setup, training-loop, delta,
encode+state; "other" is the rest of the handler call (the ClientApp's mods and routing, building the reply);
"total" is the handler call, the time the worker spends on a message before pushing the reply. "serialize" (not in
total) is the local part of pushing the reply: Flower's object ids and per-object serialization (push_message);
"gc" (in total, across phases) is the time Python's cyclic garbage collector ran during the handler call: a full
collection walks every object of the resident model and its libraries, unless they were frozen (after each reply,
as the worker does: client.task.freeze_resident_objects).
Prints per phase the median and min-max over rounds, the machine, and the settings; --out also writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The round: 10 local steps of 16 demo examples.
DEFAULT_OVERRIDES = ["train.local_steps=10", "train.batch_size=16"]
# What the site logs (client/task.py), in order; "other" and "total" are this benchmark's.
LOGGED_PHASES = ("prepare", "train-setup", "training-loop", "delta", "encode+state")
PHASES = (*LOGGED_PHASES, "other", "total")
RUN_ID = "site-overhead-benchmark"


class GcTimer:
    """Seconds Python's garbage collector runs while installed (gc.callbacks), summed since the last reset()."""

    def __init__(self):
        self.seconds, self._started = 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started

    def reset(self) -> None:
        """Start summing from zero."""
        self.seconds = 0.0


class PhaseLog(logging.Handler):
    """Collects the {phase: seconds} that the site's "outside the training loop" log line carries."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.rounds: list[dict[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        from client.task import PHASE_SECONDS_FIELD

        if hasattr(record, PHASE_SECONDS_FIELD):
            self.rounds.append(dict(getattr(record, PHASE_SECONDS_FIELD)))


def compose(model: str, device: str, state_dir: Path, overrides: list[str]):
    """The run config: conf/ with model=<model>, model.device=<device>, the issue's round and the overrides."""
    from federation.compose import compose_config

    return compose_config([f"model={model}", f"model.device={device}", *DEFAULT_OVERRIDES,
                           f"output_dir={state_dir / 'coordinator'}", *overrides])


def train_message(cfg, global_adapter: dict, server_round: int):
    """A coordinator's train message: global adapter (packed float32), run config, round and federation run id."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from federation.adapter import to_array_record
    from federation.config import run_config_to_json
    from federation.protocol import FEDERATION_RUN_ID_KEY, RUN_CONFIG_KEY, SERVER_ROUND_KEY

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, server_round
    config = ConfigRecord({RUN_CONFIG_KEY: run_config_to_json(cfg), SERVER_ROUND_KEY: server_round,
                           FEDERATION_RUN_ID_KEY: RUN_ID})
    content = RecordDict({"arrays": to_array_record(global_adapter), "config": config})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def serialize_seconds(reply) -> float:
    """Seconds of the local part of Flower's push_message: the reply's object ids and its objects serialized."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute

    start = time.perf_counter()
    reply.metadata.__dict__["_message_id"] = reply.object_id
    with no_object_id_recompute():
        for obj in get_all_nested_objects(reply).values():
            obj.deflate()
    return time.perf_counter() - start


def run_rounds(cfg, state_dir: Path, rounds: int) -> list[dict[str, float]]:
    """Answer `rounds` + 1 train messages with the installed ClientApp; per timed round, seconds by phase."""
    from flwr.app import Context, RecordDict

    from client.app import app as client_app
    from client.site_state import NODE_STATE_DIR_KEY
    from client.task import freeze_resident_objects
    from federation.compression import decode_upload
    from federation.model import initial_adapter
    from federation.packing import unpack_arrays

    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": 2,
                                   NODE_STATE_DIR_KEY: str(state_dir / "round-state")})
    global_adapter = initial_adapter(cfg.model, cfg.lora)
    site_log = logging.getLogger("fedtune.client")
    phase_log = PhaseLog()
    site_log.addHandler(phase_log)
    level = site_log.level
    site_log.setLevel(logging.INFO)
    gc_timer = GcTimer()
    gc.callbacks.append(gc_timer)
    measured = []
    try:
        for server_round in range(1, rounds + 2):
            message = train_message(cfg, global_adapter, server_round)
            logged = len(phase_log.rounds)
            gc_timer.reset()
            start = time.perf_counter()
            reply = client_app(message, context)
            total = time.perf_counter() - start
            gc_seconds = gc_timer.seconds
            if reply.has_error():
                raise RuntimeError(f"round {server_round}: the site answered with an error: {reply.error.reason}")
            if len(phase_log.rounds) != logged + 1:
                raise RuntimeError(f"round {server_round}: the site logged no phase seconds (client/task.py)")
            phases = phase_log.rounds[-1]
            phases["other"] = total - sum(phases[name] for name in LOGGED_PHASES)
            phases["total"] = total
            phases["serialize"] = serialize_seconds(reply)
            phases["gc"] = gc_seconds
            freeze_resident_objects()  # what the resident worker does once the reply has left
            if server_round > 1:  # round 1 is the warm-up
                measured.append(phases)
            upload = decode_upload(unpack_arrays(reply.content["arrays"]))
            global_adapter = {key: value + upload[key] for key, value in global_adapter.items()}
    finally:
        gc.callbacks.remove(gc_timer)
        site_log.removeHandler(phase_log)
        site_log.setLevel(level)
    return measured


def summary(measured: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{phase: {median, min, max}} in seconds, over the timed rounds."""
    names = [*PHASES, "serialize", "gc"]
    return {name: {"median": statistics.median(r[name] for r in measured), "min": min(r[name] for r in measured),
                   "max": max(r[name] for r in measured)} for name in names}


def outside_share(measured: list[dict[str, float]]) -> dict[str, float]:
    """Seconds outside the training loop per round and their share of the round (total), median over rounds."""
    outside = [r["total"] - r["training-loop"] for r in measured]
    share = [(r["total"] - r["training-loop"]) / r["total"] for r in measured]
    return {"seconds_median": statistics.median(outside), "share_of_round_median": statistics.median(share),
            "share_of_round_max": max(share)}


def machine(device: str) -> dict:
    """CPU, cores, library versions (simulations.bench.machine_info) and the GPU's name on CUDA."""
    import torch

    from simulations.bench import machine_info

    info = machine_info()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def print_table(result: dict) -> None:
    """The phase table, one row per phase, and the share of the round spent outside the training loop."""
    print(f"site time per train message, {result['settings']['rounds']} rounds after a warm-up "
          f"(model={result['settings']['model']}, device={result['settings']['device']}; "
          f"{result['machine'].get('gpu') or result['machine']['cpu_model']}, "
          f"{result['machine']['usable_cores']} cores, torch {result['machine'].get('torch')})")
    print(f"  {'phase':14s} {'median s':>9s} {'min s':>9s} {'max s':>9s}")
    for name, row in result["phases"].items():
        note = {"serialize": "  (not in total: Flower's push_message before the network)",
                "gc": "  (in total: Python's garbage collector, across phases)"}.get(name, "")
        print(f"  {name:14s} {row['median']:9.4f} {row['min']:9.4f} {row['max']:9.4f}{note}")
    share = result["outside_training_loop"]
    print(f"  outside the training loop: {share['seconds_median']:.4f} s, {100 * share['share_of_round_median']:.1f}% "
          f"of the round (max {100 * share['share_of_round_max']:.1f}%)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and (with --out) writes the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="conf/model option: tiny | llama-1b-random | hub")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--state-dir", help="the site's round-state directory's parent (default: a temp dir); "
                                            "put it on the disk a site would use, its fsyncs are measured")
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. model.cache_dir=/tmp/models")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    from client.site_state import wait_for_background_writes

    with tempfile.TemporaryDirectory(prefix="site-overhead-", dir=args.state_dir) as tmp:
        cfg = compose(args.model, args.device, Path(tmp), args.overrides)
        if cfg.federation.upload_codec == "fp32" or not cfg.federation.upload_error_feedback:
            print(f"note: upload codec {cfg.federation.upload_codec}, error feedback "
                  f"{cfg.federation.upload_error_feedback}: not the deployed default (bf16 with error feedback)")
        measured = run_rounds(cfg, Path(tmp), args.rounds)
        wait_for_background_writes()  # the last round's residual, before its directory goes

    from federation.model import lora_shapes
    from simulations.bench import write_result

    result = {
        "benchmark": "site time per train message by phase (outside vs inside the training loop)",
        "machine": machine(args.device),
        "settings": {"model": args.model, "device": args.device, "rounds": args.rounds,
                     "overrides": [*DEFAULT_OVERRIDES, *args.overrides],
                     "upload_codec": cfg.federation.upload_codec,
                     "error_feedback": cfg.federation.upload_error_feedback,
                     "adapter_elements": sum(math.prod(shape) for shape in lora_shapes(cfg.model, cfg.lora).values())},
        "phases": summary(measured),
        "outside_training_loop": outside_share(measured),
        "rounds": measured,
    }
    print_table(result)
    write_result(args.out or "", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
