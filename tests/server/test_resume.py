"""Coordinator restart: resume continues from the newest checkpoint, bit-identically."""

import json

import numpy as np
import pytest

from client.app import app as client_app
from federation.store import GlobalAdapterStore, sha256_file
from server.app import run_federation
from simulations.inprocess import InProcessGrid


class CrashAfterRound(Exception):
    pass


def test_resume_after_crash_starts_from_last_checkpoint(make_cfg, monkeypatch):
    cfg = make_cfg("federation.num_clients=2", "federation.rounds=3", "strategy=fedadam")
    real_save = GlobalAdapterStore.save

    def save_then_crash(self, server_round, *args, **kwargs):
        path = real_save(self, server_round, *args, **kwargs)
        if server_round == 1:
            raise CrashAfterRound()
        return path

    monkeypatch.setattr(GlobalAdapterStore, "save", save_then_crash)
    with pytest.raises(CrashAfterRound):
        run_federation(InProcessGrid(client_app, 2), cfg)
    monkeypatch.setattr(GlobalAdapterStore, "save", real_save)

    store = GlobalAdapterStore(cfg.output_dir)
    round1 = store.round_dir(1)
    sha_before = sha256_file(round1 / "adapter_model.safetensors")
    state1 = json.loads((round1 / "server_state.json").read_text())
    moments_before = store.load_strategy_state(round1)
    assert any(k.startswith("m/") for k in moments_before), "FedAdam moments were not checkpointed"

    cfg.federation.resume = True
    rows = run_federation(InProcessGrid(client_app, 2), cfg)
    # The crash hit between round 1's checkpoint and its metrics row: round 1 has no row, 2 and 3 follow.
    assert [r["round"] for r in rows] == [0, 2, 3]
    round2 = next(r for r in rows if r["round"] == 2)
    assert round2["start_adapter_digest"] == state1["adapter_digest"]
    assert sha256_file(round1 / "adapter_model.safetensors") == sha_before
    assert store.latest()[0] == 3


def test_resume_restores_server_optimizer_state(make_cfg):
    from server.app import build_strategy

    cfg = make_cfg("strategy=fedadam")
    strategy = build_strategy(cfg)
    rng = np.random.default_rng(0)
    glob = {"l.lora_A.weight": np.zeros((2, 3), np.float32), "l.lora_B.weight": np.zeros((3, 2), np.float32)}
    delta = {k: rng.normal(size=v.shape) for k, v in glob.items()}
    after1 = strategy.aggregator.aggregate(glob, [delta], [1.0], ["a"])
    saved = strategy.aggregator.state_dict()
    next_a = strategy.aggregator.aggregate(after1, [delta], [1.0], ["a"])
    fresh = build_strategy(cfg)
    fresh.aggregator.load_state_dict(saved)
    next_b = fresh.aggregator.aggregate(after1, [delta], [1.0], ["a"])
    for k in glob:
        np.testing.assert_array_equal(next_a[k], next_b[k])
