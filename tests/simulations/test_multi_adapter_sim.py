"""federation.clients_per_batch: simulations train virtual clients together, with solo results (in-process, and on
worker nodes of Flower's Ray engine in groups: simulations/virtual_grid.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client.app
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
from simulations.virtual_grid import VirtualClientGrid, group_sizes


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


def _run_virtual(make_cfg, tmp_path, name, workers, *overrides):
    """run_federation through a VirtualClientGrid over `workers` in-process worker nodes (no Ray)."""
    cfg = make_cfg("federation.num_clients=3", "federation.rounds=2", f"output_dir={tmp_path / name}", *overrides)
    inner = InProcessGrid(client_app, workers, node_configs=[{"worker": i} for i in range(workers)])
    grid = VirtualClientGrid(inner, 3, cfg.federation.clients_per_batch, min_groups=1)
    rows = run_federation(grid, cfg)
    return rows, GlobalAdapterStore(tmp_path / name).load(), grid


def test_groups_of_virtual_clients_on_worker_nodes_reproduce_one_by_one_rounds(make_cfg, tmp_path, batched_groups):
    solo_rows, (solo_adapter, _) = _run(make_cfg, tmp_path, "solo")
    rows, (adapter, _), grid = _run_virtual(make_cfg, tmp_path, "grouped", 2, "federation.clients_per_batch=2")
    # 3 clients in groups of <= 2 on 2 worker nodes: one pair trained together, one alone, in each round.
    assert batched_groups == [2, 2]
    assert grid.get_node_ids() == [1, 2, 3] and not grid._groups and not grid._replies
    for solo_row, row in zip(solo_rows, rows):
        if row["round"]:
            assert row["clients_ok"] == solo_row["clients_ok"] == 3 and row["per_site"].keys() == {"1", "2", "3"}
            assert sorted(site.get("trained-together", 1) for site in row["per_site"].values()) == [1, 2, 2]
            assert row["train_loss"] == pytest.approx(solo_row["train_loss"], rel=1e-4)
            assert row["data_fingerprints"] == solo_row["data_fingerprints"]  # each client kept its own partition
        assert row["eval_loss"] == pytest.approx(solo_row["eval_loss"], rel=1e-3)
    for key, value in solo_adapter.items():
        assert np.allclose(adapter[key], value, rtol=1e-2, atol=1e-4), key


def test_a_virtual_client_that_fails_costs_only_its_own_update(make_cfg, tmp_path, monkeypatch):
    from client import task

    real = task.site_datasets

    def failing_for_partition_1(runtime, cfg, context):
        if int(context.node_config["partition-id"]) == 1:
            raise RuntimeError("partition 1 is unreadable")
        return real(runtime, cfg, context)

    monkeypatch.setattr(task, "site_datasets", failing_for_partition_1)
    rows, _, _ = _run_virtual(make_cfg, tmp_path, "one-fails", 1, "federation.clients_per_batch=3",
                              "federation.rounds=1", "federation.evaluate_before_training=false")
    assert rows[-1]["clients_ok"] == 2 and list(rows[-1]["failed"]) == ["2"]  # node 2 = partition 1
    assert "partition 1 is unreadable" in rows[-1]["failed"]["2"]


def test_context_state_of_each_virtual_client_survives_between_its_messages(monkeypatch):
    seen = []

    def counting_app(msg, context):
        count = int(context.state["count"]["n"]) if "count" in context.state else 0
        seen.append((context.node_id, int(context.node_config["partition-id"]), count))
        context.state["count"] = ConfigRecord({"n": count + 1})
        return Message(RecordDict(), reply_to=msg)

    monkeypatch.setattr(client.app, "app", counting_app)  # the app that answers each member of a group
    grid = VirtualClientGrid(InProcessGrid(client.app.virtual_clients, 2), 5, 2, min_groups=2)
    for _ in range(2):
        replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                                         for n in (1, 3, 5)])
        assert sorted(r.metadata.src_node_id for r in replies) == [1, 3, 5]
    assert sorted(seen) == [(1, 0, 0), (1, 0, 1), (3, 2, 0), (3, 2, 1), (5, 4, 0), (5, 4, 1)]


def test_groups_wait_for_worker_nodes_that_join_late_and_fail_clearly_when_too_few_join(monkeypatch):
    import threading

    monkeypatch.setattr(client.app, "app", lambda msg, context: Message(RecordDict(), reply_to=msg))
    inner = InProcessGrid(client.app.virtual_clients, 2)
    inner.down_nodes = {2}  # Flower registers the simulation's nodes while the ServerApp already runs
    threading.Timer(0.3, inner.down_nodes.clear).start()
    grid = VirtualClientGrid(inner, 4, 2, min_groups=2, wait_for_workers_s=30)
    queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in (1, 2, 3, 4)]
    assert sorted(r.metadata.src_node_id for r in grid.send_and_receive(queries)) == [1, 2, 3, 4]
    inner.down_nodes = {2}
    grid.wait_for_workers_s = 0.2
    with pytest.raises(RuntimeError, match="2 groups of virtual clients need as many worker nodes, 1 joined"):
        grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                               for n in (1, 2, 3, 4)])


def test_group_sizes_cover_every_client_within_the_limit_and_use_every_actor():
    assert group_sizes(64, 16, 2) == [16] * 4
    assert group_sizes(64, 64, 2) == [32, 32]
    assert group_sizes(100, 16, 1) == [15, 15, 14, 14, 14, 14, 14]
    assert group_sizes(3, 2, 8) == [1, 1, 1]
    assert group_sizes(0, 4, 2) == []


def test_ray_engine_trains_groups_of_virtual_clients_with_one_by_one_results(make_cfg, tmp_path):
    """The one Ray test here: Flower's simulation engine, 2 actors, groups trained together, solo deltas."""
    from simulations.simulate import simulate

    solo_rows, (solo_adapter, _) = _run(make_cfg, tmp_path, "solo")
    cfg = make_cfg("federation.num_clients=3", "federation.rounds=2", f"output_dir={tmp_path / 'ray'}",
                   "federation.clients_per_batch=2")
    rows = simulate(cfg, engine="ray")
    adapter, _ = GlobalAdapterStore(tmp_path / "ray").load()
    for solo_row, row in zip(solo_rows, rows):
        if row["round"]:
            assert row["clients_ok"] == 3 and row["per_site"].keys() == {"1", "2", "3"}
            # 2 actors (2 CPUs, 1 each): groups of 2 and 1, the pair trained together on its actor.
            assert sorted(site.get("trained-together", 1) for site in row["per_site"].values()) == [1, 2, 2]
            assert row["train_loss"] == pytest.approx(solo_row["train_loss"], rel=1e-4)
        assert row["eval_loss"] == pytest.approx(solo_row["eval_loss"], rel=1e-3)
    for key, value in solo_adapter.items():
        assert np.allclose(adapter[key], value, rtol=1e-2, atol=1e-4), key
