"""Generation throughput of a site's evaluate round: greedy answers (KV cache, left-padded batches) per second.

    python -m simulations.bench.eval_throughput --model llama-1b-random --batch-sizes 8,32,64 --prompts 128
    python -m simulations.bench.eval_throughput --model tiny            # CPU smoke run

The model is loaded as a site loads it (federation/model.py build_lora_model: QLoRA 4-bit on CUDA, fp32 LoRA on
CPU) with a non-zero LoRA adapter, and answers the demo task's held-out prompts through federation/evaluation.py,
the code of the ClientApp's evaluate handler. A random-init model seldom emits eos, so nearly every answer runs to
--max-new-tokens: the figure is generated tokens per second at that length.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def measure(overrides: list[str], batch_sizes: list[int], num_prompts: int, max_new_tokens: int,
            repeats: int) -> list[dict]:
    """One row per batch size: prompts, generated tokens, best-of-`repeats` seconds and tokens per second."""
    from federation.compose import compose_config
    from federation.data import load_union_eval
    from federation.evaluation import generate_answers, prompt_and_reference
    from federation.model import build_lora_model

    cfg = compose_config(overrides)
    model, tokenizer, info = build_lora_model(cfg.model, cfg.lora)
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter (B = 0) is the base model; a trained one is not
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    union = load_union_eval(cfg.data, tokenizer, cfg.federation.num_clients)
    prompts = [prompt_and_reference(union[i % len(union)], tokenizer)[0] for i in range(num_prompts)]
    device = next(model.parameters()).device
    rows = []
    for batch_size in batch_sizes:
        generate_answers(model, tokenizer, prompts[:batch_size], max_new_tokens, batch_size)  # warm-up
        best, generated = float("inf"), 0
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            _, generated = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        rows.append({"batch_size": batch_size, "prompts": num_prompts, "max_new_tokens": max_new_tokens,
                     "generated_tokens": generated, "seconds": best, "tokens_per_second": generated / best,
                     "model": info.source, "path": info.path, "device": str(device)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print generated tokens/s per site for each batch size (and write JSON with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="conf/model option (tiny, llama-1b-random, hub)")
    parser.add_argument("--batch-sizes", default="8,32", help="comma-separated eval.batch_size values")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per measurement (demo held-out, cycled)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="write the rows to this JSON file")
    parser.add_argument("overrides", nargs="*", help="more hydra overrides, e.g. model.device=cuda:0")
    args = parser.parse_args(argv)
    rows = measure([f"model={args.model}", *args.overrides], [int(b) for b in args.batch_sizes.split(",")],
                   args.prompts, args.max_new_tokens, args.repeats)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"eval generation throughput, model={args.model} ({rows[0]['path']}, {gpu}, torch {torch.__version__})")
    print(f"{'batch':>6} {'prompts':>8} {'new tokens':>11} {'seconds':>8} {'tokens/s':>10}")
    for row in rows:
        print(f"{row['batch_size']:>6} {row['prompts']:>8} {row['generated_tokens']:>11} {row['seconds']:>8.2f} "
              f"{row['tokens_per_second']:>10.0f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"gpu": gpu, "torch": torch.__version__, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
