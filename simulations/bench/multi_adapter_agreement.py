"""Does multi-adapter batched training give each client its solo adapter? Measured against bf16's own noise floor.

    python -m simulations.bench.multi_adapter_agreement --out /tmp/agree --seq 512 model.preset_name=llama-3b \\
        lora.r=32 'lora.target_modules=[q_proj,v_proj]' train.batch_size=2 train.local_steps=4

On a GPU the solo fast path itself computes in bf16, so no two computations with a different batch layout agree
exactly. The reference for "equal within bf16 tolerance" is therefore measured, not assumed: each client is also
trained solo a second time with another packing width (pack_len = 2 x seq: its examples share rows, other
kernel shapes, the same mathematics). Reported, per client, relative L2 errors of:
  gradient  first-step LoRA gradient (adapter with B perturbed, so every factor has a gradient):
            batched vs solo, and solo(other packing) vs solo
  adapter   delta after the round's local steps from the real (B = 0) start: batched vs solo, and the same floor
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _rel(a: dict, b: dict) -> float:
    num = sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2)) for k in b)
    den = sum(float(np.sum(np.asarray(b[k], np.float64) ** 2)) for k in b)
    return (num / max(den, 1e-300)) ** 0.5


def _solo_gradient(trainer, model, start, examples) -> dict:
    from federation.adapter import lora_parameters, set_adapter_arrays

    set_adapter_arrays(model, start)
    model.zero_grad(set_to_none=True)
    summed, tokens = trainer._batch_loss_sum(trainer._collate(examples))
    (summed / tokens).backward()
    return {k: p.grad.float().cpu().numpy() for k, p in lora_parameters(model).items() if p.grad is not None}


def _batched_gradients(multi, model, start, batches, device) -> list[dict]:
    from client.multi_adapter import StackedLoRA, combine_batches

    model.zero_grad(set_to_none=True)
    with StackedLoRA(model, start, len(batches), fused_base=multi.fused_base) as stacked:
        combined = combine_batches(batches, multi.solo.pad_token_id)
        stacked.row_adapter = combined["row_adapter"].to(device)
        sums, tokens = multi._adapter_loss_sums(combined, len(batches), device)
        (sums / tokens).sum().backward()
        out = [{} for _ in batches]
        for layer in stacked.layers:
            for k in range(len(batches)):
                if layer.lora_a.grad is not None:
                    out[k][layer.key_a] = layer.lora_a.grad[k].float().cpu().numpy()
                out[k][layer.key_b] = layer.lora_b.grad[k].float().cpu().numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure gradient and adapter agreement for K clients; write agreement.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--cache", default="/tmp/fedtune-models")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from client.task import site_datasets, get_runtime, configure_trainable
    from client.fast_train import FastLocalTrainer, FastPathSettings
    from client.multi_adapter import MultiAdapterTrainer
    from federation.adapter import adapter_delta, get_adapter_arrays, set_adapter_arrays
    from federation.compose import compose_config
    from federation.model import initial_adapter
    from simulations.bench.sim_round import write_char_pool

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = write_char_pool(out / "pool.jsonl", 1024, args.seq)
    cfg = compose_config(["model=llama-1b-random", "model.quantization=4bit", "data=jsonl", f"data.source={pool}",
                          f"data.max_seq_len={args.seq}", "data.partitioner=iid", "data.eval_fraction=0.02",
                          "train.fast_path=true", f"federation.num_clients={args.clients}",
                          f"model.cache_dir={args.cache}", f"output_dir={out / 'run'}", *args.overrides])
    runtime = get_runtime(cfg)
    model, pad = runtime.model, runtime.tokenizer.pad_token_id
    configure_trainable(model, cfg)
    device = next(model.parameters()).device

    from flwr.app import Context, RecordDict

    contexts = [Context(run_id=1, node_id=k + 1, node_config={"partition-id": k, "num-partitions": args.clients},
                        state=RecordDict(), run_config={}) for k in range(args.clients)]
    datasets = [site_datasets(runtime, cfg, ctx)[0] for ctx in contexts]
    switches = {"checkpoint_every": cfg.train.checkpoint_every, "kernels": str(cfg.train.kernels).lower(),
                "attention": str(cfg.train.attention).lower()}
    solo = FastLocalTrainer(model, pad, cfg.train, FastPathSettings(**switches))
    other = FastLocalTrainer(model, pad, cfg.train, FastPathSettings(pack_len=2 * args.seq, **switches))
    multi = MultiAdapterTrainer(solo)

    start = initial_adapter(cfg.model, cfg.lora)
    rng = np.random.default_rng(0)
    perturbed = {k: (v + (rng.normal(0, 0.01, v.shape) if ".lora_B." in k else 0)).astype(np.float32)
                 for k, v in start.items()}
    batches_examples = [[ds[i] for i in range(cfg.train.batch_size)] for ds in datasets]
    solo_grads = [_solo_gradient(solo, model, perturbed, ex) for ex in batches_examples]
    other_grads = [_solo_gradient(other, model, perturbed, ex) for ex in batches_examples]
    set_adapter_arrays(model, perturbed)
    batched_grads = _batched_gradients(multi, model, perturbed, [solo._collate(ex) for ex in batches_examples], device)

    seeds = [100 + k for k in range(args.clients)]
    solo_deltas, other_deltas = [], []
    for ds, seed in zip(datasets, seeds):
        for trainer, sink in ((solo, solo_deltas), (other, other_deltas)):
            set_adapter_arrays(model, start)
            trainer.train(ds, seed=seed)
            sink.append(adapter_delta(get_adapter_arrays(model), start))
    set_adapter_arrays(model, start)
    began = time.perf_counter()
    batched = multi.train(datasets, seeds, start)
    batched_deltas = [adapter_delta(arrays, start) for _, arrays in batched]

    rows = [{"client": k,
             "gradient_batched_vs_solo": _rel(batched_grads[k], solo_grads[k]),
             "gradient_solo_other_packing_vs_solo": _rel(other_grads[k], solo_grads[k]),
             "delta_batched_vs_solo": _rel(batched_deltas[k], solo_deltas[k]),
             "delta_solo_other_packing_vs_solo": _rel(other_deltas[k], solo_deltas[k])} for k in range(args.clients)]
    for row in rows:
        print("client {client}: gradient rel err batched {gradient_batched_vs_solo:.2e} (bf16 floor "
              "{gradient_solo_other_packing_vs_solo:.2e}); adapter delta rel err batched {delta_batched_vs_solo:.2e} "
              "(floor {delta_solo_other_packing_vs_solo:.2e})".format(**row), flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    (out / "agreement.json").write_text(json.dumps({"gpu": gpu, "rows": rows, "overrides": args.overrides,
                                                    "batched_train_seconds": time.perf_counter() - began}, indent=1))
    (out / "pool.jsonl").unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
