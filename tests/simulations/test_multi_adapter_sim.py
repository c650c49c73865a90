"""federation.clients_per_batch: the in-process simulation trains virtual clients together, with solo results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client.multi_adapter
from client.app import RUN_CONFIG_KEY
from client.multi_adapter import MultiAdapterTrainer, batchable
from client.app import app as client_app
from federation.adapter import to_array_record
from federation.config import run_config_to_json
from federation.model import initial_adapter
from federation.store import GlobalAdapterStore
from server.app import run_federation
from simulations.inprocess import InProcessGrid


@pytest.fixture
def batched_groups(monkeypatch):
    """Sizes of the client groups MultiAdapterTrainer trained together."""
    sizes, real = [], MultiAdapterTrainer.train

    def recording(self, datasets, *args, **kwargs):
        sizes.append(len(datasets))
        return real(self, datasets, *args, **kwargs)

    monkeypatch.setattr(MultiAdapterTrainer, "train", recording)
    return sizes


def _run(make_cfg, tmp_path, name, *overrides):
    cfg = make_cfg("federation.num_clients=3", "federation.rounds=2", f"output_dir={tmp_path / name}", *overrides)
    rows = run_federation(InProcessGrid(client_app, 3), cfg)
    return rows, GlobalAdapterStore(tmp_path / name).load()


def test_batched_simulation_reproduces_one_by_one_rounds(make_cfg, tmp_path, batched_groups):
    solo_rows, (solo_adapter, _) = _run(make_cfg, tmp_path, "solo")
    assert batched_groups == []
    rows, (adapter, _) = _run(make_cfg, tmp_path, "batched", "federation.clients_per_batch=2")
    # 3 clients, at most 2 together: a group of 2 and one alone, in each of the 2 rounds.
    assert batched_groups == [2, 2]
    for solo_row, row in zip(solo_rows, rows):
        if row["round"]:
            assert row["clients_ok"] == solo_row["clients_ok"] == 3
            assert row["train_loss"] == pytest.approx(solo_row["train_loss"], rel=1e-4)
        assert row["eval_loss"] == pytest.approx(solo_row["eval_loss"], rel=1e-3)
    for key, value in solo_adapter.items():
        assert np.allclose(adapter[key], value, rtol=1e-2, atol=1e-4), key


def test_failed_batched_training_falls_back_to_one_by_one(make_cfg, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("simulated failure in the batched path")

    monkeypatch.setattr(client.multi_adapter.MultiAdapterTrainer, "train", broken)
    rows, _ = _run(make_cfg, tmp_path, "fallback", "federation.clients_per_batch=3", "federation.rounds=1")
    assert rows[-1]["clients_ok"] == 3


def _train_message(cfg, node_config=None):
    arrays = to_array_record(initial_adapter(cfg.model, cfg.lora))
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
        {RUN_CONFIG_KEY: run_config_to_json(cfg), "server-round": 1})}), dst_node_id=1, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=1, node_config=node_config or {"partition-id": 0, "num-partitions": 3},
                  state=RecordDict(), run_config={})
    return msg, ctx


@pytest.mark.parametrize(("overrides", "expected"), [
    (["federation.clients_per_batch=4"], True),
    (["federation.clients_per_batch=4", "strategy.proximal_mu=0.1"], True),
    (["federation.clients_per_batch=4", "strategy=ffa_lora"], True),
    (["federation.clients_per_batch=1"], False),
    (["federation.clients_per_batch=4", "strategy=scaffold"], False),  # gradient correction per step
    (["federation.clients_per_batch=4", "strategy=fedsa_lora"], False),  # site-local B
    (["federation.clients_per_batch=4", "strategy=flora"], False),  # per-site rank and frozen state
    (["federation.clients_per_batch=4", "privacy=dp_sgd"], False),  # per-example clipping
])
def test_only_plain_train_messages_are_batched(make_cfg, overrides, expected):
    msg, ctx = _train_message(make_cfg(*overrides))
    assert batchable(msg, ctx) is expected


def test_sites_with_their_own_rank_or_secagg_requirement_are_not_batched(make_cfg):
    cfg = make_cfg("federation.clients_per_batch=4")
    assert not batchable(*_train_message(cfg, {"partition-id": 0, "num-partitions": 3, "require-secagg": True}))
    rank = cfg.lora.r * 2
    assert not batchable(*_train_message(cfg, {"partition-id": 0, "num-partitions": 3, "lora-r": rank}))
    evaluate_msg, ctx = _train_message(cfg)
    evaluate_msg.metadata.__dict__["_message_type"] = MessageType.EVALUATE
    assert not batchable(evaluate_msg, ctx)
    assert json.loads(run_config_to_json(cfg))["federation"]["clients_per_batch"] == 4


def test_ray_engine_refuses_batched_clients(make_cfg):
    from simulations.simulate import simulate

    with pytest.raises(ValueError, match="--engine inprocess"):
        simulate(make_cfg("federation.clients_per_batch=2"), engine="ray")
