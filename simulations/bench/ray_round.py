"""Batched virtual clients on Flower's Ray simulation engine: seconds per round on 1 vs 2 GPUs, and 1,000 clients.

    python -m simulations.bench.ray_round --out $OUT --gpus 1,2 --ks 16,64 --late-ks 256 --clients-per-batch 16 \
        --many 1000:100:3 --budget 480

Every measurement runs the real path: Flower's run_simulation (RayBackend, one actor per GPU with the base
model resident, client_resources num_gpus=1), simulations/virtual_grid.py sending a round's virtual clients in
groups, the ClientApp's virtual_clients handler training each group together (client/multi_adapter.py).

* sweep (per GPU count g, CUDA_VISIBLE_DEVICES=0..g-1): one Ray session; a warm-up round (first model use,
  tokenization), then for each K one round of K train messages (the global adapter, as the coordinator sends
  them) to virtual clients 1..K; "round_seconds" = first message sent to last reply received (training, the
  deltas' trip through Ray and the Grid; no aggregation). Per-GPU peak memory: nvidia-smi's memory.used
  (sampled every 0.5 s; CUDA context and caching allocator included) and the clients' torch peak
  (peak-memory-bytes, max_memory_allocated during their group's training).
* many: `simulate()` itself, N virtual clients, P per round (strategy.fraction_train), evaluation on P clients
  per round without generation: the metrics rows' seconds per round, peak GPU memory, and peak host memory
  (MemTotal - MemAvailable above the phase's starting level: driver, raylet, actors, Ray's object store).
The --ks phases run first, then --many, then --late-ks (large K last, so a budget overrun loses only them).
Data: random-character texts of exactly --seq tokens (the character tokenizer: one token per character), 2 train
examples and 1 held-out example per virtual client. Uploads fp32 (lossless, no error-feedback state). Writes ray_round.json and
progress.log under --out after every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MODEL = ["model=llama-1b-random", "model.preset_name=llama-3b", "model.quantization=4bit", "lora.r=32",
         "lora.target_modules=[q_proj,v_proj]", "train.batch_size=2", "train.local_steps=4", "train.fast_path=true",
         "federation.upload_codec=fp32", "federation.client_num_gpus=1", "federation.client_num_cpus=1"]
# --tiny: the same phases on CPU with the tiny preset (a smoke run of this script, not a measurement).
TINY = ["train.batch_size=2", "train.local_steps=2", "federation.upload_codec=fp32", "federation.client_num_gpus=0",
        "federation.client_num_cpus=1"]
EXAMPLES_PER_CLIENT = 2
# One held-out example per client (iid partitioning needs one per site), so a pool of 3N splits into 2N + N.
EVAL_FRACTION = 1 / 3


def _progress(out: Path, text: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {text}"
    print(line, flush=True)
    with open(out / "progress.log", "a") as f:
        f.write(line + "\n")


def _data_overrides(out: Path, num_clients: int, seq: int) -> list[str]:
    from simulations.bench.sim_round import write_char_pool

    records = (EXAMPLES_PER_CLIENT + 1) * num_clients
    pool = write_char_pool(out / f"pool-{num_clients}.jsonl", records, seq)
    return ["data=jsonl", f"data.source={pool}", f"data.max_seq_len={seq}", f"data.eval_fraction={EVAL_FRACTION}",
            "data.partition=iid"]


class Sampler:
    """Peak per-GPU memory.used (nvidia-smi) and host MemTotal - MemAvailable, sampled every 0.5 s."""

    def __init__(self) -> None:
        self.gpu_peak_mib: dict[int, int] = {}
        self.host_start = self.host_peak = self._host_used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _host_used() -> int:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.host_peak = max(self.host_peak, self._host_used())
            try:
                text = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=10).stdout
                for line in text.strip().splitlines():
                    index, used = (int(x) for x in line.split(","))
                    self.gpu_peak_mib[index] = max(self.gpu_peak_mib.get(index, 0), used)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.5)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"gpu_peak_mib": self.gpu_peak_mib, "host_peak_gib": self.host_peak / 2**30,
                "host_peak_above_start_gib": (self.host_peak - self.host_start) / 2**30}


def sweep(args) -> int:
    """One Ray session on the visible GPUs: a warm-up round, then one timed round per K; rows as JSON lines."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from federation.adapter import to_array_record
    from federation.compose import compose_config
    from federation.config import run_config_to_json
    from federation.model import initial_adapter
    from federation.protocol import RUN_CONFIG_KEY
    from federation.store import FEDERATION_RUN_ID_KEY
    from simulations.simulate import backend_config, ray_actor_count, virtual_client_layout

    out = Path(args.out)
    ks = [int(k) for k in args.ks.split(",") if k]
    n = max(ks)
    cfg = compose_config([*(TINY if args.tiny else MODEL), *_data_overrides(out, n, args.seq),
                          f"model.cache_dir={args.cache}", f"federation.num_clients={n}", f"federation.clients_per_batch={args.clients_per_batch}",
                          f"output_dir={out / f'sweep-{args.gpus}gpu'}", *args.overrides])
    arrays = to_array_record(initial_adapter(cfg.model, cfg.lora))
    run_json = run_config_to_json(cfg)
    actors = ray_actor_count(cfg)
    num_nodes, wrap = virtual_client_layout(cfg)
    rows_path = out / f"sweep-{args.gpus}gpu.jsonl"

    def one_round(grid: Grid, k: int, server_round: int) -> dict:
        messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
            {RUN_CONFIG_KEY: run_json, FEDERATION_RUN_ID_KEY: "bench", "server-round": server_round})}),
            dst_node_id=node, message_type=MessageType.TRAIN) for node in range(1, k + 1)]
        start = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=args.round_timeout))
        seconds = time.perf_counter() - start
        errors = [r.error.reason.splitlines()[0] for r in replies if r.has_error()]
        ok = [r for r in replies if not r.has_error()]
        return {"gpus": args.gpus, "actors": actors, "k": k, "clients_per_batch": args.clients_per_batch,
                "round_seconds": seconds, "seconds_per_client": seconds / k, "replies_ok": len(ok),
                "errors": errors[:3], "trained_together": sorted({int(r.content["metrics"].get("trained-together", 1))
                                                                    for r in ok}), "clients_train_seconds": sum(float(r.content["metrics"]["train-seconds"])
                                                                    for r in ok),
                "torch_peak_gib": max((float(r.content["metrics"]["peak-memory-bytes"]) for r in ok),
                                      default=0.0) / 2**30}

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        grid = wrap(grid)
        warm = one_round(grid, min(min(ks), 2 * actors), 1)
        print(f"warm-up round: {json.dumps(warm)}", flush=True)
        for server_round, k in enumerate(ks, start=2):
            row = one_round(grid, k, server_round)
            with open(rows_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"ROW {json.dumps(row)}", flush=True)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                   backend_config=backend_config(cfg))
    return 0


def many(args) -> int:
    """simulate() with N virtual clients, P per round; rows of metrics.jsonl as JSON lines."""
    from federation.compose import compose_config
    from simulations.simulate import simulate

    out = Path(args.out)
    n, per_round, rounds = (int(x) for x in args.many.split(":"))
    cfg = compose_config([*(TINY if args.tiny else MODEL), *_data_overrides(out, n, args.seq),
                          f"model.cache_dir={args.cache}", f"federation.num_clients={n}", f"federation.rounds={rounds}",
                          f"federation.clients_per_batch={args.clients_per_batch}",
                          f"strategy.fraction_train={per_round / n}", f"strategy.fraction_evaluate={per_round / n}",
                          "federation.evaluate_before_training=false", "eval.generate=false",
                          f"output_dir={out / 'many'}", *args.overrides])
    rows = simulate(cfg, engine="ray")
    with open(out / "many.jsonl", "w") as f:
        for row in rows:
            peaks = [site.get("peak-memory-bytes", 0) for site in (row.get("per_site") or {}).values()]
            f.write(json.dumps({"round": row["round"], "seconds": row["seconds"], "clients_ok": row["clients_ok"],
                                "clients_sampled": row["clients_sampled"], "failed": len(row["failed"]),
                                "torch_peak_gib": max(peaks, default=0) / 2**30}) + "\n")
    return 0


def _phase(args, out: Path, name: str, argv: list[str], gpus: int, deadline: float, results: dict) -> None:
    left = deadline - time.time()
    if left < 60:
        _progress(out, f"{name}: skipped, {left:.0f}s of the budget left")
        results["skipped"].append(name)
        return
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus)))
    _progress(out, f"{name}: start ({left:.0f}s left)")
    sampler = Sampler()
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        try:
            code = subprocess.run([sys.executable, "-m", "simulations.bench.ray_round", *argv], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=left - 10).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    memory = sampler.stop()
    results["phases"].append({"phase": name, "gpus": gpus, "exit": code, "wall_seconds": time.time() - start,
                              **memory})
    _progress(out, f"{name}: exit {code} after {time.time() - start:.0f}s, peak GPU MiB {memory['gpu_peak_mib']}, "
                   f"host peak {memory['host_peak_gib']:.1f} GiB (+{memory['host_peak_above_start_gib']:.1f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "sweep", "many"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpus", default="1,2")
    parser.add_argument("--ks", default="16,64")
    parser.add_argument("--late-ks", default="256")
    parser.add_argument("--many", default="1000:100:3", help="clients:per_round:rounds ('' to skip)")
    parser.add_argument("--clients-per-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--cache", default="/tmp/fedtune-models")
    parser.add_argument("--round-timeout", type=float, default=400.0)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all phases")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with the tiny preset")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "sweep":
        return sweep(args)
    if args.mode == "many":
        return many(args)

    deadline = time.time() + args.budget
    gpu_name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.strip().splitlines() if _has_nvidia_smi() else ["cpu"]
    results = {"machine": {"gpus": gpu_name, "cpus": os.cpu_count()}, "settings": (TINY if args.tiny else MODEL) + list(args.overrides),
               "seq": args.seq, "examples_per_client": EXAMPLES_PER_CLIENT, "phases": [], "skipped": []}
    common = ["--out", str(out), "--clients-per-batch", str(args.clients_per_batch), "--seq", str(args.seq),
              "--cache", str(args.cache), "--round-timeout", str(args.round_timeout), *(["--tiny"] if args.tiny else [])]
    gpu_counts = [int(g) for g in args.gpus.split(",") if g]
    plan = [(f"sweep-{g}gpu-k{args.ks.replace(',', '-')}", ["sweep", "--gpus", str(g), "--ks", args.ks], g)
            for g in gpu_counts if args.ks]
    if args.many:
        plan.append((f"many-{args.many.replace(':', '-')}", ["many", "--many", args.many], 1))
    plan += [(f"sweep-{g}gpu-k{args.late_ks.replace(',', '-')}", ["sweep", "--gpus", str(g), "--ks", args.late_ks], g)
             for g in gpu_counts if args.late_ks]
    for name, phase_argv, gpus in plan:
        _phase(args, out, name, [*phase_argv, *common, *args.overrides], gpus, deadline, results)
        results["sweep"] = [json.loads(line) for p in sorted(out.glob("sweep-*gpu.jsonl"))
                            for line in p.read_text().splitlines()]
        results["many"] = ([json.loads(line) for line in (out / "many.jsonl").read_text().splitlines()]
                           if (out / "many.jsonl").exists() else [])
        (out / "ray_round.json").write_text(json.dumps(results, indent=1))
    for row in results["sweep"]:
        _progress(out, f"{row['gpus']} GPU K={row['k']:3d} (<= {row['clients_per_batch']} per group): "
                       f"{row['round_seconds']:.1f}s/round, {row['replies_ok']}/{row['k']} ok, "
                       f"torch peak {row['torch_peak_gib']:.1f} GiB")
    for row in results["many"]:
        _progress(out, f"many round {row['round']}: {row['seconds']:.1f}s, {row['clients_ok']}/"
                       f"{row['clients_sampled']} ok, torch peak {row['torch_peak_gib']:.1f} GiB")
    return 0


def _has_nvidia_smi() -> bool:
    try:
        subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10)
        return True
    except (OSError, subprocess.TimeoutExpired):
        return False


if __name__ == "__main__":
    sys.exit(main())
