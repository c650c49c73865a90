"""SecAgg+ rounds, inspected as the coordinator sees them: masked vectors only, the right aggregate, dropouts."""

import json
import logging

import numpy as np

from federation.packing import unpack_arrays
from federation.compression import decode_upload
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

import client.app as client_app
from client.app import app as secagg_app
from client.secagg import CLIPPED_VALUES_METRIC, make_secagg_app, secagg_upload
from client.site_policy import NODE_POLICY_KEY, SitePolicy, SiteRefusal
from federation.adapter import from_array_record, to_array_record
from federation.config import CentralDPConfig, run_config_to_json
from federation.model import initial_adapter
from federation.privacy import clip_update
from server.privacy import CentralDP
from server.secagg import (SecAggParams, check_secagg_aggregator, quantized_sensitivity, secagg_error_bound,
                           secagg_train_round, secure_train_round)
from server.strategy import LoraDeltaStrategy
from simulations.inprocess import InProcessGrid
from strategies.aggregators import FedAvgAggregator, build_aggregator
from strategies.fedavg import weighted_mean
from tests.flower_messages import instruction

KA = "m.q_proj.lora_A.weight"
KB = "m.q_proj.lora_B.weight"
GLOBAL = {KA: np.full((2, 3), 0.5, np.float32), KB: np.zeros((4, 2), np.float32)}
Q = 2**22
# Power-of-two c and M: weights w/M*Q are exact integers, so the aggregate is exactly example-weighted.
PARAMS = SecAggParams(num_shares=3, reconstruction_threshold=2, clipping_range=0.125, quantization_range=Q,
                      max_weight=64)
WEIGHTS = {0: 8, 1: 16, 2: 32, 3: 24, 4: 100}  # partition id -> num-examples (100 > max_weight)


def site_delta(pid: int) -> dict:
    """Hand-made LoRA delta of partition `pid`: A = (pid+1)/100 everywhere, B = k * (pid+1) / 1000 - 0.003."""
    return {KA: np.full((2, 3), (pid + 1) * 0.01, np.float32),
            KB: (np.arange(8, dtype=np.float32).reshape(4, 2) * 0.001 - 0.003) * (pid + 1)}


def stub_train(msg: Message, context: Context) -> Message:
    """Stands in for client.app.train: checks what it was sent, replies with site_delta and WEIGHTS."""
    pid = int(context.node_config["partition-id"])
    received = from_array_record(msg.content["arrays"])
    assert set(received) == set(GLOBAL) and all(np.array_equal(received[k], GLOBAL[k]) for k in GLOBAL)
    assert msg.content["config"][client_app.RUN_CONFIG_KEY] == "{}"
    return Message(RecordDict({"arrays": to_array_record(site_delta(pid)),
                               "metrics": MetricRecord({"num-examples": WEIGHTS[pid], "train-loss": 1.0 + pid})}),
                   reply_to=msg)


class StageDropGrid(InProcessGrid):
    """In-process grid that takes a node down when a given SecAgg+ stage reaches it, and keeps every reply."""

    def __init__(self, client_app_, num_nodes, drop_at=None):
        super().__init__(client_app_, num_nodes)
        self.drop_at = dict(drop_at or {})  # node id -> Stage name at which it vanishes
        self.replies: list[Message] = []

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and self.drop_at.get(msg.metadata.dst_node_id) == configs.get(Key.STAGE):
                self.down_nodes.add(msg.metadata.dst_node_id)
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.replies.extend(replies)
        return replies


def fedavg_of(pids) -> dict:
    return weighted_mean([site_delta(p) for p in pids], [WEIGHTS[p] for p in pids])


def max_error(result_mean, expected) -> float:
    return max(float(np.abs(result_mean[k] - expected[k]).max()) for k in expected)


def test_coordinator_sees_only_masked_vectors_and_gets_the_fedavg_aggregate():
    grid = StageDropGrid(make_secagg_app(stub_train), 3)
    result = secagg_train_round(grid, 1, GLOBAL, "{}", PARAMS, timeout=30)
    assert result.error is None and result.aggregated_nodes == [1, 2, 3] and result.dropped_nodes == {}
    assert result.total_examples == 8 + 16 + 32

    # No reply, at any stage, carries a plaintext array; the only update data is one masked vector per site.
    assert all(len(record) == 0 for reply in grid.replies for record in reply.content.array_records.values())
    masked = {r.metadata.src_node_id: [bytes_to_ndarray(b) for b in r.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
              for r in grid.replies if Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {})}
    assert sorted(masked) == [1, 2, 3]
    for node, vectors in masked.items():
        pid = node - 1
        scale = WEIGHTS[pid] / PARAMS.max_weight
        # Without masks the site would send its weight factor and round((scale*x + c) * Q / 2c).
        assert int(vectors[0][0]) != WEIGHTS[pid] * Q // PARAMS.max_weight
        for key, vector in zip(GLOBAL, vectors[1:]):
            unmasked = (scale * site_delta(pid)[key].astype(np.float64) + PARAMS.clipping_range) * Q / (
                2 * PARAMS.clipping_range)
            assert vector.shape == GLOBAL[key].shape
            assert np.all(np.abs(vector - unmasked) > 2), f"node {node} {key}: masked value close to the true one"
        # The narrowest width the 2**32 modulus allows: uint32, 4 B per value (Flower sends int64), plus
        # one .npy header per array.
        assert all(vector.dtype == np.uint32 for vector in vectors)
        values = 1 + sum(v.size for v in GLOBAL.values())
        assert 4 * values < result.masked_bytes_up[node] <= 4 * values + 128 * len(vectors)

    expected = fedavg_of([0, 1, 2])
    bound = secagg_error_bound([8, 16, 32], PARAMS.clipping_range, Q, PARAMS.max_weight)
    assert result.error_bound == pytest.approx(bound)
    assert max_error(result.mean_delta, expected) <= bound
    # The bound is tight enough to tell example weighting from a uniform mean.
    assert max_error(weighted_mean([site_delta(p) for p in range(3)], [1, 1, 1]), expected) > 100 * bound
    assert result.site_metrics[3]["train-loss"] == 3.0 and result.site_metrics[3][CLIPPED_VALUES_METRIC] == 0


# Everyone is everyone's neighbour (num_shares = 1.0), 3 of 4 shares unmask: one site of four may drop out.
ALL_NEIGHBOURS = SecAggParams(num_shares=1.0, reconstruction_threshold=3, clipping_range=0.125, max_weight=64)


@pytest.mark.parametrize("stage, aggregated", [(Stage.SETUP, [1, 2, 3]), (Stage.SHARE_KEYS, [1, 2, 3]),
                                               (Stage.COLLECT_MASKED_VECTORS, [1, 2, 3]),
                                               (Stage.UNMASK, [1, 2, 3, 4])])
def test_dropout_above_threshold_still_gives_the_aggregate_of_the_sites_in_the_sum(stage, aggregated):
    grid = StageDropGrid(make_secagg_app(stub_train), 4, drop_at={4: stage})
    result = secagg_train_round(grid, 1, GLOBAL, "{}", ALL_NEIGHBOURS, timeout=30)
    assert result.error is None
    # Dropping before its keys were shared: nobody masked with it, it is left out (Flower 1.41 alone would ask the
    # others for its key shares at unmask and fail the round); before its masked vector: its pairwise masks are
    # rebuilt from shares and it is left out; after it: its own mask is removed with the others' shares, it counts.
    assert result.aggregated_nodes == aggregated and result.dropped_nodes == {4: f"{stage}: no reply"}
    pids = [n - 1 for n in aggregated]
    assert max_error(result.mean_delta, fedavg_of(pids)) <= secagg_error_bound(
        [WEIGHTS[p] for p in pids], 0.125, Q, 64)
    assert max_error(fedavg_of([0, 1, 2]), fedavg_of([0, 1, 2, 3])) > 100 * result.error_bound


HOSTILE = 4
# The stage whose reply carries this key of the "secaggplus" ConfigRecord.
_STAGE_OF_REPLY = {Key.PUBLIC_KEY_1: Stage.SETUP, Key.CIPHERTEXT_LIST: Stage.SHARE_KEYS,
                   Key.MASKED_PARAMETERS: Stage.COLLECT_MASKED_VECTORS, Key.SHARE_LIST: Stage.UNMASK}


class HostileStageGrid(StageDropGrid):
    """Four sites; node HOSTILE runs the real protocol but rewrites its reply at one stage: change(values), values
    being its "secaggplus" ConfigRecord as a plain dict (Flower's type checks bypassed, as a hostile site can)."""

    def __init__(self, stage: str, change):
        super().__init__(make_secagg_app(stub_train), 4)
        self.stage, self.change = stage, change

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            configs = None if reply.has_error() else reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if reply.metadata.src_node_id != HOSTILE or configs is None:
                continue
            if next((stage for key, stage in _STAGE_OF_REPLY.items() if key in configs), None) == self.stage:
                self.change(configs.__dict__["_data"])
        return replies


def _set(key, value_of):
    return lambda values: values.__setitem__(key, value_of(values))


def _shifted_own_vector(part: int, shift: int):
    def change(values):
        vectors = [bytes_to_ndarray(b) for b in values[Key.MASKED_PARAMETERS]]
        vectors[part] = vectors[part] + vectors[part].dtype.type(shift)  # wraps like the modular sum
        values[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(v) for v in vectors]

    return change


# A Shamir share is a 4-byte index, then 16 bytes per chunk of the padded secret: changing the first chunk gives a
# share that still combines (the padding in the last chunk is intact) into a wrong secret.
_WRONG_SHARES = _set(Key.SHARE_LIST, lambda v: [s[:4] + bytes([s[4] ^ 1]) + s[5:] for s in v[Key.SHARE_LIST]])

# stage, change, what the round does: ("dropped", reason) - the hostile site is refused at that stage and the
# round aggregates the others exactly (at unmask its masked vector is already in the sum and is unmasked with the
# others' shares); ("failed", reason) - no aggregate, the reason in the round's error.
HOSTILE_STAGE_REPLIES = {
    "no public key": (Stage.SETUP, lambda v: v.pop(Key.PUBLIC_KEY_1), ("dropped", "'pk1' not bytes but NoneType")),
    "unreadable public key": (Stage.SETUP, _set(Key.PUBLIC_KEY_2, lambda v: b"-----BEGIN junk"),
                              ("dropped", "'pk2' unreadable")),
    "one key twice": (Stage.SETUP, _set(Key.PUBLIC_KEY_2, lambda v: v[Key.PUBLIC_KEY_1]),
                      ("dropped", "its two public keys are the same key")),
    "public key as text": (Stage.SETUP, _set(Key.PUBLIC_KEY_1, lambda v: v[Key.PUBLIC_KEY_1].decode()),
                           ("dropped", "'pk1' not bytes but str")),
    "a ciphertext short": (Stage.SHARE_KEYS, _set(Key.CIPHERTEXT_LIST, lambda v: v[Key.CIPHERTEXT_LIST][:-1]),
                           ("dropped", "ciphertext list has 2 entries for 3 nodes")),
    "no ciphertexts": (Stage.SHARE_KEYS, lambda v: v.pop(Key.CIPHERTEXT_LIST),
                       ("dropped", "ciphertext list must be a list of bytes")),
    # It would mask with a neighbour that never got its share, a mask nothing removes.
    "ciphertext for a stranger": (Stage.SHARE_KEYS,
                                  _set(Key.DESTINATION_LIST, lambda v: [999, *v[Key.DESTINATION_LIST][1:]]),
                                  ("dropped", "expected one for each of its neighbours [1, 2, 3]")),
    "masked vector of int64": (Stage.COLLECT_MASKED_VECTORS, _set(Key.MASKED_PARAMETERS, lambda v: [
        ndarray_to_bytes(bytes_to_ndarray(b).astype(np.int64)) for b in v[Key.MASKED_PARAMETERS]]),
        ("dropped", "expected uint32")),
    "shares of a stranger": (Stage.UNMASK, _set(Key.NODE_ID_LIST, lambda v: [999, *v[Key.NODE_ID_LIST][1:]]),
                             ("dropped", "key shares of nodes [2, 3, 4, 999], asked for [1, 2, 3, 4]")),
    "a share twice": (Stage.UNMASK,
                      _set(Key.NODE_ID_LIST, lambda v: [v[Key.NODE_ID_LIST][1], *v[Key.NODE_ID_LIST][1:]]),
                      ("dropped", "names a node more than once")),
    "a share short": (Stage.UNMASK, _set(Key.SHARE_LIST, lambda v: v[Key.SHARE_LIST][:-1]),
                      ("dropped", "share list has 3 entries for 4 nodes")),
    "shares as text": (Stage.UNMASK, _set(Key.SHARE_LIST, lambda v: ["x"] * len(v[Key.SHARE_LIST])),
                       ("dropped", "share list must be a list of bytes")),
    # Well-formed but wrong: only the unmasked sum can tell (each used to be aggregated into a wrong adapter).
    "own masked vector shifted": (Stage.COLLECT_MASKED_VECTORS, _shifted_own_vector(1, 2**31),
                                  ("failed", "outside the [0, 16777216] that 4 sites' quantized values add up to")),
    "own weight inflated": (Stage.COLLECT_MASKED_VECTORS, _shifted_own_vector(0, Q),
                            ("failed", "its weight factor is 9437184, but the weights [8, 16, 24, 32]")),
    "wrong shares": (Stage.UNMASK, _WRONG_SHARES,
                     ("failed", "the unmasked sum is no sum of the sites' masked vectors")),
    # Undecryptable key shares: the others cannot mask and drop out; the coordinator cannot tell (they are
    # encrypted for the neighbours), so the round fails.
    "undecryptable ciphertexts": (Stage.SHARE_KEYS, _set(Key.CIPHERTEXT_LIST, lambda v: [
        b[:-1] + bytes([b[-1] ^ 1]) for b in v[Key.CIPHERTEXT_LIST]]),
        ("failed", "failed at stage 'collect_masked_vectors'")),
}


@pytest.mark.parametrize("name", HOSTILE_STAGE_REPLIES)
def test_hostile_secagg_reply_is_dropped_with_its_reason_or_fails_the_round_never_a_wrong_sum(name):
    stage, change, (outcome, reason) = HOSTILE_STAGE_REPLIES[name]
    grid = HostileStageGrid(stage, change)
    result = secagg_train_round(grid, 1, GLOBAL, "{}", ALL_NEIGHBOURS, timeout=30)
    if outcome == "failed":
        assert result.mean_delta is None and reason in result.error, result.error
        return
    assert result.error is None, result.error
    assert list(result.rejected_nodes) == [HOSTILE] and result.rejected_nodes[HOSTILE].startswith(f"{stage}: ")
    assert reason in result.rejected_nodes[HOSTILE], result.rejected_nodes
    aggregated = [1, 2, 3, 4] if stage == Stage.UNMASK else [1, 2, 3]
    assert result.aggregated_nodes == aggregated and HOSTILE not in result.dropped_nodes
    assert max_error(result.mean_delta, fedavg_of([n - 1 for n in aggregated])) <= result.error_bound


def test_masked_values_beyond_the_modulus_are_refused():
    # 2**20 needs uint32 like 2**32 does: a value the sites' modular sum cannot produce fits the dtype.
    params = SecAggParams(num_shares=1.0, reconstruction_threshold=3, clipping_range=0.125, max_weight=64,
                          quantization_range=2**16, modulus_range=2**20)
    grid = HostileStageGrid(Stage.COLLECT_MASKED_VECTORS, _shifted_own_vector(1, 2**20))
    result = secagg_train_round(grid, 1, GLOBAL, "{}", params, timeout=30)
    assert result.error is None and result.aggregated_nodes == [1, 2, 3]
    assert "outside the modulus range [0, 1048576)" in result.rejected_nodes[HOSTILE]


def test_site_over_max_weight_drops_out_with_its_reason_and_the_rest_aggregate():
    grid = StageDropGrid(make_secagg_app(stub_train), 5)  # partition 4 has 100 examples > max_weight 64
    result = secagg_train_round(grid, 1, GLOBAL, "{}", PARAMS, timeout=30, node_ids=[1, 2, 5])
    assert result.error is None and result.aggregated_nodes == [1, 2]
    assert "max_weight" in result.dropped_nodes[5] and result.dropped_nodes[5].startswith("collect_masked_vectors")
    assert max_error(result.mean_delta, fedavg_of([0, 1])) <= result.error_bound


def stub_train_without_loss_at_partition_1(msg: Message, context: Context) -> Message:
    """stub_train, except that partition 1 reports no train-loss (the review case of issue 10, under SecAgg+)."""
    reply = stub_train(msg, context)
    if int(context.node_config["partition-id"]) == 1:
        del reply.content["metrics"]["train-loss"]
    return reply


class TamperingGrid(StageDropGrid):
    """StageDropGrid whose node `node` cuts the last array off its masked vector in the collect stage."""

    def __init__(self, client_app_, num_nodes, node):
        super().__init__(client_app_, num_nodes)
        self.node = node

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS) if not reply.has_error() else None
            if reply.metadata.src_node_id == self.node and configs and Key.MASKED_PARAMETERS in configs:
                configs[Key.MASKED_PARAMETERS] = configs[Key.MASKED_PARAMETERS][:-1]
        return replies


@pytest.mark.parametrize("grid_of, reason", [
    (lambda: StageDropGrid(make_secagg_app(stub_train_without_loss_at_partition_1), 4), "'train-loss' is missing"),
    (lambda: TamperingGrid(make_secagg_app(stub_train), 4, node=2), "masked vector must be 3 serialized arrays"),
], ids=["metrics", "masked-vector"])
def test_malformed_masked_vector_reply_is_rejected_and_the_others_aggregate(grid_of, reason):
    strategy = LoraDeltaStrategy(FedAvgAggregator(), min_train_nodes=4, min_available_nodes=4)
    config = ConfigRecord({client_app.RUN_CONFIG_KEY: "{}"})
    new_arrays, metrics = secure_train_round(strategy, grid_of(), 1, to_array_record(GLOBAL), config, PARAMS,
                                             timeout=30)
    ledger = strategy.ledger(1)
    # Node 2 (partition 1) is refused; its vector stays out of the sum, its masks are removed like a dropout's.
    assert sorted(ledger.accepted) == [1, 3, 4] and list(ledger.rejected) == [2] and reason in ledger.rejected[2]
    assert 2 not in ledger.failed
    expected = {k: GLOBAL[k] + v for k, v in fedavg_of([0, 2, 3]).items()}
    assert max_error(from_array_record(new_arrays), expected) <= secagg_error_bound(
        [8, 32, 24], PARAMS.clipping_range, Q, PARAMS.max_weight) + 1e-7
    assert metrics["num-examples"] == 8 + 32 + 24


def test_dropout_below_threshold_fails_cleanly_keeps_the_global_and_the_next_round_recovers(caplog):
    params = SecAggParams(num_shares=1.0, reconstruction_threshold=3, clipping_range=0.125, max_weight=64)
    grid = StageDropGrid(make_secagg_app(stub_train), 4,
                         drop_at={3: Stage.COLLECT_MASKED_VECTORS, 4: Stage.COLLECT_MASKED_VECTORS})
    strategy = LoraDeltaStrategy(FedAvgAggregator(), min_train_nodes=4, min_available_nodes=4)
    arrays = to_array_record(GLOBAL)
    config = ConfigRecord({client_app.RUN_CONFIG_KEY: "{}"})
    with caplog.at_level(logging.ERROR, logger="fedtune.server"):
        new_arrays, metrics = secure_train_round(strategy, grid, 1, arrays, config, params, timeout=30)
    assert new_arrays is None and metrics is None
    assert "failed at stage 'collect_masked_vectors'" in caplog.text and ">= 3 live" in caplog.text
    ledger = strategy.ledger(1)
    assert ledger.accepted == [] and sorted(ledger.failed) == [1, 2, 3, 4]

    grid.down_nodes.clear()
    grid.drop_at.clear()
    new_arrays, metrics = secure_train_round(strategy, grid, 2, arrays, config, params, timeout=30)
    expected = {k: GLOBAL[k] + v for k, v in fedavg_of([0, 1, 2, 3]).items()}
    bound = secagg_error_bound([8, 16, 32, 24], 0.125, Q, 64)
    assert max_error(from_array_record(new_arrays), expected) <= bound + 1e-7  # + float32 transport rounding
    assert metrics["num-examples"] == 80 and metrics["train-loss"] == pytest.approx((8 + 32 + 96 + 96) / 80)
    assert strategy.ledger(2).accepted == [1, 2, 3, 4] and strategy.ledger(2).per_site[1]["masked_bytes_up"] > 0


def test_direct_result_of_a_failed_round_has_no_aggregate():
    params = SecAggParams(num_shares=1.0, reconstruction_threshold=3, clipping_range=0.125, max_weight=64)
    grid = StageDropGrid(make_secagg_app(stub_train), 3, drop_at={2: Stage.SHARE_KEYS})
    result = secagg_train_round(grid, 7, GLOBAL, "{}", params, timeout=30)
    assert result.mean_delta is None and result.aggregated_nodes == [] and "round 7 failed at stage 'share_keys'" \
        in result.error and result.dropped_nodes == {2: "share_keys: no reply"}


def test_central_dp_clips_at_the_site_and_noises_only_the_sum():
    dp = CentralDP(CentralDPConfig(enabled=True, clip_norm=0.05, noise_multiplier=0.0), num_sites=3,
                   sites_per_round=3, rounds=2)
    grid = StageDropGrid(make_secagg_app(stub_train), 3)
    result = secagg_train_round(grid, 1, GLOBAL, "{}", PARAMS, timeout=30, central_dp=dp)
    assert result.error is None
    clipped = [clip_update(site_delta(p), 0.05)[0] for p in range(3)]
    # Uniform weights (every site weighs 1, max_weight 1), sum / expected sites; sigma = 0 here.
    expected = {k: sum(c[k] for c in clipped) / 3 for k in GLOBAL}
    assert result.weights == {1: 1.0, 2: 1.0, 3: 1.0}
    assert result.error_bound == pytest.approx(secagg_error_bound([1, 1, 1], 0.125, Q, 1.0))
    assert max_error(result.mean_delta, expected) <= result.error_bound
    assert max_error(fedavg_of([0, 1, 2]), expected) > 100 * result.error_bound
    assert dp.ledger.rounds == 1 and result.privacy_report["sensitivity"] == pytest.approx(
        0.05 + np.sqrt(14) * 2 * 0.125 / Q)
    # clipping_range must cover the clip norm, else SecAgg+ would cut coordinates of clipped updates.
    narrow = SecAggParams(num_shares=3, reconstruction_threshold=2, clipping_range=0.01, max_weight=64)
    assert "below the DP clip norm" in secagg_train_round(grid, 2, GLOBAL, "{}", narrow, 30, central_dp=dp).error


def test_error_bound_and_sensitivity_formulas():
    eps_term = 1 + 8 * np.finfo(np.float64).eps * Q
    # Exact weights: 2 c n / R with R = Q W / M.
    assert secagg_error_bound([8, 16, 32], 0.125, Q, 64) == pytest.approx(2 * 0.125 * 3 * 64 / (Q * 56) * eps_term)
    # M = 1000 does not divide w*Q: rounded weights add (n / R) * max|x|.
    r = [round(w / 1000 * Q) for w in (8, 16, 32)]
    assert secagg_error_bound([8, 16, 32], 0.125, Q, 1000, max_abs_update=0.1) == pytest.approx(
        2 * 0.125 * 3 / sum(r) * eps_term + 3 / sum(r) * 0.1)
    with pytest.raises(ValueError, match="rounds to 0"):
        secagg_error_bound([1, 5000], 0.125, 16, 5000)
    assert quantized_sensitivity(1.0, 100, 0.5, 1000) == pytest.approx(1.0 + 10 * 1.0 / 1000)


def test_site_upload_weight_clip_count_and_dp_clipping():
    delta = {KA: np.array([[0.1, -0.3]], np.float32)}
    update, weight, clipped = secagg_upload(delta, 32, max_weight=64, clipping_range=0.125)
    assert weight == 32 and clipped == 1 and update[KA].dtype == np.float64  # |0.5 * -0.3| > 0.125
    update, weight, clipped = secagg_upload(delta, 32, max_weight=1, clipping_range=0.125, dp_clip_norm=0.1)
    assert weight == 1 and clipped == 0
    np.testing.assert_allclose(np.linalg.norm(update[KA]), 0.1)
    with pytest.raises(ValueError, match="max_weight"):
        secagg_upload(delta, 65, max_weight=64, clipping_range=0.125)


def test_params_validation_and_aggregator_compatibility():
    for bad in (dict(num_shares=4), dict(num_shares=3, reconstruction_threshold=3),
                dict(quantization_range=2**31), dict(clipping_range=0.0), dict(max_weight=0.0)):
        with pytest.raises(ValueError):
            SecAggParams(**bad)
    assert SecAggParams(num_shares=1.0, reconstruction_threshold=0.5).resolve(5) == (5, 2)
    assert SecAggParams(num_shares=5, reconstruction_threshold=3).resolve(9) == (5, 3)
    check_secagg_aggregator("fedadam")
    with pytest.raises(ValueError, match="individual site updates"):
        check_secagg_aggregator(build_aggregator("median").name)
    grid = StageDropGrid(make_secagg_app(stub_train), 4)
    assert "wrap around" in secagg_train_round(grid, 1, GLOBAL, "{}", SecAggParams(
        quantization_range=2**30, modulus_range=2**32), 30).error


def test_plain_train_passes_through_unless_the_site_requires_secagg():
    app = make_secagg_app(stub_train)
    content = RecordDict({"arrays": to_array_record(GLOBAL), "config": ConfigRecord({client_app.RUN_CONFIG_KEY: "{}"})})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    reply = app(instruction(content, dst_node_id=1), context)
    np.testing.assert_array_equal(from_array_record(reply.content["arrays"])[KB], site_delta(0)[KB])
    strict = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3,
                                                       "require-secagg": True}, state=RecordDict(), run_config={})
    with pytest.raises(SiteRefusal, match="requires SecAgg\\+"):  # the worker sends it back as a refusal
        app(instruction(content, dst_node_id=1), strict)
    # A deployed site says it in its policy (the worker puts the policy into the node config).
    deployed = Context(run_id=1, node_id=1, node_config={"data-path": "x", NODE_POLICY_KEY: SitePolicy(
        require_secagg=True).to_json()}, state=RecordDict(), run_config={})
    with pytest.raises(SiteRefusal, match="requires SecAgg\\+"):
        app(instruction(content, dst_node_id=1), deployed)


def test_real_training_under_secagg_matches_plain_fedavg_of_the_same_deltas(make_cfg):
    # SecAgg+ masks the raw float delta (no upload codec), so the plain run uploads it raw too (fp32).
    cfg = make_cfg("federation.num_clients=3", "federation.upload_codec=fp32")
    start = initial_adapter(cfg.model, cfg.lora)
    run_config = run_config_to_json(cfg)
    plain = InProcessGrid(client_app.app, 3)
    replies = plain.send_and_receive([instruction(RecordDict({
        "arrays": to_array_record(start),
        "config": ConfigRecord({client_app.RUN_CONFIG_KEY: run_config, "server-round": 1})}), node)
        for node in (1, 2, 3)])
    deltas = [decode_upload(unpack_arrays(r.content["arrays"])) for r in replies]
    weights = [int(r.content["metrics"]["num-examples"]) for r in replies]
    expected = weighted_mean(deltas, weights)
    max_abs = max(float(np.abs(v).max()) for d in deltas for v in d.values())

    params = SecAggParams(num_shares=3, reconstruction_threshold=2, clipping_range=0.5, max_weight=64)
    assert max(weights) <= 64 and max_abs < 0.5
    result = secagg_train_round(StageDropGrid(secagg_app, 3), 1, start, run_config, params, timeout=60)
    assert result.error is None and result.total_examples == sum(weights)
    assert json.loads(run_config)["lora"]["r"] == cfg.lora.r
    assert max_error(result.mean_delta, expected) <= result.error_bound
    assert max(float(np.abs(v).max()) for v in expected.values()) > 100 * result.error_bound


BIG = {KA: np.zeros((4, 25_000), np.float32), KB: np.zeros((25_000, 4), np.float32)}


def big_stub_train(msg: Message, context: Context) -> Message:
    """A site whose delta is all zeros: without masks every quantized value would be the same integer."""
    delta = {k: np.zeros_like(v) for k, v in BIG.items()}
    return Message(RecordDict({"arrays": to_array_record(delta),
                               "metrics": MetricRecord({"num-examples": 8, "train-loss": 1.0})}), reply_to=msg)


def test_masked_vectors_the_coordinator_receives_are_indistinguishable_from_uniform():
    grid = StageDropGrid(make_secagg_app(big_stub_train), 3)
    result = secagg_train_round(grid, 1, BIG, "{}", PARAMS, timeout=60)
    assert result.error is None and result.aggregated_nodes == [1, 2, 3]
    assert max(float(np.abs(v).max()) for v in result.mean_delta.values()) <= result.error_bound
    received = [np.concatenate([bytes_to_ndarray(b).ravel() for b in r.content[RECORD_KEY_CONFIGS][
        Key.MASKED_PARAMETERS]]) for r in grid.replies
        if Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert len(received) == 3
    for vector in received:
        counts = np.bincount((vector.astype(np.int64) >> 24), minlength=256)  # top byte of each uint32
        expected = len(vector) / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 380, chi2  # 255 dof: mean 255, sd 22.6
    # Two sites' vectors are uncorrelated although their plaintexts are identical.
    assert abs(np.corrcoef(received[0].astype(np.float64), received[1].astype(np.float64))[0, 1]) < 0.02


def test_site_refuses_a_secagg_round_without_the_cryptographic_mask_scheme():
    from federation.secagg_masks import MASK_SCHEME_KEY

    import server.secagg as server_secagg

    class OldCoordinatorCollector(server_secagg._SecureSumCollector):
        def __init__(self, node_ids, fit_config, grid, run_id):
            super().__init__(node_ids, {k: v for k, v in fit_config.items() if k != MASK_SCHEME_KEY}, grid, run_id)

    original = server_secagg._SecureSumCollector
    server_secagg._SecureSumCollector = OldCoordinatorCollector
    try:
        grid = StageDropGrid(make_secagg_app(stub_train), 3)
        result = secagg_train_round(grid, 1, GLOBAL, "{}", PARAMS, timeout=30)
    finally:
        server_secagg._SecureSumCollector = original
    assert result.mean_delta is None and result.error
    assert all("mask scheme" in reason for reason in result.dropped_nodes.values()), result.dropped_nodes


def test_metrics_rows_of_a_secagg_run_carry_each_sites_data_fingerprint(make_cfg):
    """Provenance survives SecAgg+: every train row names each aggregated site's data fingerprint (sha256, count),
    the one that site computes for its own training data, as the plain path records it."""
    from pathlib import Path

    from client.task import data_fingerprint, get_runtime
    from server.app import run_federation

    cfg = make_cfg("privacy=secagg", "federation.num_clients=3", "federation.rounds=2",
                   "federation.evaluate_before_training=false", "strategy.fraction_evaluate=0.0")
    run_federation(InProcessGrid(client_app.app, 3), cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    runtime = get_runtime(cfg)
    expected = {str(node): data_fingerprint(runtime, cfg, Context(
        run_id=1, node_id=node, node_config={"partition-id": node - 1, "num-partitions": 3}, state=RecordDict(),
        run_config={})) for node in (1, 2, 3)}
    assert len({fp["sha256"] for fp in expected.values()}) == 3 and all(fp["examples"] > 0 for fp in expected.values())
    train_rows = [row for row in rows if row["round"] > 0]
    assert len(train_rows) == 2
    for row in train_rows:
        assert row["clients_ok"] == 3 and row["aggregated"]
        assert row["data_fingerprints"] == expected
