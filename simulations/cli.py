"""`fedtune` command line: simulate on one machine, deploy (keys, coordinator, site, launch), or benchmark."""

from __future__ import annotations

import argparse
import logging
import sys


def _simulate(overrides: list[str], engine: str = "ray") -> int:
    from federation.config import compose_config
    from simulations.simulate import simulate

    cfg = compose_config(overrides)
    simulate(cfg, engine=engine)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedtune` console script."""
    from client.daemon import add_site_arguments, site_main
    from server.coordinator import add_coordinator_arguments, add_launch_arguments, coordinator_main, launch_main

    argv = list(sys.argv[1:] if argv is None else argv)
    # `fedtune keys` is federation.pki's own CLI; hand its arguments over untouched.
    if argv[:1] == ["keys"]:
        from federation.pki import main as keys_main

        return keys_main(argv[1:])
    if argv[:1] == ["bench"]:  # likewise the benchmark suite (simulations/bench/suite.py)
        from simulations.bench.suite import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated QLoRA fine-tuning with Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federation on this machine (hydra overrides: key=value ...)")
    sim.add_argument("--engine", choices=["ray", "inprocess"], default="ray",
                     help="ray: Flower's simulation engine; inprocess: same apps, sites one after another, no Ray")
    sim.add_argument("overrides", nargs="*", help="e.g. federation.num_clients=8 federation.rounds=3 strategy=fedavg")
    sub.add_parser("keys", help="CA, coordinator TLS certificate and per-site keys (see `fedtune keys --help`)")
    sub.add_parser("bench", help="the benchmark suite: tables + JSON (see `fedtune bench --help`)")
    add_coordinator_arguments(sub.add_parser(
        "coordinator", help="run the coordinator (Flower SuperLink, TLS + site authentication) in the foreground"))
    add_site_arguments(sub.add_parser("site", help="run a partner site (Flower SuperNode + fedtune ClientApp)"))
    add_launch_arguments(sub.add_parser("launch", help="start a federation run on a running coordinator"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Flower's logger has its own console handler; propagating too would print every line twice.
    logging.getLogger("flwr").propagate = False
    if args.command == "simulate":
        return _simulate(args.overrides, args.engine)
    if args.command == "coordinator":
        return coordinator_main(args)
    if args.command == "site":
        return site_main(args)
    if args.command == "launch":
        return launch_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
