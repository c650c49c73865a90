"""A DP-SGD site as the coordinator sees it: its upload cannot be replayed, its budget is never overrun."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

import client.app as client_app
from federation.packing import unpack_arrays
from client.trainer import planned_steps
from federation.adapter import to_array_record
from federation.compression import decode_upload
from federation.config import run_config_to_json
from federation.model import initial_adapter
from tests.flower_messages import instruction

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _train_message(cfg, arrays, server_round=1):
    content = RecordDict({"arrays": to_array_record(arrays),
                          "config": ConfigRecord({client_app.RUN_CONFIG_KEY: run_config_to_json(cfg),
                                                  "server-round": server_round})})
    return instruction(content, dst_node_id=7)


def _context(partition_id=1):
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition_id, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def _upload(reply) -> dict[str, np.ndarray]:
    return decode_upload(unpack_arrays(reply.content["arrays"]))


def _replay_twice(cfg):
    """The coordinator's replay: same config and seeds, round, partition and global adapter, a fresh site state."""
    global_adapter = initial_adapter(cfg.model, cfg.lora)
    return [_upload(client_app.train(_train_message(cfg, global_adapter, server_round=3), _context()))
            for _ in range(2)]


def test_a_dp_sgd_site_replayed_with_everything_the_coordinator_knows_uploads_something_else(make_cfg):
    first, second = _replay_twice(make_cfg("privacy=dp_sgd"))
    assert first.keys() == second.keys()
    assert any(not np.array_equal(first[key], second[key]) for key in first)


def test_a_site_without_dp_replayed_twice_uploads_the_same_bits(make_cfg):
    first, second = _replay_twice(make_cfg())
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[key], second[key]) for key in first)


def test_dp_sgd_with_local_epochs_ends_within_the_target_epsilon(make_cfg):
    target, rounds = 3.0, 2
    cfg = make_cfg("privacy=dp_sgd", f"privacy.local_dp_sgd.target_epsilon={target}", "train.local_epochs=1",
                   f"federation.rounds={rounds}")
    global_adapter = initial_adapter(cfg.model, cfg.lora)
    context = _context()
    epsilons, steps = [], []
    for server_round in range(1, rounds + 1):
        metrics = client_app.train(_train_message(cfg, global_adapter, server_round), context).content["metrics"]
        epsilons.append(metrics["dp-sgd-epsilon"])
        steps.append(metrics["train-steps"])
    # The epochs really run more steps than train.local_steps, which the budget used to be calibrated for.
    assert steps[0] == steps[1] > cfg.train.local_steps
    num_examples = int(metrics["num-examples"])
    assert steps[0] == planned_steps(cfg.train, num_examples)
    assert epsilons[0] < epsilons[1] <= target
    assert epsilons[1] > 0.95 * target  # calibrated for these steps, not far more
