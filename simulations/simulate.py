"""Run a whole federation on one machine with Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federation.config import RunConfig
from federation.validation import ConfigError

if TYPE_CHECKING:
    from flwr.serverapp import Grid

log = logging.getLogger("fedtune.simulate")


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray resources per virtual client; each Ray actor process keeps its base model resident."""
    return {
        "client_resources": {"num_cpus": cfg.federation.client_num_cpus, "num_gpus": cfg.federation.client_num_gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "logging_level": "error"},
    }


ENGINES = ("ray", "inprocess")


def check_engine(cfg: RunConfig, engine: str) -> None:
    """ConfigError unless `engine` is known (the rest of cfg was validated when it was composed)."""
    if engine not in ENGINES:
        raise ConfigError("engine", f"engine {engine!r} unknown; valid: {', '.join(ENGINES)}")


def ray_actor_count(cfg: RunConfig) -> int:
    """How many actors Flower's RayBackend starts on this machine for cfg's client resources.

    As flwr.simulation.ray_transport.ray_actor.pool_size_from_resources computes it once Ray runs (CPUs per actor,
    then GPUs per actor if asked), from this machine's CPU and GPU counts (Ray is told os.cpu_count() CPUs).
    """
    import torch

    fed = cfg.federation
    actors = int((os.cpu_count() or 1) / fed.client_num_cpus) if fed.client_num_cpus > 0 else 1 << 20
    if fed.client_num_gpus > 0:
        actors = min(actors, int(torch.cuda.device_count() / fed.client_num_gpus))
    return max(actors, 1)


def virtual_client_layout(cfg: RunConfig) -> tuple[int, Callable[[Grid], Grid] | None]:
    """(Flower nodes to start, the Grid the coordinator's rounds use) for cfg on the Ray engine.

    clients_per_batch = 1: one Flower node per virtual client, Flower's Grid as it is. > 1: groups of up to
    clients_per_batch virtual clients per message, spread over at least one group per actor
    (simulations/virtual_grid.py), and as many worker nodes as a push can need.
    """
    fed = cfg.federation
    if fed.clients_per_batch <= 1:
        return fed.num_clients, None
    from simulations.virtual_grid import VirtualClientGrid

    actors = ray_actor_count(cfg)
    workers = min(fed.num_clients, max(math.ceil(fed.num_clients / fed.clients_per_batch), actors))
    return workers, lambda grid: VirtualClientGrid(grid, fed.num_clients, fed.clients_per_batch, min_groups=actors)


def simulate(cfg: RunConfig, engine: str = "ray") -> list[dict[str, Any]]:
    """Run cfg as a local simulation; returns the rows of the run's metrics.jsonl.

    engine="ray": Flower's simulation engine (virtual SuperNodes in Ray actors); with federation.clients_per_batch
    > 1, groups of virtual clients per message, each group trained together on one actor
    (simulations/virtual_grid.py, client/multi_adapter.py).
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
        num_nodes, wrap_grid = virtual_client_layout(cfg)
        run_simulation(
            server_app=make_server_app(cfg, wrap_grid),
            client_app=client_app,
            num_supernodes=num_nodes,
            backend_config=backend_config(cfg),
        )
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise RuntimeError(f"simulation finished without writing {metrics}; see the log above")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if len(rows) - (1 if rows and rows[0]["round"] == 0 else 0) < cfg.federation.rounds:
        raise RuntimeError(f"simulation stopped early: {len(rows)} rows in {metrics}")
    return rows
