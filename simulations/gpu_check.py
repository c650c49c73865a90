"""GPU check of the real QLoRA path: a federation of N sites, driven in-process (no Ray needed).

    python -m simulations.gpu_check --out /tmp/gpucheck model=llama-1b-random federation.rounds=2

Prints per site and round: tokens/s, peak GPU memory, bytes uploaded vs the adapter's parameter
count; writes gpu_check.json next to the run's metrics.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

DEFAULT_OVERRIDES = [
    "model=llama-1b-random", "model.quantization=4bit", "federation.num_clients=2", "federation.rounds=2",
    "train.local_steps=10", "train.batch_size=16", "train.eval_batch_size=32",
]


def main(argv: list[str] | None = None) -> int:
    """Run the check and print its table."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from client.app import app as client_app
    from client.task import get_runtime
    from federation.compose import compose_config
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out)
    cfg = compose_config([*DEFAULT_OVERRIDES, f"output_dir={out / 'run'}", f"model.cache_dir={out / 'models'}",
                          *args.overrides])
    rows = run_federation(InProcessGrid(client_app, cfg.federation.num_clients), cfg)
    info = get_runtime(cfg).info
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor()})"
    table = Table(title=f"QLoRA GPU check on {gpu}: {cfg.model.preset_name}, path={info.path}, LoRA r={cfg.lora.r}")
    for col in ("round", "site", "examples", "steps", "tokens/s", "peak GPU GB", "bytes up", "adapter params",
                "bytes/param"):
        table.add_column(col, justify="right")
    records = []
    for row in rows[1:]:
        for node, site in sorted(row["per_site"].items()):
            bpp = site["bytes_up"] / row["adapter_params"]
            table.add_row(str(row["round"]), node, str(int(site["num-examples"])), str(int(site["train-steps"])),
                          f"{site['tokens-per-second']:.0f}", f"{site['peak-memory-bytes'] / 2**30:.2f}",
                          f"{site['bytes_up']:,}", f"{row['adapter_params']:,}", f"{bpp:.3f}")
            records.append({"round": row["round"], "node": node, **site, "adapter_params": row["adapter_params"]})
    Console().print(table)
    summary = {
        "gpu": gpu, "torch": torch.__version__, "model": cfg.model.preset_name, "load_path": info.path,
        "trainable_params": info.trainable_params, "total_params": info.total_params,
        "eval_loss_per_round": [r["eval_loss"] for r in rows], "sites": records,
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "sites"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
