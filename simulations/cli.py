"""`fedtune` command line: simulate (more subcommands join as the product grows)."""

from __future__ import annotations

import argparse
import logging
import sys


def _simulate(overrides: list[str]) -> int:
    from federation.config import compose_config
    from simulations.simulate import simulate

    cfg = compose_config(overrides)
    simulate(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedtune` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated QLoRA fine-tuning with Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federation on this machine (hydra overrides: key=value ...)")
    sim.add_argument("overrides", nargs="*", help="e.g. federation.num_clients=8 federation.rounds=3 strategy=fedavg")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "simulate":
        return _simulate(args.overrides)
    return 2


if __name__ == "__main__":
    sys.exit(main())
