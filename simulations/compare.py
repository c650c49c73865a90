"""Run every strategy on the same non-IID demo federation (same seed, same partitions) and compare.

    python -m simulations.compare --out runs/compare [hydra overrides ...]

Writes compare.json, compare.md (a table: union eval loss per round per strategy) and compare.png.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import time
from pathlib import Path

DEFAULT_STRATEGIES = ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "ffa_lora", "median",
                      "trimmed_mean", "multi_krum", "norm_bound", "scaffold", "fedsa_lora", "flora", "flexlora",
                      "fedex_lora"]


def run_all(strategies: list[str], out: Path, overrides: list[str]) -> dict[str, list[float]]:
    """Union eval loss per round for each strategy (in-process engine: identical data order per strategy)."""
    from client.app import app as client_app
    from federation.compose import compose_config
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    losses: dict[str, list[float]] = {}
    for name in strategies:
        cfg = compose_config([f"strategy={name}", f"output_dir={out / name}", *overrides])
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            rows = run_federation(InProcessGrid(client_app, cfg.federation.num_clients), cfg)
        losses[name] = [r["eval_loss"] for r in rows]
        print(f"{name:>14}: {' '.join(f'{x:.4f}' for x in losses[name])}  ({time.perf_counter() - start:.1f}s)",
              flush=True)
    return losses


def write_outputs(losses: dict[str, list[float]], out: Path, header: str) -> None:
    """compare.json, compare.md and compare.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = max(len(v) for v in losses.values())
    lines = [header, "", "| strategy | " + " | ".join(f"round {r}" for r in range(rounds)) + " |",
             "|---|" + "---:|" * rounds]
    best = min(v[-1] for v in losses.values())
    for name, values in sorted(losses.items(), key=lambda kv: kv[1][-1]):
        cells = [f"{x:.4f}" for x in values]
        if values[-1] == best:
            cells[-1] = f"**{cells[-1]}**"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps({"header": header, "union_eval_loss": losses}, indent=1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in losses.items():
        ax.plot(range(len(values)), values, marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("union eval loss (nats/token)")
    ax.set_title("strategies on the non-IID demo federation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    header = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} CPU ({torch.get_num_threads()} threads), "
              f"torch {torch.__version__}; overrides: {' '.join(args.overrides) or '(defaults)'}")
    losses = run_all(args.strategies, out, args.overrides)
    write_outputs(losses, out, header)
    print((out / "compare.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
