"""Local QLoRA training throughput: the plain HF/peft/bitsandbytes path vs ours (client/fast_train.py), one process.

    python -m simulations.bench.train_throughput --out /tmp/bench --shape llama-1b --seqs 512,1024,2048

One base model is loaded per shape exactly as FlowerTune's example client does (from_pretrained with
BitsAndBytesConfig NF4 + double quant + bf16 compute, prepare_model_for_kbit_training with gradient
checkpointing, get_peft_model with LoRA on all linear layers), the baseline variants are measured on it,
then it is converted in place (prepare_model_for_fast_training) and our variants are measured, on the same
examples in the same order. Every run starts from the same LoRA adapter, so step-0 losses must agree.

Variants (each adds one change to the one above it; ablation):
  baseline       fp32-upcast frozen weights, re-entrant checkpointing on every layer, no autocast,
                 right-padded batches, HF loss (full-vocab logits)
  +autocast      bf16 autocast (what HF Trainer's bf16=True adds)
  +bf16-frozen   frozen embeddings/norms/lm_head back in bf16, non-reentrant checkpointing
  +chunked-ce    loss over target tokens only, chunk by chunk, no (tokens, vocab) logits
  +packing       examples packed into rows of seq tokens (block-diagonal attention), no padding
  +ckpt-half     checkpoint every 2nd decoder layer only
  +no-ckpt       no gradient checkpointing

Counted FLOPs (model FLOPs, MFU numerator; gradient-checkpoint recompute is NOT counted), per step:
  base linear layers (frozen): 2 N_base T forward + 2 N_base T backward (input grads only, no weight grads)
  lm_head (frozen):            4 V d T_target (only target tokens need logits)
  LoRA (trainable):            6 N_lora T (forward 2, input grads 2, weight grads 2)
  attention (causal):          6 L d_attn sum_i T_i (T_i + 1) over the examples i of the step (forward: QK^T and PV,
                               2 d_attn t FLOPs each for query position t, summed over t = 2 d_attn T_i (T_i + 1);
                               backward: four such products, twice the forward)
where T = real (non-padding) tokens, N_base = decoder linear weights (excl. embeddings and lm_head),
d_attn = heads * head_dim. MFU = counted FLOPs / time / measured dense bf16 matmul peak (8192^3 in this run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from client.fast_train import (
    FastPathSettings,
    apply_attention_backends,
    chunked_causal_lm_loss,
    causal_lm_parts,
    pack_sequences,
    packed_loss_sum,
    prepare_model_for_fast_training,
    set_checkpointing_policy,
    shift_labels,
)
from federation.data import IGNORE_INDEX, collate_batch

LORA_R, LORA_ALPHA = 16, 32
PROMPT_FRACTION = 0.3  # leading share of each example whose labels are -100 (an SFT prompt)
LENGTH_SIGMA = 0.75  # log-normal spread of example lengths in the "variable" scenario
MIN_LEN = 32

# name, autocast, frozen-weights path ("hf" = peft's fp32 upcast, "fast" = ours), loss, batching, checkpoint_every
VARIANTS = [
    ("baseline", False, "hf", "hf", "padded", 1),
    ("+autocast", True, "hf", "hf", "padded", 1),
    ("+bf16-frozen", True, "fast", "hf", "padded", 1),
    ("+chunked-ce", True, "fast", "chunked", "padded", 1),
    ("+packing", True, "fast", "chunked", "packed", 1),
    ("+packing-fixed", True, "fast", "chunked", "packed-fixed", 1),  # diagnostic: every row padded to seq
    ("+ckpt-half", True, "fast", "chunked", "packed", 2),
    ("+no-ckpt", True, "fast", "chunked", "packed", 0),
]


def make_examples(num: int, seq: int, scenario: str, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """num random-token examples: 'full' = all seq long; 'variable' = log-normal lengths, median seq/4, in [32, seq]."""
    rng = np.random.default_rng(seed)
    if scenario == "full":
        lengths = np.full(num, seq)
    else:
        lengths = np.clip(np.round(rng.lognormal(math.log(seq / 4), LENGTH_SIGMA, num)), min(MIN_LEN, seq), seq)
    out = []
    for length in lengths.astype(int):
        ids = torch.from_numpy(rng.integers(3, vocab, length)).long()
        labels = ids.clone()
        labels[: int(PROMPT_FRACTION * length)] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def counted_flops(examples, n_base: int, n_lora: int, vocab: int, hidden: int, layers: int, d_attn: int) -> float:
    """Model FLOPs of one training step over `examples` (formula in the module docstring)."""
    tokens = sum(len(e["input_ids"]) for e in examples)
    targets = sum(int((shift_labels(e["labels"]) != IGNORE_INDEX).sum()) for e in examples)
    attention = sum(6 * layers * d_attn * len(e["input_ids"]) * (len(e["input_ids"]) + 1) for e in examples)
    return 4.0 * n_base * tokens + 4.0 * vocab * hidden * targets + 6.0 * n_lora * tokens + attention


def matmul_peak_tflops(device: torch.device, size: int = 8192, reps: int = 20) -> float:
    """Median dense bf16 matmul rate (random operands) in TFLOP/s."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * size**3 / float(np.median(times)) / 1e12


def dequant_pass_ms(model, device: torch.device) -> float | None:
    """Time of one bitsandbytes dequantize of every 4-bit weight (one forward pass dequantizes each once)."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    weights = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    if not weights or device.type != "cuda":
        return None
    for w in weights[:4]:
        bnbf.dequantize_4bit(w.data, w.quant_state)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for w in weights:
        bnbf.dequantize_4bit(w.data, w.quant_state)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def step_loss(model, examples, variant, seq: int, pad_id: int, autocast: bool):
    """(loss to backpropagate, summed loss, target tokens, real input tokens) of one step under `variant`."""
    _, loss_kind, batching = variant[2], variant[3], variant[4]
    device = next(p for p in model.parameters()).device
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast and device.type == "cuda" else contextlib.nullcontext()
    real = sum(len(e["input_ids"]) for e in examples)
    if batching in ("packed", "packed-fixed"):
        packed = pack_sequences(examples, seq, pad_id, fixed_width=batching == "packed-fixed")
        with ctx:
            summed, n = packed_loss_sum(model, packed)
        return summed / max(n, 1), summed, n, real
    batch = {k: v.to(device) for k, v in collate_batch(examples, pad_id).items()}
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with ctx:
        if loss_kind == "hf":
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
            return loss, loss.detach() * n, n, real
        _, decoder, lm_head = causal_lm_parts(model)
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
    summed, n = chunked_causal_lm_loss(hidden.to(lm_head.weight.dtype), lm_head.weight, shift_labels(batch["labels"]))
    return summed / max(n, 1), summed, n, real


def run_variant(model, variant, steps_examples, seq, pad_id, warmup, flops_args, peak_tflops, start_adapter):
    """Train len(steps_examples) steps; time and peak memory over the steps after `warmup`."""
    from federation.adapter import set_adapter_arrays

    set_adapter_arrays(model, start_adapter)
    device = next(p for p in model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    losses, tokens, flops = [], 0, 0.0
    cuda = device.type == "cuda"
    start = None
    for index, examples in enumerate(steps_examples):
        if index == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        loss, summed, n, real = step_loss(model, examples, variant, seq, pad_id, autocast=variant[1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(summed.detach()) / max(n, 1))
        if index >= warmup:
            tokens += real
            flops += counted_flops(examples, *flops_args)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    del optimizer
    return {
        "variant": variant[0], "seq": seq, "tokens_per_s": tokens / seconds, "seconds": seconds,
        "steps_timed": len(steps_examples) - warmup, "real_tokens_timed": tokens, "peak_bytes": peak,
        "tflops": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / peak_tflops if peak_tflops else None,
        "step0_loss": losses[0], "losses": losses,
    }


def profile_variant(model, variant, steps_examples, seq, pad_id) -> dict:
    """GPU-busy share of a step: wall time per step vs summed CUDA kernel time per step, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(examples):
        loss, _, _, _ = step_loss(model, examples, variant, seq, pad_id, autocast=variant[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(steps_examples[0])
    torch.cuda.synchronize()
    timed = steps_examples[1:3]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for examples in timed:
            step(examples)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / len(timed)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0]
    gpu_us = sum(e.self_device_time_total for e in kernels) / len(timed)
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:10]
    cpu_top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return {"variant": variant[0], "seq": seq, "wall_ms_per_step": wall * 1e3, "gpu_kernel_ms_per_step": gpu_us / 1e3,
            "top_kernels_ms_per_step": {e.key[:90]: e.self_device_time_total / 1e3 / len(timed) for e in top},
            "top_cpu_ops_ms_per_step": {e.key[:90]: e.self_cpu_time_total / 1e3 / len(timed) for e in cpu_top}}


def load_baseline_model(shape: str, cache_dir: str, device: torch.device):
    """As FlowerTune's example client: 4-bit NF4 from_pretrained, prepare_model_for_kbit_training, get_peft_model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from federation.config import ModelConfig
    from federation.model import materialize_preset

    source = str(materialize_preset(ModelConfig(name="preset", preset_name=shape, cache_dir=cache_dir)))
    if device.type == "cuda":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        base = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant, dtype=torch.bfloat16,
                                                    device_map={"": device.index or 0})
    else:
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def bench_shape(args, shape: str, device: torch.device, peak_tflops: float, log, save) -> dict:
    """All variants x seqs x scenarios for one model shape; save(info) after every measurement."""
    from federation.adapter import get_adapter_arrays

    load_start = time.perf_counter()
    model, pad_id = load_baseline_model(shape, args.cache, device)
    load_seconds = time.perf_counter() - load_start
    causal_lm, _, lm_head = causal_lm_parts(model)
    config = causal_lm.config
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_base = sum(m.in_features * m.out_features for n, m in model.named_modules()
                 if hasattr(m, "base_layer") and hasattr(m.base_layer, "in_features"))
    if n_base == 0:  # bnb Linear4bit stores packed weights; count from the LoRA-wrapped layers' shapes
        raise RuntimeError("could not count base linear weights")
    d_attn = config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    flops_args = (n_base, n_lora, config.vocab_size, config.hidden_size, config.num_hidden_layers, d_attn)
    start_adapter = get_adapter_arrays(model)
    info = {"shape": shape, "load_seconds": load_seconds, "n_base_linear": n_base, "n_lora": n_lora,
            "vocab": config.vocab_size, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "dequant_pass_ms": dequant_pass_ms(model, device), "runs": []}
    log(f"[{shape}] loaded in {load_seconds:.1f}s, base linear {n_base:,}, lora {n_lora:,}, "
        f"attn={info['attn_implementation']}, one dequant pass {info['dequant_pass_ms']} ms")
    seqs = [int(s) for s in args.seqs.split(",")]
    steps = args.warmup + args.steps
    data = {}
    for seq in seqs:
        per_step = max(1, args.tokens_per_step // seq)
        for scenario in args.scenarios.split(","):
            flat = make_examples(per_step * steps, seq, scenario, config.vocab_size, seed=seq)
            data[seq, scenario] = [flat[i * per_step:(i + 1) * per_step] for i in range(steps)]
    converted = False
    for variant in VARIANTS:
        if variant[0] not in args.variants.split(","):
            continue
        if variant[2] == "fast" and not converted:
            prepare_model_for_fast_training(model, torch.bfloat16 if device.type == "cuda" else torch.float32, 1)
            # Our variants run with the attention backends FastLocalTrainer sets (cuDNN SDPA off unless
            # --cudnn-attention): until this, the packed variants ran on cuDNN's plans, built anew for every new
            # packed shape, which the trainer never does (issue 14's 1.2k tok/s llama-8b variable row).
            apply_attention_backends(FastPathSettings(cudnn_attention=str(args.cudnn_attention).lower()), model)
            converted = True
        if variant[2] == "fast":
            set_checkpointing_policy(model, variant[5])
        run_seqs = seqs if variant[0] in args.sweep_variants.split(",") else [args.ablation_seq]
        for seq in run_seqs:
            for scenario in args.scenarios.split(","):
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                try:
                    row = run_variant(model, variant, data[seq, scenario], seq, pad_id, args.warmup, flops_args,
                                      peak_tflops, start_adapter)
                except Exception as exc:  # an OOM or a failing variant must not lose the other measurements
                    row = {"variant": variant[0], "seq": seq, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    model.zero_grad(set_to_none=True)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                row["scenario"] = scenario
                per_step = data[seq, scenario][0]
                row["examples_per_step"] = len(per_step)
                lens = [len(e["input_ids"]) for s in data[seq, scenario] for e in s]
                row["mean_example_len"] = float(np.mean(lens))
                info["runs"].append(row)
                save(info)
                if "error" in row:
                    log(f"[{shape}] {variant[0]:14s} seq {seq:5d} {scenario:8s} {row['error']}")
                else:
                    log(f"[{shape}] {variant[0]:14s} seq {seq:5d} {scenario:8s} {row['tokens_per_s']:9.0f} tok/s "
                        f"peak {row['peak_bytes'] / 2**30:6.2f} GiB  MFU {row['mfu'] or 0:.3f}  "
                        f"step0 loss {row['step0_loss']:.4f}")
    for name in [v for v in args.profile_variants.split(",") if v]:
        variant = next(v for v in VARIANTS if v[0] == name)
        if variant[2] == "fast":
            set_checkpointing_policy(model, variant[5])
        scenario = args.scenarios.split(",")[0]
        try:
            prof = profile_variant(model, variant, data[args.ablation_seq, scenario], args.ablation_seq, pad_id)
        except Exception as exc:
            prof = {"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        prof["scenario"] = scenario
        info.setdefault("profiles", []).append(prof)
        save(info)
        log(f"[{shape}] profile {name} seq {args.ablation_seq} {scenario}: wall {prof.get('wall_ms_per_step', 0):.1f} ms/step,"
            f" GPU kernels {prof.get('gpu_kernel_ms_per_step', 0):.1f} ms/step {prof.get('error', '')}")
    del model, causal_lm, lm_head
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return info


def environment(device: torch.device) -> dict:
    """Versions and device of this run."""
    import peft
    import transformers

    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU {platform.processor()}"}
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write train_throughput.json under --out, print a summary."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="llama-1b")
    parser.add_argument("--cache", default="/tmp/fedtune-models")
    parser.add_argument("--seqs", default="512,1024,2048")
    parser.add_argument("--ablation-seq", type=int, default=1024)
    parser.add_argument("--scenarios", default="variable,full")
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    parser.add_argument("--sweep-variants", default="baseline,+autocast,+packing,+no-ckpt",
                        help="variants measured at every seq; the rest only at --ablation-seq")
    parser.add_argument("--profile-variants", default="", help="after the runs, profile these (fast variants only, "
                        "at --ablation-seq and the first scenario); run them last, the model is converted by then")
    parser.add_argument("--tokens-per-step", type=int, default=16384, help="padded slots per step: examples = this // seq")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="diagnostic: SDPA without the cuDNN backend for the baseline variants too")
    parser.add_argument("--cudnn-attention", action="store_true",
                        help="diagnostic: our variants with cuDNN SDPA on (the trainer's default is off)")
    args = parser.parse_args(argv)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    result = {"env": environment(device), "args": vars(args)}
    result["matmul_peak_tflops"] = matmul_peak_tflops(device) if device.type == "cuda" else None
    log(f"{result['env']}  bf16 matmul peak {result['matmul_peak_tflops']} TFLOP/s")
    result["shapes"] = []

    def save(info: dict) -> None:
        if not result["shapes"] or result["shapes"][-1] is not info:
            result["shapes"].append(info)
        (out / "train_throughput.json").write_text(json.dumps(result, indent=1))
        (out / "train_throughput.log").write_text("\n".join(lines))

    for shape in args.shapes.split(","):
        save(bench_shape(args, shape, device, result["matmul_peak_tflops"], log, save))
    return 0


if __name__ == "__main__":
    sys.exit(main())
