"""The benchmark suite in one command: `fedtune bench --out DIR [--only NAMES] [--quick]`.

Runs each benchmark with the settings BENCHMARKS.md reports (every one prints its own table, ours and the
baseline measured in the same run, and writes DIR/<name>.json with the machine it ran on):

  GPU (skipped without CUDA)
    train_throughput  local QLoRA tokens/s, peak memory, MFU vs plain transformers+peft+bitsandbytes
    sim_round         round wall time and GPU memory for K virtual clients: one by one vs multi-adapter batched
    residency         resident base vs reloading it per call, the issue's reference setting (16 x 512, 10 steps)
    agreement         batched vs solo adapters, against the bf16 noise floor
    vs_unsloth        our site trainer vs Unsloth (optional; own process), llama-1b and llama-8b, two memory regimes
  CPU
    communication     upload bytes per codec and the demo task's final union eval loss
    aggregation       streaming vs naive FedAvg of 100 7B-shaped adapters: seconds and peak RAM

--quick shrinks the benchmarks to smoke runs (tiny model / few sites; on a CPU: sim_round, agreement,
communication, aggregation) that finish in a few minutes; their figures check the plumbing, not for reporting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

GPU_BENCHMARKS = ("train_throughput", "sim_round", "residency", "agreement", "vs_unsloth")
CPU_BENCHMARKS = ("communication", "aggregation")
# GPU benchmarks whose --quick form runs on a CPU (tiny model); the others need 4-bit CUDA kernels.
QUICK_ON_CPU = ("sim_round", "agreement", "vs_unsloth")
# The llama-3b simulation setting of BENCHMARKS.md (per-client batch 2 x 512; q/v LoRA r=32).
SIM_3B = ["model.preset_name=llama-3b", "lora.r=32", "lora.target_modules=[q_proj,v_proj]", "train.local_steps=4",
          "data.eval_fraction=0.02"]


def _argv(name: str, out: Path, quick: bool) -> list[str]:
    """Arguments of one benchmark's main()."""
    json_out = str(out / f"{name}.json")
    if name == "train_throughput":
        return ["--out", str(out / name), *(["--seqs", "512", "--steps", "2", "--warmup", "1"] if quick else [])]
    if name == "sim_round":
        if quick:
            return ["--out", str(out / name), "--modes", "resident+fast,resident+multi", "--ks", "4", "--seq", "64",
                    "--clients-per-batch", "4", "model.preset_name=tiny", "model.quantization=auto"]
        return ["--out", str(out / name), "--modes", "resident+fast,resident+multi", "--ks", "4,16", "--seq", "512",
                "--clients-per-batch", "16", *SIM_3B, "train.batch_size=2"]
    if name == "residency":
        return ["--out", str(out / name), "--modes", "resident,resident+fast,resident+multi,reload", "--ks", "4",
                "--reload-ks", "4", "--seq", "512", "--clients-per-batch", "4", *SIM_3B, "train.batch_size=16",
                "train.local_steps=10"]
    if name == "agreement":
        if quick:
            return ["--out", str(out / name), "--seq", "64", "model.preset_name=tiny", "model.quantization=auto",
                    "train.batch_size=2", "train.local_steps=3"]
        return ["--out", str(out / name), "--seq", "512", *SIM_3B, "train.batch_size=2"]
    if name == "vs_unsloth":
        if quick:
            import torch

            return ["--out", str(out / name), "--shapes", "llama-1b" if torch.cuda.is_available() else "tiny",
                    "--steps", "2", "--reps", "1"]
        return ["--out", str(out / name)]
    if name == "communication":
        return ["--out", json_out, *(["--cases", "fp32,bf16"] if quick else [])]
    if name == "aggregation":
        return ["--out", json_out, *(["--sites", "4", "--rank", "2"] if quick else [])]
    raise ValueError(f"unknown benchmark {name!r}")


def _main_of(name: str):
    from importlib import import_module

    module = {"residency": "sim_round", "agreement": "multi_adapter_agreement",
              "vs_unsloth": "unsloth_compare"}.get(name, name)
    return import_module(f"simulations.bench.{module}").main


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks one after another; a failing one is reported and the rest still run."""
    import torch

    parser = argparse.ArgumentParser(prog="fedtune bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for every benchmark's JSON and run files")
    parser.add_argument("--only", default="", help=f"comma list of {', '.join(GPU_BENCHMARKS + CPU_BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="smoke-sized runs (plumbing check, not for reporting)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(GPU_BENCHMARKS + CPU_BENCHMARKS)
    unknown = sorted(set(names) - set(GPU_BENCHMARKS + CPU_BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}")
    gpu = torch.cuda.is_available()
    status = []
    for name in names:
        if name in GPU_BENCHMARKS and not gpu and not (args.quick and name in QUICK_ON_CPU):
            status.append((name, "skipped: needs a CUDA GPU", 0.0))
            continue
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        try:
            rc = _main_of(name)(_argv(name, out, args.quick))
            status.append((name, "ok" if not rc else f"exit {rc}", time.perf_counter() - start))
        except Exception as exc:  # one broken benchmark should not hide the others' results
            status.append((name, f"failed: {type(exc).__name__}: {exc}", time.perf_counter() - start))
    print("\nbenchmark suite:", "GPU " + torch.cuda.get_device_name(0) if gpu else "no GPU", f"-> {out}")
    for name, result, seconds in status:
        print(f"  {name:17s} {seconds:7.1f}s  {result}")
    return 0 if all(r == "ok" or r.startswith("skipped") for _, r, _ in status) else 1


if __name__ == "__main__":
    sys.exit(main())
