"""Coordinator restart: resume continues from the newest checkpoint, bit-identically."""

import json
from pathlib import Path

import numpy as np
import pytest

from client.app import app as client_app
from client.task import DP_STATE_KEY, ERROR_FEEDBACK_KEY
from client.site_state import SiteStateStore
from federation.store import GlobalAdapterStore, sha256_file
from server.app import run_federation
from simulations.inprocess import InProcessGrid
from strategies.registry import STRATEGIES

HETERO_STRATEGIES = [name for name, spec in STRATEGIES.items() if spec.mixed_ranks]


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


def _final_adapter_sha(run_dir) -> str:
    return sha256_file(Path(run_dir) / "global_adapter" / "adapter_model.safetensors")


def _digests(rows) -> dict[int, str]:
    return {row["round"]: row["adapter_digest"] for row in rows if row["round"] > 0}


class CrashBeforeCheckpoint(Exception):
    pass


# (strategy, rounds, clean stop after, crash in): the default strategy as in the issue; with one round less to keep
# the test short, SCAFFOLD (c_i at the sites), FedSA-LoRA (own B), FedAdam (server moments), and the frozen-update
# strategies, whose sites' frozen part stays in Context.state: the coordinator re-sends it to a site that reports
# fewer merged updates (a new Flower run starts at none). Evaluation is off: it cannot change the adapter.
RESUME_CASES = [("fedavg", 4, 2, 3), ("scaffold", 3, 1, 2), ("fedsa_lora", 3, 1, 2), ("fedadam", 3, 1, 2),
                ("flora", 3, 1, 2), ("flexlora", 3, 1, 2), ("fedex_lora", 3, 1, 2)]


@pytest.mark.parametrize("strategy, rounds, stop_after, crash_in", RESUME_CASES)
def test_resume_is_bit_identical_to_an_uninterrupted_run(make_cfg, tmp_path, monkeypatch, strategy, rounds,
                                                         stop_after, crash_in):
    """Default codec (bf16 + error feedback at the sites): a clean stop after a round, and a crash after the sites
    trained a round but before its checkpoint (their state had advanced a round further), both resume to the
    adapter of an uninterrupted run, bit for bit."""
    def cfg_for(name, run_rounds, *extra):
        cfg = make_cfg("federation.num_clients=2", f"federation.rounds={run_rounds}", f"strategy={strategy}",
                       "federation.evaluate_before_training=false", "strategy.fraction_evaluate=0.0", *extra)
        cfg.output_dir = str(tmp_path / name)
        return cfg

    def run(cfg):
        # A fresh grid is a fresh Flower run: Context.state starts empty, as after a coordinator restart.
        return run_federation(InProcessGrid(client_app, 2), cfg)

    full = cfg_for("uninterrupted", rounds)
    assert full.federation.upload_codec == "bf16" and full.federation.upload_error_feedback
    full_rows = run(full)
    assert len(_digests(full_rows)) == rounds

    stopped = cfg_for("stopped", stop_after)
    run(stopped)
    resumed_rows = run(cfg_for("stopped", rounds, "federation.resume=true"))
    assert [r["round"] for r in resumed_rows if r["round"] > stop_after] == list(range(stop_after + 1, rounds + 1))
    assert _digests(resumed_rows) == _digests(full_rows)
    assert _final_adapter_sha(stopped.output_dir) == _final_adapter_sha(full.output_dir)

    crashed = cfg_for("crashed", rounds)
    real_save = GlobalAdapterStore.save

    def crash_before_checkpoint(self, server_round, *args, **kwargs):
        if server_round == crash_in:
            raise CrashBeforeCheckpoint()
        return real_save(self, server_round, *args, **kwargs)

    monkeypatch.setattr(GlobalAdapterStore, "save", crash_before_checkpoint)
    with pytest.raises(CrashBeforeCheckpoint):
        run(crashed)
    monkeypatch.setattr(GlobalAdapterStore, "save", real_save)
    store = GlobalAdapterStore(crashed.output_dir)
    assert store.latest()[0] == crash_in - 1
    # The sites trained the crashed round and saved the state they would enter the next one with (FLoRA/FlexLoRA
    # sites train a fresh LoRA of their own rank every round: no error feedback, no round state).
    for partition in (0, 1) if strategy not in HETERO_STRATEGIES else ():
        site = SiteStateStore(Path(crashed.output_dir) / "sites" / f"partition-{partition}", store.federation_run_id())
        assert site.rounds(ERROR_FEEDBACK_KEY)[-1] == crash_in + 1
    rerun_rows = run(cfg_for("crashed", rounds, "federation.resume=true"))
    assert _digests(rerun_rows) == _digests(full_rows)
    assert _final_adapter_sha(crashed.output_dir) == _final_adapter_sha(full.output_dir)


def test_replies_are_summed_in_a_fixed_order_whatever_order_they_arrive_in():
    """Float sums depend on their order: (1e20 + 1) - 1e20 = 0 but (1e20 - 1e20) + 1 = 1. The coordinator sorts the
    replies by (partition id, node id) before it sums, so every arrival order gives the same bytes."""
    from itertools import permutations

    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from federation.adapter import from_array_record, to_array_record
    from server.strategy import LoraDeltaStrategy
    from strategies.aggregators import FedAvgAggregator
    from tests.flower_messages import instruction, reply

    key_a, key_b = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
    global_adapter = {key_a: np.zeros((1, 2), np.float32), key_b: np.zeros((2, 1), np.float32)}
    # node id -> (partition id, first value of its delta); node ids run against the partition order
    sites = {30: (0, 1e20), 10: (1, 1.0), 20: (2, -1e20)}

    def train_reply(node):
        partition, value = sites[node]
        delta = {key_a: np.array([[value, 0.0]], np.float32), key_b: np.zeros((2, 1), np.float32)}
        sent = instruction(RecordDict({"arrays": to_array_record(global_adapter)}), dst_node_id=node)
        return reply(sent, RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in delta.items()}),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0, "train-tokens": 5,
                                     "tokens-per-second": 1.0, "partition-id": partition})}))

    results, accepted = set(), set()
    for order in permutations(sites):
        strategy = LoraDeltaStrategy(FedAvgAggregator(), min_train_nodes=1, min_available_nodes=1)
        strategy.current_global = {k: v.copy() for k, v in global_adapter.items()}
        arrays, _ = strategy.aggregate_train(1, [train_reply(node) for node in order])
        results.add(from_array_record(arrays)[key_a].tobytes())
        accepted.add(tuple(strategy.ledger(1).accepted))
    assert accepted == {(30, 10, 20)}  # by partition id, not node id
    assert len(results) == 1


def test_dp_sgd_accountant_history_survives_a_restart(make_cfg, tmp_path):
    """Epsilon accumulates across a coordinator restart: after a resume the sites report the uninterrupted run's
    epsilon (the accountant depends on the steps taken, not on the noise values, which are not reproducible)."""
    def run(name, rounds, *extra):
        cfg = make_cfg("privacy=dp_sgd", "privacy.local_dp_sgd.noise_multiplier=1.0", "federation.num_clients=2",
                       f"federation.rounds={rounds}", "federation.evaluate_before_training=false",
                       "strategy.fraction_evaluate=0.0", *extra)
        cfg.output_dir = str(tmp_path / name)
        return run_federation(InProcessGrid(client_app, 2), cfg)

    full = [r["local_dp_epsilon"] for r in run("uninterrupted", 2)]
    run("resumed", 1)
    resumed = [r["local_dp_epsilon"] for r in run("resumed", 2, "federation.resume=true")]
    assert full[1] > full[0] > 0
    assert resumed[-1] == pytest.approx(full[1], rel=1e-12)


def test_sites_keep_round_state_under_secagg_too(make_cfg, tmp_path, monkeypatch):
    """SecAgg+ rounds carry the federation run id to the sites' training as well (not bit-identical: Flower's
    quantization rounds stochastically, but a DP-SGD accountant survives a restart). SecAgg+ masks the raw
    delta: no upload codec, so no error-feedback state either."""
    from federation.compression import UploadCodec

    def no_codec(*args, **kwargs):
        raise AssertionError("SecAgg+ must mask the raw delta, not an encoded one")

    monkeypatch.setattr(UploadCodec, "encode", no_codec)
    cfg = make_cfg("privacy=secagg", "privacy.local_dp_sgd.enabled=true", "privacy.local_dp_sgd.noise_multiplier=1.0",
                   "federation.num_clients=3", "federation.rounds=1",
                   "federation.evaluate_before_training=false", "strategy.fraction_evaluate=0.0")
    rows = run_federation(InProcessGrid(client_app, 3), cfg)
    assert rows[-1]["clients_ok"] == 3
    run_id = GlobalAdapterStore(cfg.output_dir).federation_run_id()
    for partition in range(3):
        site = SiteStateStore(Path(cfg.output_dir) / "sites" / f"partition-{partition}", run_id)
        assert site.rounds(DP_STATE_KEY) == [2]
        assert site.rounds(ERROR_FEEDBACK_KEY) == []
