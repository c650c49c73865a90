"""Our trainer vs Unsloth, same shapes, settings and examples, each in its own process; prints the ratios.

    python -m simulations.bench.unsloth_compare --out DIR [--shapes llama-1b,llama-8b] [--reps 2] [--budget-s 500]
        [--trainers default,unsloth | ours,ours+liger,...,ours+liger+varlen+fused+mlp+cudnn+offload,unsloth]

--trainers picks our variants (OUR_VARIANTS: `default` = the site trainer's defaults, the rest switch pieces on one
by one from plain `ours`: train.kernels none|liger x train.attention sdpa|varlen, +fused the fused LoRA forward,
+mlp the fused LoRA SwiGLU MLP, +cudnn cuDNN attention for full rows, +offload offloaded checkpoints) besides
Unsloth; the first of ours is paired with Unsloth in the main table; with more than one of ours, a second table
compares every variant with plain `ours` (tok/s, peak, MFU).

Unsloth patches transformers and peft when it is imported, so it never shares a process with our trainer: this
process only starts one worker per (shape, trainer), reads what they wrote, and prints the table. Unsloth is an
optional dependency: without it (or without CUDA, which it needs) only our side is measured, with a one-line note.

Both sides: the random-init preset directory of federation.model.materialize_preset (same weights, nothing is
downloaded), 4-bit NF4 with double quantization and bf16 compute, LoRA r=16 alpha=32 dropout 0 on all linear
layers of the decoder (q, k, v, o, gate, up, down), AdamW lr 2e-4, gradient-norm clip 1.0, and the same examples
(train_throughput.make_examples: random tokens, 30% prompt; `full` = every example seq long, `variable` =
log-normal lengths, median seq/4) in the same steps. Two memory regimes, ours against Unsloth in each:

  memory-lean   ours: client/fast_train.FastLocalTrainer as a site runs it (packed rows, checkpoint every layer)
                Unsloth: use_gradient_checkpointing="unsloth" (its activation offloading to host memory)
  fastest       ours: FastLocalTrainer with checkpoint_every=0
                Unsloth: no gradient checkpointing (FastLanguageModel.for_training(model, False), same process)

Unsloth trains on right-padded batches through its own forward and fused loss (model(..., labels=...).loss), the
way its manual-loop examples do.

Timing: for each (regime, scenario) one untimed pass over all the steps first, so every padded or packed shape of
the timed passes is warm (SDPA plans, allocator blocks, Unsloth's compiled pieces); then --reps timed passes over
the same steps, each from the same starting adapter with a fresh optimizer (their losses must repeat). tokens/s
counts real (non-padding) input tokens; peak = torch.cuda.max_memory_allocated over a timed pass.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

LR = 2e-4
MAX_GRAD_NORM = 1.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (seq, examples per step) per shape: the settings of issue 14's tables.
SHAPE_SETTINGS = {"llama-1b": (1024, 16), "llama-3b": (1024, 8), "llama-8b": (2048, 4), "tiny": (64, 4)}
# regime -> (our checkpoint_every, Unsloth's use_gradient_checkpointing)
REGIMES = {"memory-lean": (1, "unsloth"), "fastest": (0, False)}
# Our trainer's variants. "default": FastPathSettings as the site trainer runs it (train.kernels/attention auto,
# fused forwards, offloaded checkpoints): what --trainers compares with Unsloth unless told otherwise. The others
# are plain `ours` with the switches their name lists after "ours+" (_SWITCHES): +liger / +varlen train.kernels /
# train.attention, +fused the fused LoRA forward (client/fused_lora.py), +mlp its _LoRASwiGLU, +cudnn cuDNN's SDPA
# first for rows that are one whole sequence each (default: auto, by head dim), +offload checkpointed
# layers' inputs in pinned host memory (memory-lean only), +nf4 the fused functions' one-kernel NF4 dequantize
# (client/nf4_kernel.py). Each runs in its own process: Liger patches transformers' Llama module functions
# process-wide.
_OURS = {"kernels": "none", "attention": "sdpa", "fused_lora": False, "fused_mlp": False, "offload_checkpoints": False,
         "nf4_kernel": False, "cudnn_attention": "false"}
_SWITCHES = {"liger": {"kernels": "liger"}, "varlen": {"attention": "varlen"}, "fused": {"fused_lora": True},
             "mlp": {"fused_mlp": True}, "cudnn": {"cudnn_attention": "true"}, "offload": {"offload_checkpoints": True},
             "nf4": {"nf4_kernel": True}}


def _variant(name: str) -> dict:
    """FastPathSettings keywords of an `ours+switch+...` variant name."""
    settings = dict(_OURS)
    for switch in name.split("+")[1:]:
        settings.update(_SWITCHES[switch])
    return settings


OUR_VARIANTS = {"default": {}, **{name: _variant(name) for name in (
    "ours", "ours+liger", "ours+varlen", "ours+liger+varlen", "ours+liger+varlen+fused", "ours+liger+varlen+fused+mlp",
    "ours+liger+varlen+fused+mlp+cudnn", "ours+liger+varlen+fused+mlp+offload",
    "ours+liger+varlen+fused+mlp+cudnn+offload", "ours+liger+varlen+fused+mlp+offload+nf4",
    "ours+liger+varlen+fused+mlp+cudnn+offload+nf4")}}
TRAINERS = (*OUR_VARIANTS, "unsloth")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}


# ------------------------------------------------------------------------------------ shared by both sides


def step_batches(seq: int, per_step: int, steps: int, scenario: str, vocab: int) -> list[list[dict]]:
    """`steps` lists of `per_step` examples, the same on both sides (train_throughput's generator and seed)."""
    from simulations.bench.train_throughput import make_examples

    flat = make_examples(per_step * steps, seq, scenario, vocab, seed=seq)
    return [flat[i * per_step:(i + 1) * per_step] for i in range(steps)]


# A trainer's step as the benchmark drives it: (prepare(examples) -> batch, step(batch) -> (detached mean loss, real
# input tokens)); step runs forward and backward. The next step's batch is prepared after this step's backward is
# queued and before its optimizer step, as LocalTrainer.train does, so the GPU need not wait for it.
StepFns = tuple[Callable[[list[dict]], object], Callable[[object], tuple[torch.Tensor, int]]]


def _run_steps(step_fns: StepFns, params: Sequence[torch.nn.Parameter], optimizer,
               steps_examples: list[list[dict]]) -> tuple[list[torch.Tensor], int]:
    """One pass of optimizer steps over steps_examples: (each step's loss, real input tokens)."""
    prepare, step = step_fns
    losses, tokens = [], 0
    batch = prepare(steps_examples[0])
    for i in range(len(steps_examples)):
        loss, real = step(batch)
        if i + 1 < len(steps_examples):
            batch = prepare(steps_examples[i + 1])
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        tokens += real
    return losses, tokens


def host_cpu_times() -> tuple[int, int, int] | None:
    """(busy, steal, total) jiffies summed over the host's CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice, already inside user/nice]
    idle, steal = fields[3] + fields[4], fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return total - idle - steal, steal, total


def host_load(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None) -> dict:
    """What the host did between two host_cpu_times samples: busy and stolen fractions of all its CPUs, loadavg.

    Our step is CPU-bound at small shapes, so a pass is only as fast as the one core driving it: other work on
    the host (busy) or a hypervisor taking the core away (steal) show up here before they show up as noise.
    """
    load = {}
    if before and after and after[2] > before[2]:
        span = after[2] - before[2]
        load = {"host_busy_frac": round((after[0] - before[0]) / span, 4),
                "host_steal_frac": round((after[1] - before[1]) / span, 4)}
    try:
        load["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return load


def measure_passes(step_fns: StepFns, params: Sequence[torch.nn.Parameter],
                   steps_examples: list[list[dict]], reps: int, device: torch.device) -> list[dict]:
    """One untimed warm pass then `reps` timed passes over steps_examples, each from the same start; one dict each.

    step_fns: see StepFns; this function clips, steps a fresh AdamW per pass, and restores the parameters before
    each pass and at the end.
    """
    cuda = device.type == "cuda"
    start = [p.detach().clone() for p in params]
    timed = []
    for rep in range(reps + 1):
        with torch.no_grad():
            for param, value in zip(params, start):
                param.copy_(value)
        optimizer = torch.optim.AdamW(params, lr=LR)
        # Python's collector walks the whole heap (the model's modules included) when it collects the oldest
        # generation: collected and frozen here, for both trainers, it cannot land inside one pass and not another.
        gc.collect()
        gc.freeze()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        host_before, cpu_began = host_cpu_times(), time.process_time()
        began = time.perf_counter()
        losses, tokens = _run_steps(step_fns, params, optimizer, steps_examples)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        cpu_seconds = time.process_time() - cpu_began
        if rep == 0:
            continue  # the warm pass: every shape of the timed passes has now run once
        # cpu_seconds: this process's CPU time (all its threads) over the pass; ~seconds when the step is CPU-bound.
        timed.append({"rep": rep, "tokens_per_s": tokens / seconds, "seconds": seconds, "real_tokens": tokens,
                      "cpu_seconds": cpu_seconds, **host_load(host_before, host_cpu_times()),
                      "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else 0,
                      "losses": [float(x) for x in losses]})
    with torch.no_grad():  # leave the model as it came: the next measurement starts from the same adapter
        for param, value in zip(params, start):
            param.copy_(value)
    del optimizer
    return timed


# Kernel kinds for the profile's per-kind sums, first match wins (lower-case substrings of the kernel name):
# where two trainers' GPU time differs is then one line per kind, not a list of mangled names.
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "attn")),
                ("dequantize", ("dequant",)),
                ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "cublas")),
                ("triton (Liger, Unsloth)", ("triton", "swiglu", "rope", "rms_norm", "cross_entropy", "geglu")),
                ("copy/cast", ("copy", "cast", "memcpy", "memset", "fill")),
                ("elementwise", ("elementwise", "vectorized", "unrolled")),
                ("reduction", ("reduce", "norm", "softmax", "sum")))


def kernel_kind(name: str) -> str:
    """The KERNEL_KINDS kind of a CUDA kernel name ("other" when none matches)."""
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other")


def _pass_under(profiler, step_fns: StepFns, params: Sequence[torch.nn.Parameter],
                steps_examples: list[list[dict]]) -> float:
    """Wall seconds of one pass over steps_examples inside `profiler` (a context manager), from the current
    parameters with a fresh AdamW; the parameters are restored afterwards."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=LR)
    sync()
    try:
        with profiler:
            began = time.perf_counter()
            _run_steps(step_fns, params, optimizer, steps_examples)
            sync()
            wall = time.perf_counter() - began
    finally:
        with torch.no_grad():
            for param, value in zip(params, start):
                param.copy_(value)
    return wall


def profile_pass(step_fns: StepFns, params: Sequence[torch.nn.Parameter],
                 steps_examples: list[list[dict]], top: int = 12) -> dict:
    """One pass under torch.profiler (after the timed ones, same start): wall vs summed CUDA kernel time per step,
    and the kernels (and CPU ops) that took longest, per step; the parameters are restored afterwards."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
    wall = _pass_under(prof, step_fns, params, steps_examples)
    n = len(steps_examples)
    events = prof.key_averages()
    # Kernel events only: a CPU op's self device time is its kernels' time again (counting both doubles it).
    device_events = [e for e in events if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    timeline = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type.name == "CUDA"]
    return {"wall_ms_per_step": wall * 1e3 / n,
            "gpu_kernel_ms_per_step": sum(e.self_device_time_total for e in device_events) / 1e3 / n,
            **gpu_idle_gaps(timeline, n),
            "top_kernels_ms_per_step": {e.key[:100]: round(e.self_device_time_total / 1e3 / n, 3) for e in
                                        sorted(device_events, key=lambda e: -e.self_device_time_total)[:top]},
            "kernel_ms_per_step_by_kind": _sum_by_kind(device_events, n),
            "kernel_launches_per_step": sum(e.count for e in device_events) / n,
            "top_cpu_ops_ms_per_step": {e.key[:100]: round(e.self_cpu_time_total / 1e3 / n, 3) for e in
                                        sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]}}


def python_profile_pass(step_fns: StepFns, params: Sequence[torch.nn.Parameter],
                        steps_examples: list[list[dict]], top: int = 30) -> dict:
    """One pass under cProfile (same start, parameters restored): the Python functions where the CPU spent its time.

    Where a step is CPU-bound the GPU waits on Python: torch.profiler names the ops, this names the code around
    them (Triton's launcher, PEFT, our wrappers). cProfile slows every Python call, so the figures are relative.
    Returns {"wall_ms_per_step", "top_by_self_ms_per_step": {function: [calls per step, self ms, cumulative ms]}}.
    """
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    wall = _pass_under(profiler, step_fns, params, steps_examples)
    n = len(steps_examples)
    # (file, line, name) -> (primitive calls, calls, self s, cumulative s, callers)
    stats = pstats.Stats(profiler).stats
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return {"wall_ms_per_step": wall * 1e3 / n,
            "top_by_self_ms_per_step": {
                f"{Path(file).name}:{line}({name})"[:120]: [round(calls / n, 1), round(own * 1e3 / n, 3),
                                                            round(cumulative * 1e3 / n, 3)]
                for (file, line, name), (_, calls, own, cumulative, _) in ranked}}


def gpu_idle_gaps(kernels: list[tuple[float, float, str]], steps: int, top: int = 8) -> dict:
    """Where the GPU sat idle: (start us, end us, name) of every kernel and copy, all streams -> per-step figures.

    Idle = no kernel or copy running on any stream. The gaps are summed by the kernel that ended them (what the
    GPU was waiting for the CPU to launch), and the largest are listed with the kernels on either side.
    """
    if not kernels:
        return {}
    kernels = sorted(kernels)
    gaps = []  # (idle us, kernel before, kernel after)
    busy_until, last = kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start > busy_until:
            gaps.append((start - busy_until, last, name))
        if end > busy_until:
            busy_until, last = end, name
    by_next: dict[str, float] = {}
    for idle, _, after in gaps:
        by_next[after[:80]] = by_next.get(after[:80], 0.0) + idle
    return {"gpu_idle_ms_per_step": round(sum(g[0] for g in gaps) / 1e3 / steps, 3),
            "gpu_span_ms_per_step": round((busy_until - kernels[0][0]) / 1e3 / steps, 3),
            "idle_ms_per_step_before_kernel": {name: round(us / 1e3 / steps, 3) for name, us in
                                               sorted(by_next.items(), key=lambda item: -item[1])[:top]},
            "largest_idle_gaps_ms": [[round(idle / 1e3, 3), before[:60], after[:60]]
                                     for idle, before, after in sorted(gaps, key=lambda g: -g[0])[:top]]}


def _sum_by_kind(device_events, steps: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for event in device_events:
        kind = kernel_kind(event.key)
        totals[kind] = totals.get(kind, 0.0) + event.self_device_time_total / 1e3 / steps
    return {kind: round(ms, 3) for kind, ms in sorted(totals.items(), key=lambda item: -item[1])}


def comparison_rows(results: list[dict], ours: str = "ours") -> list[dict]:
    """Worker results -> one row per (shape, regime, scenario): each side's reps, spread, peak, and ours/Unsloth.

    ours names the variant paired with Unsloth in the ratios (row["ours_variant"]).
    """
    grouped: dict[tuple, dict[str, list[dict]]] = {}
    for result in results:
        for run in result.get("runs", []):
            if not run.get("passes"):  # an error run (its message is in the worker's log and result JSON)
                continue
            key = (result["shape"], run["regime"], run["scenario"])
            grouped.setdefault(key, {}).setdefault(result["trainer"], []).extend(run["passes"])
    rows = []
    for (shape, regime, scenario), sides in grouped.items():
        row = {"shape": shape, "regime": regime, "scenario": scenario, "ours_variant": ours}
        for trainer in TRAINERS:
            passes = sides.get(trainer, [])
            if not passes:
                continue
            rates = [p["tokens_per_s"] for p in passes]
            mean = statistics.fmean(rates)
            row[trainer] = {"tokens_per_s": rates, "mean_tokens_per_s": mean,
                            "spread": (max(rates) - min(rates)) / mean if mean else 0.0,
                            "peak_gib": max(p["peak_bytes"] for p in passes) / 2**30,
                            "mfu": (statistics.fmean(p["mfu"] for p in passes)
                                    if all("mfu" in p for p in passes) else None),
                            "step0_loss": passes[0]["losses"][0] if passes[0]["losses"] else None}
        if ours in row and "unsloth" in row:
            row["speed_ratio"] = row[ours]["mean_tokens_per_s"] / row["unsloth"]["mean_tokens_per_s"]
            unsloth_peak = row["unsloth"]["peak_gib"]
            row["memory_ratio"] = row[ours]["peak_gib"] / unsloth_peak if unsloth_peak else None
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> list[str]:
    """Markdown lines of comparison_rows (tok/s of each rep, spread, peak GiB, ratios ours/Unsloth)."""
    lines = ["| shape | regime | data | ours (variant) tok/s (reps) | spread | peak GiB | Unsloth tok/s (reps) | spread | "
             "peak GiB | speed ours/Unsloth | memory ours/Unsloth | step-0 loss ours / Unsloth |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---|"]

    def side(row, trainer):
        if trainer not in row:
            return "not measured | - | -"
        s = row[trainer]
        return (f"{' / '.join(f'{r:,.0f}' for r in s['tokens_per_s'])} | {100 * s['spread']:.1f}% | "
                f"{s['peak_gib']:.2f}")

    for row in rows:
        speed = f"{row['speed_ratio']:.2f}x" if "speed_ratio" in row else "-"
        memory = f"{row['memory_ratio']:.2f}x" if row.get("memory_ratio") else "-"
        ours = row.get("ours_variant", "ours")
        losses = " / ".join(f"{row[t]['step0_loss']:.4f}" if t in row and row[t]["step0_loss"] is not None else "-"
                            for t in (ours, "unsloth"))
        lines.append(f"| {row['shape']} | {row['regime']} | {row['scenario']} | ({ours}) {side(row, ours)} | "
                     f"{side(row, 'unsloth')} | {speed} | {memory} | {losses} |")
    return lines


def format_variant_table(rows: list[dict]) -> list[str]:
    """Markdown lines: every trainer of each row (our variants, Unsloth) against plain `ours`: tok/s, peak, MFU."""
    lines = ["| shape | regime | data | trainer | mean tok/s | spread | peak GiB | MFU | speed / ours | memory / ours | "
             "speed / Unsloth | step-0 loss |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(side: dict, ref: dict | None, key: str) -> str:
        return f"{side[key] / ref[key]:.2f}x" if ref and ref[key] else "-"

    for row in rows:
        for trainer in TRAINERS:
            if trainer not in row:
                continue
            side = row[trainer]
            mfu = f"{side['mfu']:.3f}" if side["mfu"] is not None else "-"
            loss = f"{side['step0_loss']:.4f}" if side["step0_loss"] is not None else "-"
            lines.append(
                f"| {row['shape']} | {row['regime']} | {row['scenario']} | {trainer} | "
                f"{side['mean_tokens_per_s']:,.0f} | {100 * side['spread']:.1f}% | {side['peak_gib']:.2f} | {mfu} | "
                f"{ratio(side, row.get('ours'), 'mean_tokens_per_s')} | {ratio(side, row.get('ours'), 'peak_gib')} | "
                f"{ratio(side, row.get('unsloth'), 'mean_tokens_per_s')} | {loss} |")
    return lines


def unsloth_missing_reason() -> str | None:
    """Why Unsloth cannot be measured here (None when it can): not installed, or no CUDA device."""
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed (pip install unsloth; on the lent GPU: ../shared/tools/gpu-wheels.sh --unsloth)"
    if not torch.cuda.is_available():
        return "unsloth needs a CUDA GPU"
    return None


def _environment(device: torch.device, extra: dict) -> dict:
    from simulations.bench.train_throughput import environment

    env = environment(device)
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------- workers


class _ResultFile:
    """The worker's result JSON, rewritten after every measurement (a worker cut off by the budget keeps its rows)."""

    def __init__(self, path: str, data: dict):
        self.path, self.data = Path(path), data
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))


def _log(line: str) -> None:
    print(line, flush=True)


def flops_counter(model) -> Callable[[list[dict]], float] | None:
    """examples -> counted model FLOPs of one step (train_throughput's formula) for this LoRA model; None if uncountable."""
    from simulations.bench.train_throughput import counted_flops

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = causal_lm.config
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_base = sum(m.in_features * m.out_features for _, m in model.named_modules()
                 if hasattr(m, "base_layer") and hasattr(m.base_layer, "in_features"))
    if n_base == 0:
        return None
    d_attn = config.num_attention_heads * (getattr(config, "head_dim", None)
                                           or config.hidden_size // config.num_attention_heads)
    args = (n_base, n_lora, config.vocab_size, config.hidden_size, config.num_hidden_layers, d_attn)
    return lambda examples: counted_flops(examples, *args)


def _peak_tflops(device: torch.device) -> float | None:
    """Measured dense bf16 matmul peak (MFU denominator), CUDA only."""
    if device.type != "cuda":
        return None
    from simulations.bench.train_throughput import matmul_peak_tflops

    return matmul_peak_tflops(device)


def _run_regimes(result: _ResultFile, args, vocab: int, device: torch.device, params, set_regime, make_step,
                 flops_of: Callable[[list[dict]], float] | None = None) -> None:
    """For each regime and scenario: set_regime(regime), warm + timed passes of make_step(); saved after each.

    With flops_of and a measured peak (result.data["env"]["peak_tflops"]), each pass also gets its MFU.
    """
    peak = result.data["env"].get("peak_tflops")
    for regime in args.regimes.split(","):
        try:
            set_regime(regime)
        except Exception as exc:  # e.g. a kernel set that cannot run here: say so in the result, go on
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            _log(f"[{result.data['trainer']} {args.shape}] {regime} {error}")
            result.data["runs"].append({"regime": regime, "error": error})
            result.save()
            continue
        for scenario in args.scenarios.split(","):
            steps_examples = step_batches(args.seq, args.examples_per_step, args.steps, scenario, vocab)
            try:
                passes = measure_passes(make_step(), params, steps_examples, args.reps, device)
                if flops_of is not None and peak:
                    flops = sum(flops_of(examples) for examples in steps_examples)
                    for p in passes:
                        p["mfu"] = flops / p["seconds"] / 1e12 / peak
                run = {"regime": regime, "scenario": scenario, "passes": passes}
                if scenario in args.profile.split(","):
                    run["profile"] = profile_pass(make_step(), params, steps_examples)
                    _log(f"[{result.data['trainer']} {args.shape}] {regime} {scenario} profile: "
                         + json.dumps(run["profile"]))
                if scenario in args.python_profile.split(","):
                    run["python_profile"] = python_profile_pass(make_step(), params, steps_examples)
                    _log(f"[{result.data['trainer']} {args.shape}] {regime} {scenario} python profile: "
                         + json.dumps(run["python_profile"]))
                _log(f"[{result.data['trainer']} {args.shape}] {regime:11s} {scenario:8s} " + "  ".join(
                    f"{p['tokens_per_s']:9.0f} tok/s peak {p['peak_bytes'] / 2**30:6.2f} GiB"
                    + (f" MFU {p['mfu']:.3f}" if "mfu" in p else "")
                    + f" cpu/wall {p['cpu_seconds'] / p['seconds']:.2f}"
                    + (f" host busy {p['host_busy_frac']:.2f} steal {p['host_steal_frac']:.3f}"
                       if "host_busy_frac" in p else "") for p in passes)
                    + f"  step0 loss {passes[0]['losses'][0]:.4f}")
            except Exception as exc:  # an OOM in one regime must not lose the others
                run = {"regime": regime, "scenario": scenario, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                _log(f"[{result.data['trainer']} {args.shape}] {regime} {scenario} {run['error']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result.data["runs"].append(run)
            result.save()


def _liger_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # not installed: the `ours` variants without Liger still run
        return None


def ours_worker(args) -> int:
    """Our site trainer (FastLocalTrainer's batch path) on the FlowerTune-style 4-bit model of train_throughput.

    args.worker names the variant (OUR_VARIANTS): its train.kernels / train.attention / fused_lora / fused_mlp /
    cudnn_attention / offload_checkpoints go to FastPathSettings.
    """
    from client.fast_train import FastLocalTrainer, FastPathSettings
    from federation.config import TrainConfig
    from simulations.bench.train_throughput import load_baseline_model

    variant = OUR_VARIANTS[args.worker]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    began = time.perf_counter()
    model, pad_id = load_baseline_model(args.shape, args.cache, device)
    result = _ResultFile(args.result, {"trainer": args.worker, "shape": args.shape, "seq": args.seq,
                                       "examples_per_step": args.examples_per_step, "steps": args.steps,
                                       "load_seconds": time.perf_counter() - began, **variant,
                                       "env": _environment(device, {"liger_kernel": _liger_version(),
                                                                    "peak_tflops": _peak_tflops(device)}),
                                       "runs": []})
    _log(f"[{args.worker} {args.shape}] loaded in {result.data['load_seconds']:.1f}s on "
         f"{result.data['env']['device']} ({variant}, bf16 matmul peak {result.data['env']['peak_tflops']} TFLOP/s)")
    params = [p for p in model.parameters() if p.requires_grad]
    train_cfg = TrainConfig(lr=LR, max_grad_norm=MAX_GRAD_NORM)
    trainer: list[FastLocalTrainer] = []

    def set_regime(regime: str) -> None:
        trainer[:] = [FastLocalTrainer(model, pad_id, train_cfg,
                                       FastPathSettings(checkpoint_every=REGIMES[regime][0], **variant))]

    def make_step():
        fast = trainer[0]

        def step(batch):
            # The trainer's own batch pieces: LocalTrainer.train runs exactly these per micro-batch.
            summed, n = fast._batch_loss_sum(batch)
            loss = summed / max(n, 1)
            loss.backward()
            return loss.detach(), fast._input_tokens(batch)

        return fast._collate, step

    model.train()
    _run_regimes(result, args, model.config.vocab_size, device, params, set_regime, make_step, flops_counter(model))
    return 0


def unsloth_worker(args) -> int:
    """Unsloth's FastLanguageModel on the same preset directory; both regimes in this one process."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    import unsloth  # noqa: F401  (first: it patches transformers and peft on import)
    from unsloth import FastLanguageModel

    from federation.config import ModelConfig
    from federation.data import collate_batch
    from federation.model import materialize_preset

    device = torch.device("cuda")
    began = time.perf_counter()
    source = str(materialize_preset(ModelConfig(name="preset", preset_name=args.shape, cache_dir=args.cache)))
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=source, max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=True,
        use_gradient_checkpointing="unsloth", fix_tokenizer=False, random_state=0)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none", target_modules=LORA_TARGETS,
        use_gradient_checkpointing="unsloth", random_state=0)
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    result = _ResultFile(args.result, {"trainer": "unsloth", "shape": args.shape, "seq": args.seq,
                                       "examples_per_step": args.examples_per_step, "steps": args.steps,
                                       "load_seconds": time.perf_counter() - began,
                                       "env": _environment(device, {"unsloth": unsloth.__version__,
                                                                    "peak_tflops": _peak_tflops(device)}),
                                       "runs": []})
    _log(f"[unsloth {args.shape}] Unsloth {unsloth.__version__} loaded in {result.data['load_seconds']:.1f}s")
    params = [p for p in model.parameters() if p.requires_grad]

    def set_regime(regime: str) -> None:
        FastLanguageModel.for_training(model, use_gradient_checkpointing=REGIMES[regime][1])

    def make_step():
        def prepare(examples):
            # Counted on the host and copied without blocking, as our trainer does (client/fast_train.py
            # host_to_device): a count on the GPU, or a blocking copy, would stall every step on the stream.
            host = collate_batch(examples, pad_id)
            return {k: v.pin_memory().to(device, non_blocking=True) for k, v in host.items()}, int(
                host["attention_mask"].sum())

        def step(prepared):
            batch, tokens = prepared
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
            loss.backward()
            return loss.detach(), tokens

        return prepare, step

    _run_regimes(result, args, model.config.vocab_size, device, params, set_regime, make_step, flops_counter(model))
    return 0


# ----------------------------------------------------------------------------------------------- driver


def _worker_argv(args, shape: str, trainer: str, result: Path) -> list[str]:
    seq, per_step = SHAPE_SETTINGS[shape]
    return [sys.executable, "-m", "simulations.bench.unsloth_compare", "--worker", trainer, "--shape", shape,
            "--seq", str(args.seq or seq), "--examples-per-step", str(args.examples_per_step or per_step),
            "--steps", str(args.steps), "--reps", str(args.reps), "--scenarios", args.scenarios,
            "--regimes", args.regimes, "--profile", args.profile, "--python-profile", args.python_profile,
            "--cache", args.cache, "--result", str(result), "--out", args.out]


def run_worker(argv: list[str], log_path: Path, timeout: float) -> str:
    """Run one worker process (its output to log_path and echoed here); 'ok', 'exit N' or 'timed out'."""
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    workdir = tempfile.mkdtemp(prefix="fedtune-bench-")  # Unsloth writes its compile cache into the cwd
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=workdir)
        deadline = time.monotonic() + timeout
        import selectors

        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return "timed out"
            if not selector.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            log.write(line)
            log.flush()
            if line.startswith("["):  # the worker's own progress lines; library chatter stays in the log
                print(line, end="", flush=True)
        proc.wait()
    return "ok" if proc.returncode == 0 else f"exit {proc.returncode}"


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or, with --worker, one side of it); writes unsloth_compare.json and .md under --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="llama-1b,llama-8b", help=f"of {', '.join(SHAPE_SETTINGS)}")
    parser.add_argument("--seq", type=int, default=0, help="0: the shape's setting in SHAPE_SETTINGS")
    parser.add_argument("--examples-per-step", type=int, default=0, help="0: the shape's setting")
    parser.add_argument("--steps", type=int, default=6, help="steps per pass (one warm pass, then --reps timed)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--scenarios", default="full,variable")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--trainers", default="default,unsloth", help=f"comma list of {', '.join(TRAINERS)}")
    parser.add_argument("--cache", default="/tmp/fedtune-models", help="preset directories (both sides load them)")
    parser.add_argument("--budget-s", type=float, default=500.0,
                        help="wall-clock budget of the whole comparison: a worker gets what is left, then is stopped")
    parser.add_argument("--profile", default="", help="comma list of scenarios to profile after their timed passes: "
                        "GPU-busy share of a step and its top kernels, in the worker's JSON and log")
    parser.add_argument("--python-profile", default="", help="comma list of scenarios to run once more under "
                        "cProfile after their timed passes: the Python functions a CPU-bound step spends its time in")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return ours_worker(args) if args.worker in OUR_VARIANTS else unsloth_worker(args)

    unknown = sorted(set(args.shapes.split(",")) - set(SHAPE_SETTINGS))
    if unknown:
        parser.error(f"unknown shapes {unknown}; valid: {', '.join(SHAPE_SETTINGS)}")
    unknown = sorted(set(filter(None, args.trainers.split(","))) - set(TRAINERS))
    if unknown:
        parser.error(f"unknown trainers {unknown}; valid: {', '.join(TRAINERS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    trainers = [t for t in args.trainers.split(",") if t]
    missing = unsloth_missing_reason() if "unsloth" in trainers else None
    if missing:
        print(f"unsloth: skipped, {missing}; measuring ours only", flush=True)
        trainers = [t for t in trainers if t != "unsloth"]
    results, status = [], []
    for shape in args.shapes.split(","):
        for trainer in trainers:
            stem = f"{trainer.replace('+', '-')}_{shape}"  # plain file names: ours-liger_llama-8b.json
            result_path = out / f"{stem}.json"
            left = deadline - time.monotonic()
            if left < 20:
                status.append((shape, trainer, "not run: budget spent"))
                continue
            print(f"--- {trainer} {shape} ({left:.0f}s of the budget left)", flush=True)
            outcome = run_worker(_worker_argv(args, shape, trainer, result_path), out / f"{stem}.log",
                                 left)
            status.append((shape, trainer, outcome))
            if result_path.exists():
                results.append(json.loads(result_path.read_text()))
    ours_first = next((t for t in trainers if t in OUR_VARIANTS), "ours")  # the one paired with Unsloth
    rows = comparison_rows(results, ours_first)
    envs = {r["trainer"]: r["env"] for r in results}
    summary = {"args": vars(args), "unsloth_skipped": missing, "env": envs, "workers": status, "rows": rows}
    (out / "unsloth_compare.json").write_text(json.dumps(summary, indent=1))
    lines = [f"env: {json.dumps(envs.get('unsloth') or envs.get(ours_first))}"]
    if missing:
        lines.append(f"unsloth: skipped ({missing})")
    lines += [f"worker {trainer} {shape}: {outcome}" for shape, trainer, outcome in status]
    lines += format_table(rows)
    if len([t for t in trainers if t in OUR_VARIANTS]) > 1:
        lines += ["", *format_variant_table(rows)]
    (out / "unsloth_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if all(outcome == "ok" for _, _, outcome in status) else 1


if __name__ == "__main__":
    sys.exit(main())
