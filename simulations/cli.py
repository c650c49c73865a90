"""`fedtune` command line: simulate on one machine, deploy (keys, coordinator, site, launch), or benchmark.

Exit codes: 0 success; 1 the run failed (e.g. federation.max_failed_rounds rounds in a row aggregated nothing:
one summary paragraph names the first cause); 2 a configuration or data mistake, found before any work started
(one line, `config error: ...`; `--debug` adds the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

EXIT_RUN_FAILED = 1
EXIT_CONFIG_ERROR = 2


# Library noise kept out of `fedtune eval`'s console: transformers' weight-loading/saving progress bars and its
# FutureWarnings about its own deprecated names (peft calls `is_gradient_checkpointing`). Set only where the user
# has not set these variables. (`fedtune simulate` keeps such output in the run's log file instead:
# federation/run_log.py.)
QUIET_ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1",
                     "PYTHONWARNINGS": "ignore::FutureWarning:transformers.modeling_utils"}


def quiet_libraries() -> None:
    """Apply QUIET_ENVIRONMENT to this process and the processes it starts."""
    import warnings

    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers.modeling_utils")
    # Flower's state database runs alembic migrations, which log every plugin at INFO.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Ray's note on how a future version will treat num_gpus=0 (nothing to act on here).
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray._private.worker")


def _simulate(overrides: list[str], engine: str = "ray") -> int:
    from federation.compose import compose_config
    from federation.run_log import LOG_FILE_NAME, library_output_to
    from federation.validation import validate_coordinator_setup, validate_simulation_data
    from simulations.simulate import check_engine, simulate

    cfg = compose_config(overrides)
    validate_simulation_data(cfg)
    validate_coordinator_setup(cfg)
    check_engine(cfg, engine)  # before the run directory (and its log file) exists
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    # The console shows progress, the round lines and the table; library warnings, Flower's INFO lines and the
    # Ray actors' output go to the run's log file (federation/run_log.py).
    with library_output_to(Path(cfg.output_dir) / LOG_FILE_NAME) as log_path:
        logging.getLogger("fedtune.simulate").info("library output of this run: %s", log_path)
        simulate(cfg, engine=engine)
    return 0


def _add_debug_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true", help="print the traceback of a config error or failed run")
    return parser


def _run(args: argparse.Namespace) -> int:
    from client.daemon import site_main
    from server.coordinator import coordinator_main, launch_main

    if args.command == "simulate":
        return _simulate(args.overrides, args.engine)
    if args.command == "coordinator":
        return coordinator_main(args)
    if args.command == "site":
        return site_main(args)
    if args.command == "launch":
        return launch_main(args)
    if args.command == "eval":
        from simulations.evaluate import eval_main

        quiet_libraries()
        return eval_main(args)
    return EXIT_CONFIG_ERROR


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedtune` console script."""
    from client.daemon import add_site_arguments
    from server.coordinator import add_coordinator_arguments, add_launch_arguments

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
    sim = _add_debug_argument(sub.add_parser(
        "simulate", help="run a federation on this machine (hydra overrides: key=value ...)"))
    sim.add_argument("--engine", choices=["ray", "inprocess"], default="ray",
                     help="ray: Flower's simulation engine; inprocess: same apps, sites one after another, no Ray")
    sim.add_argument("overrides", nargs="*", help="e.g. federation.num_clients=8 federation.rounds=3 strategy=fedavg")
    sub.add_parser("keys", help="CA, coordinator TLS certificate and per-site keys (see `fedtune keys --help`)")
    sub.add_parser("bench", help="the benchmark suite: tables + JSON (see `fedtune bench --help`)")
    add_coordinator_arguments(_add_debug_argument(sub.add_parser(
        "coordinator", help="run the coordinator (Flower SuperLink, TLS + site authentication) in the foreground")))
    add_site_arguments(_add_debug_argument(sub.add_parser(
        "site", help="run a partner site (Flower SuperNode + fedtune ClientApp)")))
    add_launch_arguments(_add_debug_argument(sub.add_parser(
        "launch", help="start a federation run on a running coordinator")))
    from simulations.evaluate import add_eval_arguments

    add_eval_arguments(_add_debug_argument(sub.add_parser(
        "eval", help="score a saved PEFT adapter (or --base-only) on a JSONL file: loss, perplexity, exact match, "
                     "token F1, ROUGE-L")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Flower's logger has its own console handler; propagating too would print every line twice.
    logging.getLogger("flwr").propagate = False
    return run_reporting_errors(lambda: _run(args), debug=args.debug)


def run_reporting_errors(run, debug: bool = False) -> int:
    """run() -> its exit code; a ConfigError is one stderr line and exit 2, a failed federation its summary and 1."""
    from federation.validation import ConfigError

    try:
        return run()
    except ConfigError as exc:
        if debug:
            traceback.print_exc()
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Exception as exc:
        # Only a run that got under way can fail this way, and then server.app is loaded: no import here
        # (its heavy imports would only add noise to other errors).
        federation_failed = getattr(sys.modules.get("server.app"), "FederationFailed", None)
        if federation_failed is None or not isinstance(exc, federation_failed):
            raise
        if debug:
            traceback.print_exc()
        print(f"federation failed: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())
