"""Run a whole federation on one machine with Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from federation.config import RunConfig
from federation.validation import ConfigError

log = logging.getLogger("fedtune.simulate")


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray resources per virtual client; each Ray actor process keeps its base model resident."""
    return {
        "client_resources": {"num_cpus": cfg.federation.client_num_cpus, "num_gpus": cfg.federation.client_num_gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "logging_level": "error"},
    }


ENGINES = ("ray", "inprocess")


def check_engine(cfg: RunConfig, engine: str) -> None:
    """ConfigError unless `engine` is known and can run cfg (the rest of cfg was validated when it was composed)."""
    if engine not in ENGINES:
        raise ConfigError("engine", f"engine {engine!r} unknown; valid: {', '.join(ENGINES)}")
    if cfg.federation.clients_per_batch > 1 and engine != "inprocess":
        raise ConfigError("federation.clients_per_batch", "federation.clients_per_batch > 1 trains virtual clients "
                          "together in one process: run it with --engine inprocess (Flower's Ray engine runs every "
                          "virtual client on its own)")


def simulate(cfg: RunConfig, engine: str = "ray") -> list[dict[str, Any]]:
    """Run cfg as a local simulation; returns the rows of the run's metrics.jsonl.

    engine="ray": Flower's simulation engine (virtual SuperNodes in Ray actors).
    engine="inprocess": the same ServerApp loop and ClientApp, sites run one after another in this
    process (no Ray: for machines without it, debugging and benchmarks), or federation.clients_per_batch
    of them together (multi-adapter batched training, client/multi_adapter.py).
    """
    check_engine(cfg, engine)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from client.app import app as client_app

    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if engine == "inprocess":
        from server.app import run_federation
        from simulations.inprocess import InProcessGrid

        run_federation(InProcessGrid(client_app, cfg.federation.num_clients), cfg)
    else:
        from flwr.simulation import run_simulation

        from server.app import make_server_app

        # Flower 1.41 re-raises the ServerApp's exception here once the engine has stopped
        # (flwr/simulation/run_simulation.py _main_loop), so a FederationFailed reaches the caller as it does in-process.
        run_simulation(
            server_app=make_server_app(cfg),
            client_app=client_app,
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend_config(cfg),
        )
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise RuntimeError(f"simulation finished without writing {metrics}; see the log above")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if len(rows) - (1 if rows and rows[0]["round"] == 0 else 0) < cfg.federation.rounds:
        raise RuntimeError(f"simulation stopped early: {len(rows)} rows in {metrics}")
    return rows
