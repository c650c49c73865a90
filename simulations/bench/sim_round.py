"""Wall time and GPU memory of one federated round with K virtual clients on one GPU.

    python -m simulations.bench.sim_round --out /tmp/simround --ks 4,16,64 --reload-ks 4,16
    python -m simulations.bench.sim_round --out /tmp/multi --modes resident+fast,resident+multi --ks 4,16,64 \
        --seq 512 --clients-per-batch 16 model.preset_name=llama-3b lora.r=32 'lora.target_modules=[q_proj,v_proj]' \
        train.batch_size=2

Modes, each driving the real ClientApp (client/app.py) in this process:
  reload          client after client, the base model loaded again for every train call and dropped after it
                  (as FlowerTune's example client does: it builds the model inside each fit)
  resident        ours: client after client, the base stays resident and only the LoRA tensors are swapped
  resident+fast   resident, with client/fast_train.FastLocalTrainer in place of LocalTrainer
  resident+multi  resident+fast, up to --clients-per-batch clients trained together in one forward/backward
                  (client/multi_adapter.py, what federation.clients_per_batch does in the in-process engine)
A round = K train messages (same global adapter) + FedAvg of the K deltas (strategies.fedavg.weighted_mean).
The one-time load of the resident modes is timed separately ("load_seconds"), and so is their first round
("first_round_seconds": it also tokenizes the K partitions, which later rounds reuse); the timed round is the
second. Reload mode drops the datasets with the model, so each of its rounds is like a first one. When resident+fast ran the same
K before resident+multi, each client's batched delta is compared with its one-by-one delta ("max_rel_delta_error":
max over clients of ||batched - solo|| / ||solo||). --seq N replaces the demo data by random-character texts of
>= N tokens truncated to N (the character tokenizer gives one token per character), so every example is N tokens.
--kernels / --attention set train.kernels / train.attention (client/kernels.py) for the fast modes, one-by-one and
batched alike, e.g. --modes resident+fast,resident+multi --kernels liger --attention varlen on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _messages(cfg, k: int):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from federation.protocol import RUN_CONFIG_KEY
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


def _replies(pairs, mode: str, clients_per_batch: int):
    """Yield the replies of one round's (message, context) pairs under `mode`, a client or a group at a time."""
    import client.app as client_app
    from client import task
    from client.multi_adapter import train_replies

    if mode == "resident+multi":
        for start in range(0, len(pairs), clients_per_batch):
            group = pairs[start:start + clients_per_batch]
            yield from train_replies([m for m, _ in group], [c for _, c in group])
        return
    for msg, ctx in pairs:
        if mode == "reload":
            task._RUNTIME = None
            gc.collect()
            _cuda("empty_cache")
        yield client_app.app(msg, ctx)


def _max_rel_error(deltas: list[dict], reference: list[dict]) -> float:
    worst = 0.0
    for ours, ref in zip(deltas, reference):
        num = sum(float(np.sum((ours[k].astype(np.float64) - ref[k]) ** 2)) for k in ref)
        den = sum(float(np.sum(ref[k].astype(np.float64) ** 2)) for k in ref)
        worst = max(worst, (num / max(den, 1e-300)) ** 0.5)
    return worst


def run_round(cfg, k: int, mode: str, clients_per_batch: int = 1) -> tuple[dict, list[dict]]:
    """Time one round of k clients under `mode`; GPU memory after each reply. Returns (row, the K deltas)."""
    from federation.adapter import from_array_record
    from strategies.fedavg import weighted_mean

    pairs = _messages(cfg, k)
    memory_after_client = []
    deltas, weights, train_seconds = [], [], 0.0
    _cuda("reset_peak_memory_stats")
    start = time.perf_counter()
    for reply in _replies(pairs, mode, clients_per_batch):
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
            "overhead_fraction": 1.0 - train_seconds / seconds if seconds > 0 else None,
            "clients_per_batch": clients_per_batch if mode == "resident+multi" else 1,
            "memory_after_first_client": memory_after_client[0], "memory_after_last_client": memory_after_client[-1],
            "max_memory_after_client": max(memory_after_client), "peak_bytes": _cuda("max_memory_allocated")}, deltas


def write_char_pool(path: Path, num_records: int, min_chars: int, seed: int = 0) -> Path:
    """A JSONL pool of {"text": random printable characters} records, each >= min_chars long."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?"))
    with open(path, "w") as f:
        for _ in range(num_records):
            f.write(json.dumps({"text": "".join(rng.choice(alphabet, size=min_chars + 16))}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the modes over K and write sim_round.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ks", default="4,16,64")
    parser.add_argument("--reload-ks", default="4,16")
    parser.add_argument("--modes", default="resident,resident+fast,reload")
    parser.add_argument("--cache", default="/tmp/fedtune-models")
    parser.add_argument("--clients-per-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=0, help="random-character examples of exactly this many tokens")
    parser.add_argument("--kernels", help="train.kernels for the fast modes: none | liger | auto (default: the config's)")
    parser.add_argument("--attention", help="train.attention for the fast modes: sdpa | varlen | auto (default: the "
                                            "config's)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from client import task
    from federation.compose import compose_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = []
    if args.seq:
        pool = write_char_pool(out / "pool.jsonl", 4096, args.seq)
        data = ["data=jsonl", f"data.source={pool}", f"data.max_seq_len={args.seq}", "data.eval_fraction=0.01"]
    # fp32 uploads so the batched and one-by-one deltas compare exactly (the bf16 codec would round both).
    switches = [f"train.{name}={value}" for name, value in (("kernels", args.kernels), ("attention", args.attention))
                if value is not None]
    base = ["model=llama-1b-random", "model.quantization=4bit", *data, "data.partitioner=iid", "train.local_steps=4",
            "train.batch_size=8", "federation.upload_codec=fp32", f"model.cache_dir={args.cache}",
            f"output_dir={out / 'run'}", *switches, *args.overrides]
    rows, solo_deltas = [], {}
    for mode in args.modes.split(","):
        fast = mode in ("resident+fast", "resident+multi")
        task._RUNTIME = None
        gc.collect()
        _cuda("empty_cache")
        ks = args.reload_ks if mode == "reload" else args.ks
        for k in [int(x) for x in ks.split(",") if x]:
            cfg = compose_config([*base, f"federation.num_clients={k}", f"train.fast_path={fast}"])
            load_seconds = None
            if mode != "reload":
                start = time.perf_counter()
                task.get_runtime(cfg)
                _cuda("synchronize")
                load_seconds = time.perf_counter() - start
            if mode != "reload":  # a first round tokenizes the K partitions (cached for the run's later rounds)
                start = time.perf_counter()
                run_round(cfg, k, mode, args.clients_per_batch)
                warmup_seconds = time.perf_counter() - start
            row, deltas = run_round(cfg, k, mode, args.clients_per_batch)
            row["first_round_seconds"] = warmup_seconds if mode != "reload" else None
            row["load_seconds"] = load_seconds
            if mode == "resident+fast":
                solo_deltas[k] = deltas
            if mode == "resident+multi" and k in solo_deltas:
                row["max_rel_delta_error"] = _max_rel_error(deltas, solo_deltas[k])
                sequential = next(r for r in rows if r["mode"] == "resident+fast" and r["k"] == k)
                row["speedup_vs_one_by_one"] = sequential["round_seconds"] / row["round_seconds"]
            rows.append(row)
            print(f"{mode:14s} K={k:3d}: round {row['round_seconds']:7.1f}s ({row['seconds_per_client']:.2f}s/client)"
                  f", GPU mem after first/last client {row['memory_after_first_client'] / 2**30:.2f}/"
                  f"{row['memory_after_last_client'] / 2**30:.2f} GiB, peak {row['peak_bytes'] / 2**30:.2f} GiB, "
                  f"outside training {100 * (row['overhead_fraction'] or 0):.1f}%"
                  + (f", {row['speedup_vs_one_by_one']:.2f}x one-by-one, max rel delta error "
                     f"{row['max_rel_delta_error']:.2e}" if "speedup_vs_one_by_one" in row else ""), flush=True)
            (out / "sim_round.json").write_text(json.dumps({"gpu": _cuda("get_device_name", 0, default="cpu"), "rows": rows,
                                                            "overrides": base}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
