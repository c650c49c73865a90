"""SCAFFOLD and FedSA-LoRA through the real round loop: state at the sites (round state) and on the coordinator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType

import client.app as client_app
import server.app
from federation.packing import unpack_arrays
from client.fedsa import LORA_B_STATE
from client import task
from client.scaffold import C_GLOBAL_RECORD, C_LOCAL_STATE, DELTA_C_RECORD
from client.site_state import SiteStateStore
from federation.adapter import from_array_record, get_adapter_arrays
from federation.compression import decode_upload
from federation.compose import run_config_from_json
from federation.store import GlobalAdapterStore
from server.methods import build_coordinator
from server.methods.scaffold import ScaffoldAggregator
from strategies.aggregators import FedAvgAggregator
from tests.server.test_hetero import RecordingGrid, lora_methods_loop  # noqa: F401 (a fixture)


def _float64(record):
    return {key: np.asarray(value, np.float64) for key, value in unpack_arrays(record).items()}


def _site_state(cfg, node) -> SiteStateStore:
    """The round state of in-process node `node` (partition node - 1) in the run under cfg.output_dir."""
    run_id = GlobalAdapterStore(cfg.output_dir).federation_run_id()
    return SiteStateStore(Path(cfg.output_dir) / "sites" / f"partition-{node - 1}", run_id)


def _train_exchanges(grid, server_round):
    return {m.metadata.dst_node_id: (m, r) for m, r in grid.exchanges
            if m.metadata.message_type.startswith(MessageType.TRAIN) and m.content["config"]["server-round"] == server_round}


def test_scaffold_two_rounds_controls_persist_at_sites_and_c_follows_the_formula(make_cfg, lora_methods_loop,
                                                                                 monkeypatch):
    cfg = make_cfg("federation.num_clients=2", "federation.rounds=2", "strategy=scaffold")
    site_controls = {}  # (node, round) -> c_i the site keeps right after that round's training
    grid = RecordingGrid(client_app.app, 2)
    real_push = grid.push_messages

    def push_and_snapshot(messages):
        messages = list(messages)
        ids = real_push(messages)
        for m in messages:
            if m.metadata.message_type.startswith(MessageType.TRAIN):
                node, rnd = m.metadata.dst_node_id, int(m.content["config"]["server-round"])
                site_controls[(node, rnd)] = _site_state(cfg, node).load_arrays(C_LOCAL_STATE, rnd + 1)
        return ids

    monkeypatch.setattr(grid, "push_messages", push_and_snapshot)
    rows = server.app.run_federation(grid, cfg)
    assert [r["clients_ok"] for r in rows[1:]] == [2, 2] and all(not r["rejected"] for r in rows[1:])
    assert np.isfinite(rows[-1]["eval_loss"])

    round1, round2 = _train_exchanges(grid, 1), _train_exchanges(grid, 2)
    c0 = _float64(round1[1][0].content[C_GLOBAL_RECORD])
    assert all(not v.any() for v in c0.values())  # c starts at zero
    delta_c1 = {node: _float64(reply.content[DELTA_C_RECORD]) for node, (_, reply) in round1.items()}
    delta_c2 = {node: _float64(reply.content[DELTA_C_RECORD]) for node, (_, reply) in round2.items()}
    # Server: c1 = c0 + (1/N) sum_i delta_c_i with N = 2 sites, checked on the c sent in round 2.
    c1 = _float64(round2[1][0].content[C_GLOBAL_RECORD])
    for key in c0:
        np.testing.assert_allclose(c1[key], c0[key] + (delta_c1[1][key] + delta_c1[2][key]) / 2, atol=1e-12)
    assert any(np.abs(v).max() > 0 for v in c1.values())
    c2 = lora_methods_loop[0].aggregator.c_global
    for key in c0:
        np.testing.assert_allclose(c2[key], c1[key] + (delta_c2[1][key] + delta_c2[2][key]) / 2, atol=1e-12)
    # Sites: c_i(1) = 0 + delta_c_i(1) stays at the site; c_i(2) = c_i(1) + delta_c_i(2).
    for node in (1, 2):
        for key in c0:
            np.testing.assert_allclose(site_controls[(node, 1)][key], delta_c1[node][key], atol=1e-12)
            np.testing.assert_allclose(site_controls[(node, 2)][key], delta_c1[node][key] + delta_c2[node][key],
                                       atol=1e-12)
        assert not np.allclose(site_controls[(node, 1)][next(iter(c0))], 0.0)
    # c is checkpointed with the round and restores into a fresh aggregator.
    store = GlobalAdapterStore(cfg.output_dir)
    restored = ScaffoldAggregator(FedAvgAggregator())
    restored.load_state_dict(store.load_strategy_state(store.latest()[1]))
    for key in c0:
        np.testing.assert_array_equal(restored.c_global[key], c2[key])


def test_fedsa_keeps_each_sites_b_and_averages_a(make_cfg, lora_methods_loop, monkeypatch):
    cfg = make_cfg("federation.num_clients=3", "federation.rounds=2", "strategy=fedsa_lora")
    trained = {}  # (node, round) -> (adapter the trainer started from, adapter it ended with)
    evaluated = {}  # (node, round) -> adapter the site evaluated
    real_train, real_evaluate = task.train_reply, task.evaluate_reply

    def recording_train_reply(msg, context, before_step=None):
        start = from_array_record(msg.content["arrays"])
        reply = real_train(msg, context, before_step)
        runtime = task.get_runtime(run_config_from_json(str(msg.content["config"][client_app.RUN_CONFIG_KEY])))
        server_round = int(msg.content["config"]["server-round"])
        trained[(context.node_id, server_round)] = (start, get_adapter_arrays(runtime.model))
        return reply

    def recording_evaluate(msg, context):
        evaluated[(context.node_id, int(msg.content["config"]["server-round"]))] = from_array_record(
            msg.content["arrays"])
        return real_evaluate(msg, context)

    monkeypatch.setattr(task, "train_reply", recording_train_reply)
    monkeypatch.setattr(task, "evaluate_reply", recording_evaluate)
    grid = RecordingGrid(client_app.app, 3)
    rows = server.app.run_federation(grid, cfg)
    assert [r["clients_ok"] for r in rows[1:]] == [3, 3] and all(not r["rejected"] for r in rows[1:])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]

    first = next(iter(trained.values()))[0]
    a_keys = sorted(k for k in first if k.endswith("lora_A.weight"))
    b_keys = sorted(k for k in first if k.endswith("lora_B.weight"))
    for node in (1, 2, 3):
        own_b = _site_state(cfg, node).load_arrays(LORA_B_STATE, 3)  # what it trained in round 2
        round1_end, (round2_start, round2_end) = trained[(node, 1)][1], trained[(node, 2)]
        for key in b_keys:
            # round 2 started from the site's own round-1 B, and the site keeps its round-2 B
            np.testing.assert_array_equal(round2_start[key], round1_end[key])
            np.testing.assert_array_equal(own_b[key], round2_end[key])
            np.testing.assert_array_equal(evaluated[(node, 2)][key], round2_end[key])  # personalised eval
    sites_b = [_site_state(cfg, n).load_arrays(LORA_B_STATE, 3)[b_keys[0]] for n in (1, 2, 3)]
    assert not np.allclose(sites_b[0], sites_b[1]) and not np.allclose(sites_b[0], np.mean(sites_b, axis=0))

    # Uploads carry no lora_B; the global A is the previous global plus the weighted mean of the A deltas.
    round2 = _train_exchanges(grid, 2)
    global_after_1 = from_array_record(round2[1][0].content["arrays"])
    deltas, weights = [], []
    for _, reply in round2.values():
        upload = unpack_arrays(reply.content["arrays"])
        assert not any(".lora_B." in key for key in upload)
        deltas.append(decode_upload(upload))
        weights.append(float(reply.content["metrics"]["num-examples"]))
    store = GlobalAdapterStore(cfg.output_dir)
    final, _ = store.load(store.latest()[1])
    for key in a_keys:
        mean = sum(w * d[key].astype(np.float64) for w, d in zip(weights, deltas)) / sum(weights)
        np.testing.assert_allclose(final[key], global_after_1[key] + mean, atol=1e-6)
        assert not np.allclose(final[key], global_after_1[key])
    for key in b_keys:
        assert not final[key].any()  # the global B stays at PEFT's zero init


@pytest.mark.parametrize("overrides, match", [
    (["strategy=scaffold", "privacy=secagg"], "not supported"),
    (["strategy=scaffold", "privacy.local_dp_sgd.enabled=true"], "local_dp_sgd"),
    (["strategy=fedsa_lora", "privacy.central.enabled=true"], "not supported"),
    (["strategy=flora", "privacy=secagg"], "not supported"),
])
def test_refused_privacy_combinations(make_cfg, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_coordinator(make_cfg(*overrides))
