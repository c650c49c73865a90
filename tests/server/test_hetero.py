"""Heterogeneous LoRA ranks: FLoRA stacking and FlexLoRA SVD redistribution through the real round loop."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

import server.app
import server.methods.flora
from client.app import RUN_CONFIG_KEY
from client.app import app as client_app, train as plain_train
from client.task import site_settings
from client.flora import (FROZEN_ACCUMULATE, FROZEN_COUNT_STATE, FROZEN_FROM_KEY, FROZEN_MODE_KEY, FROZEN_RECORD,
                           FROZEN_STATE, FROZEN_TO_KEY, METRIC_FROZEN_COUNT, METRIC_LOCAL_STEPS, METRIC_RANK,
                           frozen_lora_update, frozen_update_for)
from federation.adapter import from_array_record, to_array_record
from federation.config import run_config_to_json
from federation.model import initial_adapter
from server.methods.flora import HeteroLoraState, SiteProfile, check_site_ranks, query_site_profiles
from strategies.lora_exact import truncate_factors
from federation.validation import check_rank_plan
from simulations.inprocess import InProcessGrid
from strategies.aggregators import MixedRanksError
from strategies.lora_exact import lora_pairs, lora_ranks, svd_redistribute, weighted_dense_mean
from tests.flower_messages import instruction, set_task_identity

RANKS = [4, 8, 16]


@pytest.fixture
def lora_methods_loop(monkeypatch):
    """server.app.build_strategy with the patch proposed for server/app.py; yields the strategies it built."""
    built, plain = [], server.app.build_strategy

    def build_strategy(cfg):
        check_rank_plan(cfg)
        strategy = plain(cfg)
        built.append(strategy)
        return strategy

    monkeypatch.setattr(server.app, "build_strategy", build_strategy)
    return built


@pytest.fixture
def stacked_rounds(monkeypatch):
    """Every (local adapters, weights, scalings) that HeteroLoraStrategy stacked, one entry per round."""
    calls, real = [], server.methods.flora.stack_lora_updates

    def recording(adapters, weights, scalings=None, stacked_scaling=1.0):
        calls.append(([dict(a) for a in adapters], list(weights), list(scalings)))
        return real(adapters, weights, scalings, stacked_scaling)

    monkeypatch.setattr(server.methods.flora, "stack_lora_updates", recording)
    return calls


class RecordingGrid(InProcessGrid):
    """InProcessGrid that keeps every (message, reply) pair, reply None until one is pulled: recorded at the
    push_messages / pull_messages calls that send_and_receive and the coordinator's streaming round both use."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.exchanges = []
        self._index: dict[str, int] = {}  # message id -> its place in exchanges

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for message in messages:
            self._index[message.metadata.message_id] = len(self.exchanges)
            self.exchanges.append((message, None))
        return ids

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            index = self._index.pop(reply.metadata.reply_to_message_id)
            self.exchanges[index] = (self.exchanges[index][0], reply)
        return replies


def _dense(factors):
    return {prefix: np.asarray(factors[b], np.float64) @ np.asarray(factors[a], np.float64)
            for prefix, (a, b) in lora_pairs(factors).items()}


def _hetero_run(make_cfg, strategy, rounds=2):
    cfg = make_cfg("federation.num_clients=3", f"federation.rounds={rounds}", f"strategy={strategy}",
                   f"strategy.params.site_ranks=[{','.join(map(str, RANKS))}]")
    grid = RecordingGrid(client_app, 3)
    return cfg, grid, server.app.run_federation(grid, cfg)


def test_truncate_factors_is_the_svd_of_the_product():
    rng = np.random.default_rng(0)
    b, a = rng.normal(size=(7, 5)), rng.normal(size=(5, 6))
    b3, a3, values = truncate_factors(b, a, 3)
    ref_b, ref_a = svd_redistribute(b @ a, 3)
    np.testing.assert_allclose(b3 @ a3, ref_b @ ref_a, atol=1e-10)
    np.testing.assert_allclose(values, np.linalg.svd(b @ a, compute_uv=False)[:3], atol=1e-10)
    b8, a8, values8 = truncate_factors(b, a, 8)  # above the rank (5): exact, extra components zero
    np.testing.assert_allclose(b8 @ a8, b @ a, atol=1e-10)
    assert np.all(values8[5:] == 0) and np.all(values8[:5] > 0)


def test_state_appends_exact_slices_and_survives_a_checkpoint():
    rng = np.random.default_rng(1)
    rounds = [{"l.lora_A.weight": rng.normal(size=(r, 4)), "l.lora_B.weight": rng.normal(size=(3, r))} for r in (2, 5)]
    state = HeteroLoraState("flora")
    for stacked in rounds:
        state.merge(stacked)
    assert state.offsets == [0, 2, 7] and state.num_updates == 2
    np.testing.assert_array_equal(state.factors_since(1)["l.lora_A.weight"], rounds[1]["l.lora_A.weight"])
    restored = HeteroLoraState("flora")
    restored.load_state_dict(state.state_dict())
    assert restored.offsets == [0, 2, 7]
    np.testing.assert_allclose(_dense(restored.factors_since(0))["l"],
                               sum(_dense(r)["l"] for r in rounds), atol=1e-12)
    flex = HeteroLoraState("flexlora", accumulates=False)
    for stacked in rounds:
        flex.merge(stacked)
    assert flex.offsets == [0, 5]  # FlexLoRA replaces the global each round
    np.testing.assert_array_equal(flex.factors_since(0)["l.lora_B.weight"], rounds[1]["l.lora_B.weight"])


def test_site_settings_node_config_then_partition_list_then_run_config(make_cfg):
    cfg = make_cfg("strategy=flora", "strategy.params.site_ranks=[4,8,16]", "strategy.params.site_local_steps=[3]")
    assert site_settings(cfg, {"partition-id": 4, "num-partitions": 5}).rank == 8  # 4 % 3 == 1
    assert site_settings(cfg, {"partition-id": 4, "num-partitions": 5}).local_steps == 3
    node_set = site_settings(cfg, {"partition-id": 0, "lora-r": 2, "local-steps": 7})
    assert (node_set.rank, node_set.local_steps) == (2, 7)
    assert site_settings(make_cfg(), {"partition-id": 2}).rank == 8  # lora.r


def test_frozen_hook_adds_exactly_the_merged_update(tiny_lora):
    _, model, _, _ = tiny_lora
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(prefix)
    rng = np.random.default_rng(2)
    out_features, in_features = layer.get_base_layer().weight.shape
    factors = {prefix + ".lora_A.weight": rng.normal(size=(5, in_features)).astype(np.float32) * 0.1,
               prefix + ".lora_B.weight": rng.normal(size=(out_features, 5)).astype(np.float32) * 0.1}
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        with frozen_lora_update(model, factors):
            hooked = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits  # the hook is gone again
        layer.get_base_layer().weight += torch.from_numpy(_dense(factors)[prefix].astype(np.float32))
        merged = model(input_ids=ids).logits
        layer.get_base_layer().weight -= torch.from_numpy(_dense(factors)[prefix].astype(np.float32))
    torch.testing.assert_close(hooked, merged, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(hooked, plain, atol=1e-3)


def test_site_merges_slices_resets_from_zero_and_refuses_a_gap():
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    parts = [{"l.lora_A.weight": np.full((r, 2), float(r), np.float32), "l.lora_B.weight": np.ones((3, r), np.float32)}
             for r in (1, 2)]

    def message(start, end, factors):
        content = RecordDict({"config": ConfigRecord({FROZEN_MODE_KEY: FROZEN_ACCUMULATE, FROZEN_FROM_KEY: start,
                                                      FROZEN_TO_KEY: end})})
        if factors:
            content[FROZEN_RECORD] = to_array_record(factors)
        return instruction(content, dst_node_id=1)

    frozen, count = frozen_update_for(message(0, 1, parts[0]), context)
    assert count == 1 and frozen["l.lora_A.weight"].shape == (1, 2)
    frozen, count = frozen_update_for(message(1, 2, parts[1]), context)
    assert count == 2 and frozen["l.lora_A.weight"][:, 0].tolist() == [1.0, 2.0, 2.0]
    assert from_array_record(context.state[FROZEN_STATE])["l.lora_B.weight"].shape == (3, 3)
    with pytest.raises(RuntimeError, match="merged 2 global updates"):
        frozen_update_for(message(1, 3, parts[1]), context)
    frozen, count = frozen_update_for(message(0, 1, parts[1]), context)  # coordinator restarted: replace
    assert count == 1 and frozen["l.lora_A.weight"].shape == (2, 2)
    assert int(context.state[FROZEN_COUNT_STATE]["count"]) == 1


def test_flora_three_ranks_train_together_and_the_global_is_the_exact_stacked_sum(
        make_cfg, lora_methods_loop, stacked_rounds):
    cfg, grid, rows = _hetero_run(make_cfg, "flora")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_ok"] == 3 and not r["rejected"] and not r["failed"] for r in rows[1:])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    # Each round stacked one adapter per rank, with PEFT scalings alpha / r.
    assert len(stacked_rounds) == 2
    for adapters, _, scalings in stacked_rounds:
        ranks = [next(iter(lora_ranks(adapter).values())) for adapter in adapters]
        assert sorted(ranks) == RANKS
        assert scalings == [cfg.lora.alpha / r for r in ranks]
    strategy = lora_methods_loop[0]
    assert strategy.aggregator.offsets == [0, sum(RANKS), 2 * sum(RANKS)]
    expected = {}
    for adapters, weights, scalings in stacked_rounds:
        for prefix, update in weighted_dense_mean(adapters, weights, scalings).items():
            expected[prefix] = expected.get(prefix, 0.0) + update
    got = _dense(strategy.aggregator.factors_since(0))
    for prefix, update in expected.items():
        np.testing.assert_allclose(got[prefix], update, atol=1e-10)
    # Every site merged both rounds (round 2's update came with the last evaluation) and agrees with the server.
    for context in grid.contexts.values():
        assert int(context.state[FROZEN_COUNT_STATE]["count"]) == 2
        site = _dense(from_array_record(context.state[FROZEN_STATE]))
        for prefix, update in expected.items():
            np.testing.assert_allclose(site[prefix], update, atol=1e-5)
    # Round 2 sent only what the sites lacked: nothing (they merged round 1's update at evaluation).
    round2_train = [m for m, _ in grid.exchanges if m.metadata.message_type.startswith(MessageType.TRAIN)
                    and m.content["config"]["server-round"] == 2]
    assert len(round2_train) == 3 and all(FROZEN_RECORD not in m.content.array_records for m in round2_train)
    sent_ranks = sorted(next(iter(from_array_record(m.content["arrays"]).values())).shape[0] for m in round2_train)
    assert sent_ranks == RANKS


def test_flexlora_sends_each_site_the_svd_truncation_at_its_rank(make_cfg, lora_methods_loop, stacked_rounds):
    cfg, grid, rows = _hetero_run(make_cfg, "flexlora")
    assert all(r["clients_ok"] == 3 and not r["rejected"] for r in rows[1:])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    adapters, weights, scalings = stacked_rounds[0]
    global_round1 = weighted_dense_mean(adapters, weights, scalings)
    round2_train = [m for m, _ in grid.exchanges if m.metadata.message_type.startswith(MessageType.TRAIN)
                    and m.content["config"]["server-round"] == 2]
    assert len(round2_train) == 3
    for message in round2_train:
        sent = from_array_record(message.content["arrays"])
        rank = next(v.shape[0] for k, v in sent.items() if k.endswith("lora_A.weight"))
        scaling = cfg.lora.alpha / rank
        for prefix, product in _dense(sent).items():
            best_b, best_a = svd_redistribute(global_round1[prefix], rank)
            np.testing.assert_allclose(scaling * product, best_b @ best_a, atol=1e-5)
    # The run's checkpoint holds the exact global (last round's stacked factors) as strategy state.
    assert lora_methods_loop[0].aggregator.offsets == [0, sum(RANKS)]


def test_mixed_ranks_under_fedavg_fail_before_any_round(make_cfg):
    # Refused where the config is composed (federation.validation), so no run can start with it.
    with pytest.raises(MixedRanksError, match=r"strategy 'fedavg' needs the same LoRA rank.*partition 0 r=4.*flora"):
        make_cfg("federation.num_clients=3", "strategy=fedavg", "+strategy.params.site_ranks=[4,8,16]")


class ProfileRepliesGrid:
    """Nodes 1..4 answering the site-profile query with the given contents (node -> RecordDict)."""

    def __init__(self, contents):
        self.contents = contents

    def get_node_ids(self):
        return sorted(self.contents)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for index, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"q{index}"
            replies.append(Message(self.contents[msg.metadata.dst_node_id], reply_to=msg))
        return replies


def test_malformed_site_profiles_become_per_node_errors(make_cfg, caplog):
    set_task_identity()
    honest = {METRIC_RANK: 8, METRIC_LOCAL_STEPS: 2, METRIC_FROZEN_COUNT: 0}
    grid = ProfileRepliesGrid({
        1: RecordDict({"metrics": MetricRecord(honest)}),
        2: RecordDict({"metrics": MetricRecord({METRIC_RANK: 8, METRIC_LOCAL_STEPS: 2})}),
        3: RecordDict({"metrics": ConfigRecord({**honest, METRIC_RANK: "8"})}),
        4: RecordDict({"metrics": MetricRecord({**honest, METRIC_RANK: 2.5})}),
    })
    cfg = make_cfg("strategy=flora")
    config = ConfigRecord({RUN_CONFIG_KEY: run_config_to_json(cfg)})
    profiles, errors = query_site_profiles(grid, [1, 2, 3, 4], config, None)
    assert profiles == {1: SiteProfile(8, 2, 0)}
    assert errors == {2: "malformed site profile: metric 'frozen-updates' is missing",
                      3: "malformed site profile: site profile must be one MetricRecord, got 0",
                      4: "malformed site profile: metric 'lora-r' must be a whole number >= 1, got 2.5"}
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        assert set(check_site_ranks(grid, make_cfg(), config, None)) == {1}  # fedavg: the others assumed lora.r
    assert "node 4 gave no site profile (malformed site profile" in caplog.text


def test_site_ranks_from_node_configs_under_fedavg_are_refused_by_the_query_and_by_the_site(make_cfg):
    cfg = make_cfg("federation.num_clients=3")
    node_configs = [{"partition-id": i, "num-partitions": 3, "lora-r": r} for i, r in enumerate([8, 4, 8])]
    grid = InProcessGrid(client_app, 3, node_configs=node_configs)
    config = ConfigRecord({RUN_CONFIG_KEY: run_config_to_json(cfg)})
    with pytest.raises(MixedRanksError, match=r"node 2 r=4"):
        check_site_ranks(grid, cfg, config, timeout=None)
    train = instruction(RecordDict({"arrays": to_array_record(initial_adapter(cfg.model, cfg.lora)),
                                    "config": ConfigRecord({RUN_CONFIG_KEY: run_config_to_json(cfg),
                                                            "server-round": 1})}), dst_node_id=2)
    with pytest.raises(MixedRanksError, match="configured for LoRA rank 4"):
        plain_train(train, grid.contexts[2])
    flora_cfg = make_cfg("federation.num_clients=3", "strategy=flora")
    profiles = check_site_ranks(grid, flora_cfg, ConfigRecord({RUN_CONFIG_KEY: run_config_to_json(flora_cfg)}), None)
    assert {node: p.rank for node, p in profiles.items()} == {1: 8, 2: 4, 3: 8}


@pytest.mark.parametrize("strategy", ["flora", "flexlora"])
def test_site_profile_asking_for_a_rank_no_layer_can_use_is_refused_before_anything_is_built(make_cfg, strategy):
    """A site that reported LoRA rank 2**40 made the coordinator build a (2**40, in) factor for it: MemoryError out of
    configure_train, the run gone. Now that site gets no message this round, with the reason; the others train."""
    set_task_identity()
    cfg = make_cfg(f"strategy={strategy}", "federation.num_clients=3")
    layers = {"m.l0": (5, 4), "m.l1": (6, 3)}  # prefix -> (in, out): no layer can use a rank above 4
    adapter = {**{f"{p}.lora_A.weight": np.zeros((2, i), np.float32) for p, (i, _) in layers.items()},
               **{f"{p}.lora_B.weight": np.zeros((o, 2), np.float32) for p, (_, o) in layers.items()}}
    profile = {METRIC_RANK: 2, METRIC_LOCAL_STEPS: 2, METRIC_FROZEN_COUNT: 0}
    grid = ProfileRepliesGrid({1: RecordDict({"metrics": MetricRecord(profile)}),
                               2: RecordDict({"metrics": MetricRecord({**profile, METRIC_RANK: 2**40})}),
                               3: RecordDict({"metrics": MetricRecord({**profile, METRIC_RANK: 4})})})
    strategy_ = server.app.build_strategy(cfg)
    messages = list(strategy_.configure_train(1, to_array_record(adapter), ConfigRecord(
        {RUN_CONFIG_KEY: run_config_to_json(cfg)}), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 3]
    assert strategy_.ledger(1).failed == {2: "site-profile query failed: malformed site profile: metric 'lora-r' "
                                              "must be a whole number in [1, 4], got 1099511627776"}
