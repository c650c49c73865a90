"""Many virtual clients on one device: seconds per round and peak host / GPU memory while new clients keep joining.

    python -m simulations.bench.many_clients --out DIR --clients 200 --per-round 20 --seq 32    # CPU, tiny model
    python -m simulations.bench.many_clients --out $OUT --work /tmp/many-work --clients 1000 --per-round 100 \
        --rounds 4 --seq 256 --local-steps 4 --clients-per-batch 16 --strategy fedavg,scaffold --budget 150 \
        model=llama-1b-random model.quantization=4bit lora.r=16 'lora.target_modules=[q_proj,v_proj]' \
        train.fast_path=true                                                                      # one GPU

One federation per strategy on the in-process engine (simulations/inprocess.py: the real coordinator round loop and
ClientApp, one device, one process): N virtual clients, M sampled per round for training and M for evaluation
(strategy.fraction_train / fraction_evaluate), so over R rounds ~N(1 - (1 - M/N)^R) distinct clients train and every
round brings new ones. "Bounded" shows as flat per-round peaks while clients_seen keeps growing:

* seconds: the coordinator's own round time (metrics.jsonl), train + evaluate + aggregation + checkpoint;
* host_rss_peak_mib: this process's VmHWM during the round (reset at the round's first message; Linux);
* gpu_peak_mib: torch.cuda.max_memory_allocated over the round (the trainers reset the peak for their own
  figures; this bench folds every reset into the round's peak); gpu_allocated_end_mib after the round;
* gpu_tensors_outside_model: live CUDA tensors after the round that are not the resident model's parameters,
  buffers or gradients (per-client state left on the GPU would show here; "before_round_1" has the count right
  after the model load, e.g. a 4-bit base's quantization state);
* datasets_cached: tokenized site datasets the process keeps (client/task.py, at most SITE_DATASETS_KEPT);
* state_disk_mib: the sites' round state on disk (client/site_state.py: error-feedback residuals, SCAFFOLD c_i,
  FedSA-LoRA B, newest KEEP_ROUNDS rounds per client) under --work, not under --out.

Data: random-character texts of exactly --seq tokens (the character tokenizer: one per character), 2 training
examples and 1 held-out example per client, iid. Uploads keep the default lossy codec with error feedback, so every
strategy has per-client state. The JSON (and a line per round in the log) is rewritten after every round, so a
run stopped by an outer `timeout` still leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from simulations.bench import _reset_rss_high_water_mark, _rss_kib, machine_info
from simulations.inprocess import InProcessGrid

EXAMPLES_PER_CLIENT = 2
EVAL_FRACTION = 1 / 3  # a pool of 3N records: 2N to train on, N held out (one per client)
MIB = 2**20


def device_name() -> str:
    """The GPU this runs on, or the CPU model."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return machine_info()["cpu_model"]


class GpuPeak:
    """torch.cuda.max_memory_allocated over a span, although the trainers reset the peak for their own figures."""

    def __init__(self) -> None:
        self.enabled = torch.cuda.is_available()
        self.folded = 0
        self._real_reset = torch.cuda.reset_peak_memory_stats
        if self.enabled:
            torch.cuda.reset_peak_memory_stats = self._reset  # looked up at call time by client/trainer.py

    def _reset(self, device=None) -> None:
        self.folded = max(self.folded, torch.cuda.max_memory_allocated(device))
        self._real_reset(device)

    def take(self) -> int:
        """The peak since the last take (0 on CPU); starts the next span."""
        if not self.enabled:
            return 0
        peak = max(self.folded, torch.cuda.max_memory_allocated())
        self.folded = 0
        self._real_reset()
        return peak

    def close(self) -> None:
        torch.cuda.reset_peak_memory_stats = self._real_reset


def stray_device_tensors(model, device_type: str, exclude: set[int] = frozenset()) -> tuple[int, int]:
    """(count, bytes) of live tensors on `device_type` that are not `model`'s parameters, buffers or their grads
    (nor at a data_ptr in `exclude`)."""
    owned = set(exclude)
    if model is not None:
        for tensor in [*model.parameters(), *model.buffers()]:
            owned.add(tensor.data_ptr())
            if tensor.grad is not None:
                owned.add(tensor.grad.data_ptr())
    count = size = 0
    with warnings.catch_warnings():  # isinstance on torch's deprecated lazy aliases warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor) or obj.device.type != device_type or obj.data_ptr() in owned:
                    continue
            except Exception:  # noqa: BLE001 - objects gc finds may be half-built or proxies
                continue
            count += 1
            size += obj.numel() * obj.element_size()
    return count, size


def disk_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


class MeasuredGrid(InProcessGrid):
    """The in-process grid, measuring each round (from its first message to the next round's) as it goes."""

    def __init__(self, client_app, num_nodes: int, run_dir: Path, on_round=None):
        super().__init__(client_app, num_nodes)
        self.run_dir = run_dir
        self.on_round = on_round or (lambda row: None)
        self.gpu = GpuPeak()
        self.rounds: list[dict] = []
        self.seen: set[int] = set()
        self._round = 0
        self._new = 0

    def push_messages(self, messages):
        messages = list(messages)
        config = messages[0].content.config_records.get("config") if messages else None
        server_round = int(config.get("server-round", 0)) if config is not None else 0
        if server_round != self._round:
            self.close_round()
            self._round, self._new = server_round, 0
            _reset_rss_high_water_mark()
            self.gpu.take()
        if messages and messages[0].metadata.message_type.startswith("train"):
            nodes = {m.metadata.dst_node_id for m in messages}
            self._new += len(nodes - self.seen)
            self.seen |= nodes
        return super().push_messages(messages)

    def close_round(self) -> None:
        """Record the round that is running (nothing before round 1); garbage is collected first."""
        if self._round < 1:
            return
        from client import task

        gc.collect()
        runtime = task._RUNTIME
        model = runtime.model if runtime is not None else None
        stray = stray_device_tensors(model, "cuda") if torch.cuda.is_available() else (None, None)
        row = {"round": self._round, "new_clients": self._new, "clients_seen": len(self.seen),
               "host_rss_peak_mib": _rss_kib("VmHWM") / 1024, "host_rss_end_mib": _rss_kib("VmRSS") / 1024,
               "gpu_peak_mib": self.gpu.take() / MIB,
               "gpu_allocated_end_mib": torch.cuda.memory_allocated() / MIB if torch.cuda.is_available() else 0.0,
               "gpu_tensors_outside_model": stray[0], "gpu_bytes_outside_model": stray[1],
               "datasets_cached": len(runtime.datasets) if runtime is not None else 0,
               "state_disk_mib": disk_bytes(self.run_dir / "sites") / MIB}
        self.rounds.append(row)
        self._round = 0
        self.on_round(row)


def _spread(values: list[float]) -> dict:
    if not values:
        return {}
    return {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}


def run_strategy(args, strategy: str, pool: Path, work: Path, log) -> dict:
    """One federation of args.clients clients under `strategy`; its per-round rows and summary."""
    from client import task
    from client.app import app as client_app
    from federation.compose import compose_config
    from server.app import run_federation

    run_dir = work / f"run-{strategy}"
    shutil.rmtree(run_dir, ignore_errors=True)
    n, m = args.clients, args.per_round
    fraction = min(1.0, (m + 0.5) / n)  # Flower samples int(n * fraction) clients: exactly m
    overrides = ["data=jsonl", f"data.source={pool}", f"data.max_seq_len={args.seq}",
                 f"data.eval_fraction={EVAL_FRACTION}", "data.partitioner=iid",
                 f"train.batch_size={EXAMPLES_PER_CLIENT}", f"train.local_steps={args.local_steps}",
                 f"federation.num_clients={n}", f"federation.rounds={args.rounds}",
                 f"federation.clients_per_batch={args.clients_per_batch}", "federation.keep_last_checkpoints=1",
                 "federation.evaluate_before_training=false", "eval.generate=false",
                 f"strategy={strategy}", f"strategy.fraction_train={fraction}",
                 f"strategy.fraction_evaluate={fraction}", f"model.cache_dir={args.cache}", f"output_dir={run_dir}",
                 *args.overrides]
    cfg = compose_config(overrides)
    start = time.perf_counter()
    runtime = task.get_runtime(cfg)  # the one-time base model load, outside round 1
    load_seconds = time.perf_counter() - start
    result = {"strategy": strategy, "overrides": overrides, "load_seconds": load_seconds, "rounds": []}
    if torch.cuda.is_available():
        # The baseline for the rounds' figures: quantization state and the like that are not parameters or buffers.
        gc.collect()
        result["before_round_1"] = {"gpu_allocated_mib": torch.cuda.memory_allocated() / MIB,
                                    "gpu_tensors_outside_model": stray_device_tensors(runtime.model, "cuda")[0]}

    def on_round(row: dict) -> None:
        result["rounds"].append(row)
        log(f"{strategy} round {row['round']}: {row['new_clients']} new clients ({row['clients_seen']} seen), "
            f"host RSS peak {row['host_rss_peak_mib']:.0f} MiB, GPU peak {row['gpu_peak_mib']:.0f} MiB, "
            f"GPU allocated after {row['gpu_allocated_end_mib']:.0f} MiB, stray GPU tensors "
            f"{row['gpu_tensors_outside_model']}, datasets cached {row['datasets_cached']}, "
            f"state on disk {row['state_disk_mib']:.1f} MiB")
        args.write(result)

    grid = MeasuredGrid(client_app, n, run_dir, on_round)
    try:
        metrics = run_federation(grid, cfg)
        grid.close_round()
    finally:
        grid.gpu.close()
    seconds = {row["round"]: row["seconds"] for row in metrics if row["round"] >= 1}
    for row, metric in zip(result["rounds"], [r for r in metrics if r["round"] >= 1]):
        row.update(seconds=seconds[row["round"]], clients_ok=metric["clients_ok"],
                   clients_sampled=metric["clients_sampled"], train_loss=metric["train_loss"])
    rows = result["rounds"]
    result["summary"] = {
        "seconds_per_round": _spread([r["seconds"] for r in rows]),
        # Round 1 also tokenizes its clients' first partitions and warms kernels; later rounds keep sampling new
        # clients too, so their peaks are the ones to compare.
        "host_rss_peak_mib": _spread([r["host_rss_peak_mib"] for r in rows]),
        "gpu_peak_mib": _spread([r["gpu_peak_mib"] for r in rows]),
        "state_disk_mib_end": rows[-1]["state_disk_mib"] if rows else 0.0,
        "clients_seen": rows[-1]["clients_seen"] if rows else 0,
    }
    log(f"{strategy}: {len(rows)} rounds, seconds/round {_fmt(result['summary']['seconds_per_round'])}, host RSS "
        f"peak MiB {_fmt(result['summary']['host_rss_peak_mib'])}, GPU peak MiB "
        f"{_fmt(result['summary']['gpu_peak_mib'])}, {result['summary']['clients_seen']} clients trained, state on "
        f"disk {result['summary']['state_disk_mib_end']:.1f} MiB")
    if not args.keep_state:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _fmt(spread: dict) -> str:
    return f"{spread['min']:.1f}..{spread['max']:.1f}" if spread else "-"


def main(argv: list[str] | None = None) -> int:
    """Run one federation per --strategy and write many.json (and progress lines to the log) under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="many.json and many.log go here (nothing large)")
    parser.add_argument("--work", default="", help="run dirs, site state and the data pool: GBs at 1,000 clients of a "
                        "real model, so not under --out (default: a new temporary directory)")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--strategy", default="fedavg", help="comma-separated, e.g. fedavg,scaffold,fedsa_lora")
    parser.add_argument("--clients-per-batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64, help="tokens per example")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.0, help="seconds; no new strategy starts after it (0: none)")
    parser.add_argument("--cache", default="/tmp/fedtune-models")
    parser.add_argument("--keep-state", action="store_true", help="keep the run dirs under --work afterwards")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. model=llama-1b-random")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from simulations.bench.sim_round import write_char_pool

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fedtune-many-"))
    work.mkdir(parents=True, exist_ok=True)
    log_path, json_path = out / "many.log", out / "many.json"
    began = time.time()

    def log(text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    summary = {"machine": {**machine_info(), "device": device_name(), "cuda": torch.cuda.is_available()},
               "clients": args.clients, "per_round": args.per_round, "rounds": args.rounds, "seq": args.seq,
               "clients_per_batch": args.clients_per_batch, "examples_per_client": EXAMPLES_PER_CLIENT,
               "local_steps": args.local_steps, "overrides": args.overrides, "runs": [], "skipped": []}
    def write(running: dict | None = None) -> None:
        runs = summary["runs"] + ([running] if running is not None and running not in summary["runs"] else [])
        json_path.write_text(json.dumps({**summary, "runs": runs}, indent=1))

    args.write = write
    pool = write_char_pool(work / "pool.jsonl", (EXAMPLES_PER_CLIENT + 1) * args.clients, args.seq)
    log(f"{args.clients} clients, {args.per_round} per round, {args.rounds} rounds on {device_name()}")
    for strategy in [s for s in args.strategy.split(",") if s]:
        if args.budget and time.time() - began > args.budget:
            summary["skipped"].append(strategy)
            log(f"{strategy}: skipped, past the {args.budget:.0f}s budget")
            continue
        log(f"{strategy}: start")
        result = run_strategy(args, strategy, pool, work, log)
        summary["runs"].append(result)
        write()
    write()
    if not args.work and not args.keep_state:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
