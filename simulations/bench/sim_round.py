"""Wall time and GPU memory of one federated round with K virtual clients on one GPU.

    python -m simulations.bench.sim_round --out /tmp/simround --ks 4,16,64 --reload-ks 4,16

Modes, each driving the real ClientApp (client/app.py) in this process, client after client:
  reload         the base model is loaded again for every train call and dropped after it (as FlowerTune's
                 example client does: it builds the model inside each fit)
  resident       ours: the base stays resident and only the LoRA tensors are swapped per client
  resident+fast  resident, with client/fast_train.FastLocalTrainer in place of LocalTrainer
A round = K train messages (same global adapter) + FedAvg of the K deltas (strategies.fedavg.weighted_mean).
The one-time load of the resident modes is timed separately ("load_seconds").
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch


def _messages(cfg, k: int):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import RUN_CONFIG_KEY
    from federation.adapter import to_array_record
    from federation.config import run_config_to_json
    from federation.model import initial_adapter

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    arrays = to_array_record(initial_adapter(cfg.model, cfg.lora))
    config = {RUN_CONFIG_KEY: run_config_to_json(cfg), "server-round": 1}
    out = []
    for i in range(k):
        msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(dict(config))}),
                      dst_node_id=i + 1, message_type=MessageType.TRAIN)
        ctx = Context(run_id=1, node_id=i + 1, node_config={"partition-id": i, "num-partitions": k},
                      state=RecordDict(), run_config={})
        out.append((msg, ctx))
    return out


def _cuda(fn, *args, default=0):
    """torch.cuda.fn(*args) on a GPU machine; `default` on CPU (smoke runs with model=tiny)."""
    return getattr(torch.cuda, fn)(*args) if torch.cuda.is_available() else default


def run_round(cfg, k: int, mode: str) -> dict:
    """Time one round of k clients under `mode`; GPU memory after each client."""
    import client.app as client_app
    from federation.adapter import from_array_record
    from strategies.fedavg import weighted_mean

    pairs = _messages(cfg, k)
    memory_after_client = []
    deltas, weights, train_seconds = [], [], 0.0
    _cuda("reset_peak_memory_stats")
    start = time.perf_counter()
    for msg, ctx in pairs:
        if mode == "reload":
            client_app._RUNTIME = None
            gc.collect()
            _cuda("empty_cache")
        reply = client_app.app(msg, ctx)
        if reply.has_error():
            raise RuntimeError(reply.error.reason)
        deltas.append(from_array_record(reply.content["arrays"]))
        weights.append(float(reply.content["metrics"]["num-examples"]))
        train_seconds += float(reply.content["metrics"]["train-seconds"])
        memory_after_client.append(_cuda("memory_allocated"))
    weighted_mean(deltas, weights)
    _cuda("synchronize")
    seconds = time.perf_counter() - start
    return {"mode": mode, "k": k, "round_seconds": seconds, "seconds_per_client": seconds / k,
            "train_loop_seconds": train_seconds,
            "memory_after_first_client": memory_after_client[0], "memory_after_last_client": memory_after_client[-1],
            "max_memory_after_client": max(memory_after_client), "peak_bytes": _cuda("max_memory_allocated")}


def main(argv: list[str] | None = None) -> int:
    """Run the modes over K and write sim_round.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ks", default="4,16,64")
    parser.add_argument("--reload-ks", default="4,16")
    parser.add_argument("--modes", default="resident,resident+fast,reload")
    parser.add_argument("--cache", default="/tmp/fedtune-models")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import client.app as client_app
    from client.fast_train import FastLocalTrainer
    from client.trainer import LocalTrainer
    from federation.config import compose_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ["model=llama-1b-random", "model.quantization=4bit", "data.partition=iid", "train.local_steps=4",
            "train.batch_size=8", f"model.cache_dir={args.cache}", f"output_dir={out / 'run'}", *args.overrides]
    rows = []
    for mode in args.modes.split(","):
        client_app.LocalTrainer = FastLocalTrainer if mode == "resident+fast" else LocalTrainer
        client_app._RUNTIME = None
        gc.collect()
        _cuda("empty_cache")
        ks = args.reload_ks if mode == "reload" else args.ks
        for k in [int(x) for x in ks.split(",") if x]:
            cfg = compose_config([*base, f"federation.num_clients={k}"])
            load_seconds = None
            if mode != "reload":
                start = time.perf_counter()
                client_app.get_runtime(cfg)
                _cuda("synchronize")
                load_seconds = time.perf_counter() - start
            row = run_round(cfg, k, mode)
            row["load_seconds"] = load_seconds
            rows.append(row)
            print(f"{mode:14s} K={k:3d}: round {row['round_seconds']:7.1f}s ({row['seconds_per_client']:.2f}s/client)"
                  f", GPU mem after first/last client {row['memory_after_first_client'] / 2**30:.2f}/"
                  f"{row['memory_after_last_client'] / 2**30:.2f} GiB, peak {row['peak_bytes'] / 2**30:.2f} GiB",
                  flush=True)
            (out / "sim_round.json").write_text(json.dumps({"gpu": _cuda("get_device_name", 0, default="cpu"), "rows": rows,
                                                            "overrides": base}, indent=1))
    client_app.LocalTrainer = LocalTrainer
    return 0


if __name__ == "__main__":
    sys.exit(main())
