"""Many virtual clients in one process (simulations/bench/many_clients.py): what a round leaves behind is bounded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from client import task
from client.app import app as client_app
from client.run_config_cache import STATE_RECORD as RUN_CONFIG_STATE_RECORD
from client.scaffold import C_LOCAL_STATE
from client.site_state import SiteStateStore
from federation.store import GlobalAdapterStore
from server.app import run_federation
from simulations.bench.many_clients import MeasuredGrid, main, stray_device_tensors


def _dataset_tensors() -> set[int]:
    runtime = task._RUNTIME
    return {t.data_ptr() for entry in runtime.datasets.values() for ds in (entry.train, entry.eval)
            for example in ds.examples for t in example.values()}


def test_rounds_with_new_clients_leave_no_per_client_tensors_or_context_state(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(task, "SITE_DATASETS_KEPT", 3)
    cfg = make_cfg("federation.num_clients=12", "federation.rounds=4", "strategy=scaffold", "data.partitioner=iid",
                   "strategy.fraction_train=0.25", "strategy.fraction_evaluate=0.25", "eval.generate=false",
                   "federation.evaluate_before_training=false", "train.local_steps=1",
                   f"output_dir={tmp_path / 'run'}")
    stray_after_round = []

    def on_round(row):  # called right after the grid's gc.collect()
        model = task._RUNTIME.model
        # CPU tensors that are neither the resident model's nor the (bounded) cached datasets': per-client leftovers.
        count, _ = stray_device_tensors(model, "cpu", exclude=_dataset_tensors())
        stray_after_round.append(count)

    grid = MeasuredGrid(client_app, 12, tmp_path / "run", on_round)
    try:
        run_federation(grid, cfg)
        grid.close_round()
    finally:
        grid.gpu.close()
    assert [row["round"] for row in grid.rounds] == [1, 2, 3, 4]
    assert grid.rounds[-1]["clients_seen"] > 3  # new clients joined after round 1
    # Round 1 warms up (first optimizer, kernels); after it, new clients leave nothing behind.
    assert len(set(stray_after_round[1:])) == 1, stray_after_round
    assert all(row["datasets_cached"] <= 3 for row in grid.rounds)
    # Nothing per client in RAM but the run config's JSON (client/run_config_cache.py: a few kB, one text per run).
    assert all(set(context.state.keys()) <= {RUN_CONFIG_STATE_RECORD} for context in grid.contexts.values())
    assert all(len(record) <= 1 for context in grid.contexts.values() for record in context.state.config_records.values())
    # Every client that trained holds its c_i in its state files, one folder per client.
    run_id = GlobalAdapterStore(cfg.output_dir).federation_run_id()
    for node in grid.seen:
        store = SiteStateStore(Path(cfg.output_dir) / "sites" / f"partition-{node - 1}", run_id)
        assert store.rounds(C_LOCAL_STATE)


def test_site_state_survives_the_spill_to_disk_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"c64": rng.standard_normal((5, 7)), "c32": rng.standard_normal((3, 4)).astype(np.float32),
              "edge": np.array([np.nan, -0.0, np.inf, 1e-320], np.float64)}
    store = SiteStateStore(tmp_path, "run")
    store.save_arrays("fedtune.scaffold.c-local", 2, arrays)
    loaded = SiteStateStore(tmp_path, "run").load_arrays("fedtune.scaffold.c-local", 2)
    assert {k: (v.dtype, v.shape, v.tobytes()) for k, v in loaded.items()} == \
        {k: (v.dtype, v.shape, v.tobytes()) for k, v in arrays.items()}


def test_benchmark_writes_rounds_with_memory_and_disk(tmp_path, model_cache):
    out = tmp_path / "out"
    assert main(["--out", str(out), "--clients", "8", "--per-round", "2", "--rounds", "2", "--seq", "16",
                 "--strategy", "fedsa_lora", "--cache", model_cache, "train.local_steps=1"]) == 0
    result = json.loads((out / "many.json").read_text())
    assert result["machine"]["device"] and result["machine"]["cuda"] == torch.cuda.is_available()
    (run,) = result["runs"]
    assert [row["round"] for row in run["rounds"]] == [1, 2]
    assert all(row["clients_ok"] == 2 and row["seconds"] > 0 and row["host_rss_peak_mib"] > 0 for row in run["rounds"])
    assert run["rounds"][-1]["state_disk_mib"] > 0  # FedSA-LoRA's B and the error-feedback residuals
    assert "fedsa_lora round 2" in (out / "many.log").read_text()
