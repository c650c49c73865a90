"""Coordinator aggregation of N site updates on CPU: all in memory + weighted_mean vs streaming.

    python -m simulations.bench.aggregation --sites 100 --out /tmp/aggregation.json

The adapter is Llama-2-7B with LoRA r=16 on every linear layer (40.0M params, 160 MB in float32).
Each site's update arrives as a Flower ArrayRecord (one .npy-serialised Array per tensor, fresh
bytes per site, as the transport hands it over) in fp32 or bf16 (federation.compression).

naive:      all N updates decoded and held, then strategies.fedavg.weighted_mean (float64).
streaming:  each arriving update is decoded and added to server.streaming.StreamingWeightedMean,
            then dropped. "per-tensor" decodes one tensor at a time while adding it (bf16: handed over as
            a zero-copy torch bfloat16 view, converted inside the sum); "whole" decodes the full update
            first (what LoraDeltaStrategy does today).

Memory is reported in adapters' worth (1 = the float32 adapter) two ways: the tracemalloc peak of
numpy buffers and bytes objects allocated while aggregating, and the Linux RSS high-water mark
(VmHWM, reset before each case) above the RSS at its start; both include the one message in flight.
Seconds count decoding and aggregation only, not building the simulated messages.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from federation.compression import decode_upload, encode_upload
from simulations.bench import available_ram_bytes, machine_info, measure, write_result
from strategies.fedavg import weighted_mean
from server.streaming import StreamingWeightedMean

# Llama-2-7B: not a preset in federation.model (its presets are Llama 3.x shapes).
LLAMA2_7B_SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0)
LLAMA2_7B = "llama2-7b"
# Head room kept free when deciding how many updates the naive case may hold in RAM.
NAIVE_RAM_MARGIN_BYTES = 2 * 2**30


def adapter_shapes(preset: str, rank: int) -> dict[str, tuple[int, ...]]:
    """PEFT key -> shape of an all-linear LoRA adapter of rank `rank` on the `preset` model shape."""
    from federation.config import LoraSettings, ModelConfig
    from federation.model import PRESET_SHAPES, lora_shapes

    # Registered for this process only, so lora_shapes can build the 7B shape on the meta device.
    PRESET_SHAPES.setdefault(LLAMA2_7B, LLAMA2_7B_SHAPE)
    return lora_shapes(ModelConfig(preset_name=preset), LoraSettings(r=rank))


def site_pool(shapes: Mapping[str, tuple[int, ...]], pool: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`pool` distinct float32 updates (scaled normals, as a LoRA delta's magnitude); site i sends pool[i % pool]."""
    rng = np.random.default_rng(seed)
    base = {k: (1e-3 * rng.standard_normal(s)).astype(np.float32) for k, s in sorted(shapes.items())}
    return [{k: v * np.float32(1.0 + 0.25 * j) + np.float32(1e-4 * j) for k, v in base.items()} for j in range(pool)]


def to_message(encoded: Mapping[str, np.ndarray]):
    """Encoded arrays -> a Flower ArrayRecord (what a site's reply carries)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in encoded.items()})


def arrive(message):
    """A fresh copy of `message`'s bytes, tensor by tensor: the reply as the transport delivers it."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=bytes(memoryview(a.data)))
                        for k, a in message.items()})


NPY_MAGIC = b"\x93NUMPY"


def array_view(array) -> np.ndarray:
    """Read-only numpy view of a Flower Array's bytes (no copy; Array.numpy() re-parses and copies via np.load)."""
    dtype = np.dtype(array.dtype)
    count = math.prod(array.shape)
    offset = len(array.data) - count * dtype.itemsize
    header = array.data[:offset]
    # Array(ndarray) writes the .npy format; its header holds dtype/shape we already have, so only check it.
    if array.stype != "numpy.ndarray" or not header.startswith(NPY_MAGIC) or b"'fortran_order': False" not in header:
        return array.numpy()
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=offset).reshape(array.shape)


def bf16_tensor_view(array) -> torch.Tensor:
    """Zero-copy torch bfloat16 view of a `key::bf16` Flower Array (uint16 bit patterns); StreamingWeightedMean
    converts it to float32 inside its vectorised add, so the upload is never decoded into a separate buffer."""
    with warnings.catch_warnings():  # the message bytes are read-only; the sum only reads them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array_view(array).view(np.int16)).view(torch.bfloat16)


def per_tensor_view(message, keys: list[str]) -> dict:
    """{adapter key: zero-copy view} of an arrived message whose parts are fp32 `key` or `key::bf16`."""
    return {key: bf16_tensor_view(message[f"{key}::bf16"]) if f"{key}::bf16" in message else array_view(message[key])
            for key in keys}


def run_naive(pool_messages, weights, keys) -> tuple[dict, dict]:
    """Hold every decoded update, then weighted_mean; returns (result arrays, measurement)."""
    with measure() as m:
        updates = [decode_upload({k: array_view(v) for k, v in arrive(pool_messages[i % len(pool_messages)]).items()})
                   for i in range(len(weights))]
        start = time.perf_counter()
        result = weighted_mean(updates, weights)
        m["aggregate_seconds"] = time.perf_counter() - start
        del updates
    return result, m


def run_streaming(pool_messages, weights, keys, accumulator: str, per_tensor: bool) -> tuple[dict, dict]:
    """Updates arrive one by one and are added to StreamingWeightedMean; returns (result arrays, measurement)."""
    busy = 0.0
    with measure() as m:
        mean = StreamingWeightedMean(accumulator)
        for i, weight in enumerate(weights):
            message = arrive(pool_messages[i % len(pool_messages)])
            start = time.perf_counter()
            update = per_tensor_view(message, keys) if per_tensor else \
                decode_upload({k: array_view(v) for k, v in message.items()})
            mean.add(update, weight)
            busy += time.perf_counter() - start
            del message, update
        start = time.perf_counter()
        result = mean.result()
        busy += time.perf_counter() - start
        m["aggregate_seconds"] = busy
    return result, m


def main(argv: list[str] | None = None) -> int:
    """Run every case, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--naive-sites", type=int, default=0,
                        help="sites for the naive case (0: --sites, reduced to what fits in free RAM)")
    parser.add_argument("--preset", default=LLAMA2_7B)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pool", type=int, default=4, help="distinct updates; site i sends update i %% pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    shapes = adapter_shapes(args.preset, args.rank)
    keys = sorted(shapes)
    params = int(sum(np.prod(s) for s in shapes.values()))
    adapter_bytes = 4 * params
    rng = np.random.default_rng(args.seed)
    weights = rng.integers(50, 500, args.sites).astype(float).tolist()  # example counts
    pool = site_pool(shapes, args.pool, args.seed)
    messages = {codec: [to_message(encode_upload(u, codec)) for u in pool] for codec in ("fp32", "bf16")}
    del pool

    naive_sites = args.naive_sites or args.sites
    fits = max(1, int((available_ram_bytes() - NAIVE_RAM_MARGIN_BYTES) / (1.1 * adapter_bytes)) - 3)
    if naive_sites > fits and not args.naive_sites:
        print(f"naive case: {naive_sites} updates ({naive_sites * adapter_bytes / 2**30:.1f} GiB) do not fit in free "
              f"RAM; measuring {fits} (its memory grows linearly with the number of sites)")
        naive_sites = fits

    cases = [("naive", "fp32", "float64", False, naive_sites)]
    for codec in ("fp32", "bf16"):
        for accumulator in ("float64", "float32", "kahan32"):
            cases.append(("streaming", codec, accumulator, True, args.sites))
    cases.append(("streaming-whole", "bf16", "float32", False, args.sites))

    print(f"{args.preset} LoRA r={args.rank}: {len(keys)} tensors, {params / 1e6:.1f}M params, "
          f"{adapter_bytes / 1e6:.0f} MB per float32 adapter; {args.sites} sites")
    reference = None
    rows = []
    for name, codec, accumulator, per_tensor, n in cases:
        if name == "naive":
            result, m = run_naive(messages[codec], weights[:n], keys)
            reference = result if n == args.sites else None
        else:
            result, m = run_streaming(messages[codec], weights[:n], keys, accumulator, per_tensor)
            if reference is None and codec == "fp32" and accumulator == "float64":
                reference = result  # the naive case held fewer sites: exact streaming is the reference
        err = None if reference is None or reference is result else float(max(np.max(np.abs(result[k] - reference[k])) for k in keys))
        ref_scale = None if reference is None else float(max(np.max(np.abs(reference[k])) for k in keys))
        row = {"case": name, "upload": codec, "accumulator": accumulator, "sites": n,
               "aggregate_seconds": m["aggregate_seconds"], "wall_seconds": m["seconds"],
               "traced_peak_adapters": m["traced_peak_bytes"] / adapter_bytes,
               "rss_peak_adapters": None if m["rss_peak_bytes"] is None else m["rss_peak_bytes"] / adapter_bytes,
               "max_abs_error_vs_reference": err, "reference_max_abs": ref_scale}
        rows.append(row)
        print(f"{name:16s} upload={codec:4s} acc={accumulator:7s} sites={n:3d}  "
              f"aggregate {row['aggregate_seconds']:6.2f}s  peak traced {row['traced_peak_adapters']:6.2f}  "
              f"RSS {row['rss_peak_adapters'] if row['rss_peak_adapters'] is None else round(row['rss_peak_adapters'], 2)}"
              f" adapters" + ("" if err is None else f"  max|err| {err:.2e}"), flush=True)
        del result

    from rich.console import Console
    from rich.table import Table

    machine = machine_info()
    table = Table(title=f"Aggregating {args.sites} x {args.preset} r={args.rank} LoRA updates "
                        f"({adapter_bytes / 1e6:.0f} MB each) on {machine['cpu_model']}, "
                        f"{machine['usable_cores']} cores, {machine['ram_total_gib']} GiB, numpy {machine['numpy']}")
    for col in ("case", "upload", "accumulator", "sites", "seconds", "peak RAM (tracemalloc)", "peak RSS",
                "max |err| vs float64 ref"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["case"], r["upload"], r["accumulator"], str(r["sites"]), f"{r['aggregate_seconds']:.2f}",
                      f"{r['traced_peak_adapters']:.2f} adapters",
                      "-" if r["rss_peak_adapters"] is None else f"{r['rss_peak_adapters']:.2f} adapters",
                      "-" if r["max_abs_error_vs_reference"] is None else f"{r['max_abs_error_vs_reference']:.1e}")
    Console(width=200).print(table)
    summary = {"benchmark": "aggregation", "preset": args.preset, "shape": LLAMA2_7B_SHAPE
               if args.preset == LLAMA2_7B else args.preset, "rank": args.rank, "tensors": len(keys),
               "adapter_params": params, "adapter_bytes_fp32": adapter_bytes, "sites": args.sites,
               "machine": machine, "rows": rows}
    write_result(args.out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
