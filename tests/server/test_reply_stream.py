"""The coordinator folds train replies as they arrive: same result as the batch aggregation, bad replies skipped."""

import logging
import weakref
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from federation.adapter import from_array_record, to_array_record
from server.reply_stream import replies_as_they_arrive
from server.strategy import LoraDeltaStrategy, reply_order
from server.replies import sent_to
from strategies.aggregators import FedAdamAggregator, FedAvgAggregator, build_aggregator
from tests.flower_messages import instruction, reply

KA = "m.q_proj.lora_A.weight"
KB = "m.q_proj.lora_B.weight"
GLOBAL = {KA: np.full((4, 16), 0.5, np.float32), KB: np.zeros((16, 4), np.float32)}


def _delta(rng):
    return {KA: (1e-3 * rng.standard_normal((4, 16))).astype(np.float32),
            KB: (1e-3 * rng.standard_normal((16, 4))).astype(np.float32)}


def _train_reply(sent: Message, delta: dict, examples: int, partition: int) -> Message:
    return reply(sent, RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in delta.items()}),
                                   "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0,
                                                            "partition-id": partition})}))


def _round(n, seed=0, malformed=()):
    """(sent messages, their replies in reply_order): node 10+i holds partition n-1-i; `malformed` indices get NaN."""
    rng = np.random.default_rng(seed)
    sent, replies = [], []
    for i in range(n):
        msg = instruction(RecordDict({"arrays": to_array_record(GLOBAL)}), dst_node_id=10 + i)
        msg.metadata.__dict__["_message_id"] = f"m{i}"
        delta = _delta(rng)
        if i in malformed:
            delta[KB][3, 1] = np.nan
        sent.append(msg)
        replies.append(_train_reply(msg, delta, int(rng.integers(1, 500)), n - 1 - i))
    destinations = sent_to(sent)
    return sent, sorted(replies, key=lambda m: reply_order(m, destinations))


def _decoded(msg):
    return {k: v.numpy() for k, v in msg.content["arrays"].items()}


def _strategy(aggregator, sent):
    s = LoraDeltaStrategy(aggregator, min_train_nodes=1, min_available_nodes=1)
    s.current_global = {k: v.copy() for k, v in GLOBAL.items()}
    s._sent = sent
    return s


@pytest.mark.parametrize("make_aggregator", [FedAvgAggregator, lambda: FedAdamAggregator(eta=0.1)],
                         ids=["fedavg", "fedadam"])
@pytest.mark.parametrize("accumulator", ["float32", "float64", "kahan32"])
def test_streamed_result_equals_the_batch_aggregation_bit_for_bit(make_aggregator, accumulator):
    sent, replies = _round(12)
    batch, streamed = _strategy(make_aggregator(), sent), _strategy(make_aggregator(), sent)
    batch.accumulator = streamed.accumulator = accumulator
    for server_round in (1, 2):  # round 2: FedAdam steps from its round-1 moments
        arrays_b, metrics_b = batch.aggregate_train(server_round, list(reversed(replies)))  # it sorts them itself
        arrays_s, metrics_s = streamed.aggregate_train_as_they_arrive(server_round, iter(replies))
        for key, value in from_array_record(arrays_b).items():
            assert from_array_record(arrays_s)[key].tobytes() == value.tobytes()
        assert dict(metrics_s) == dict(metrics_b)
        assert streamed.ledger(server_round).accepted == batch.ledger(server_round).accepted
        batch.current_global = streamed.current_global = from_array_record(arrays_b)
    if isinstance(batch.aggregator, FedAdamAggregator):
        assert batch.aggregator.state_dict().keys() == streamed.aggregator.state_dict().keys()
        for key, value in batch.aggregator.state_dict().items():
            np.testing.assert_array_equal(streamed.aggregator.state_dict()[key], value)


def test_another_arrival_order_agrees_to_float32_rounding():
    """Arrival order is the summation order of the running sum: another order may move the last bits only."""
    sent, replies = _round(40, seed=3)
    in_order = from_array_record(_strategy(FedAvgAggregator(), sent).aggregate_train_as_they_arrive(1, iter(replies))[0])
    shuffled = [replies[i] for i in np.random.default_rng(1).permutation(len(replies))]
    other = from_array_record(_strategy(FedAvgAggregator(), sent).aggregate_train_as_they_arrive(1, iter(shuffled))[0])
    # Bound: float32 rounding of each running-sum step (n steps, each <= 2^-24 of the sum's scale), plus one ulp
    # of the stored adapter.
    scale = max(float(np.max(np.abs(d[k]))) for d in map(_decoded, replies) for k in d)
    differs = 0
    for key in in_order:
        bound = np.spacing(np.abs(in_order[key])) + len(replies) * 2.0**-24 * scale
        assert np.all(np.abs(other[key].astype(np.float64) - in_order[key]) <= bound)
        differs += int(np.sum(other[key] != in_order[key]))
    assert differs > 0  # not bit for bit: the reason aggregate_train (and a reproducible re-run) keeps one order


class TrickleGrid:
    """A grid whose replies become available one per poll, and which records what the strategy had already folded
    (and which earlier replies were still alive: freed by reference counting, no collector run) whenever the
    coordinator pulls."""

    def __init__(self, replies_by_id, strategy):
        self.pending = list(replies_by_id.items())
        self.available: dict[str, Message] = {}
        self.strategy = strategy
        self.handed: list[weakref.ref] = []
        self.seen_at_pull: list[tuple[int, int]] = []  # (replies handed out, replies the ledger had taken)

    def push_messages(self, messages):
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        ledger = self.strategy.ledger(1)
        self.seen_at_pull.append((len(self.handed), len(ledger.accepted) + len(ledger.rejected) + len(ledger.failed),
                                  sum(ref() is not None for ref in self.handed)))
        if self.pending and not self.available:
            message_id, msg = self.pending.pop(0)
            self.available[message_id] = msg
        out = [self.available.pop(i) for i in message_ids if i in self.available]
        self.handed += [weakref.ref(m) for m in out]
        return out


def test_a_malformed_reply_mid_stream_is_rejected_and_the_rest_folded_as_they_arrive(caplog):
    sent, replies = _round(7, seed=5, malformed={3})
    bad_node = 13
    failed = Message(Error(code=0, reason="site crashed"), reply_to=sent[5])
    # Delivered in reply_order (the good ones' fixed order), the failed reply in node 15's place.
    arrival = {m.metadata.reply_to_message_id: (failed if m.metadata.reply_to_message_id == "m5" else m)
               for m in replies}
    good = [m for m in replies if m.metadata.reply_to_message_id not in ("m3", "m5")]
    expected = from_array_record(_strategy(FedAvgAggregator(), sent).aggregate_train(1, good)[0])

    strategy = _strategy(FedAvgAggregator(), sent)
    grid = TrickleGrid(arrival, strategy)
    del replies, good, arrival, failed
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        arrays, _ = strategy.aggregate_train_as_they_arrive(
            1, replies_as_they_arrive(grid, sent, timeout=10.0, pull_interval=0.0, pull_batch=1))
    ledger = strategy.ledger(1)
    assert list(ledger.rejected) == [bad_node] and "non-finite" in ledger.rejected[bad_node].lower()
    assert list(ledger.failed) == [15]
    assert sorted(ledger.accepted) == [10, 11, 12, 14, 16]
    assert any("REJECTED update from node 13" in r.message for r in caplog.records)
    # Each reply was taken (folded or refused) before the next pull, and no earlier reply was still alive.
    assert all(taken == handed for handed, taken, _ in grid.seen_at_pull)
    assert all(alive == 0 for *_, alive in grid.seen_at_pull)
    # The 5 good replies arrived in reply_order with the bad ones between: the same bytes as the batch of them.
    out = from_array_record(arrays)
    for key in expected:
        assert out[key].tobytes() == expected[key].tobytes()


class PollGrid:
    """Replies become available after a number of polls each; one of them never does."""

    def __init__(self, replies_by_id, ready_after):
        self.replies, self.ready_after, self.polls = replies_by_id, ready_after, 0
        self.pulls: list[list[str]] = []

    def push_messages(self, messages):
        return [m.metadata.message_id for m in messages] + [""]  # a message the grid could not push

    def pull_messages(self, message_ids):
        self.polls += 1
        ids = list(message_ids)
        self.pulls.append(ids)
        return [self.replies.pop(i) for i in ids if i in self.replies and self.polls >= self.ready_after[i]]


def test_replies_are_pulled_a_few_ids_at_a_time_and_the_wait_ends_at_the_timeout():
    sent, replies = _round(5)
    by_id = {m.metadata.reply_to_message_id: m for m in replies}
    del by_id["m4"]  # never answers
    grid = PollGrid(by_id, {"m0": 1, "m1": 1, "m2": 6, "m3": 9})
    got = [m.metadata.reply_to_message_id for m in
           replies_as_they_arrive(grid, sent, timeout=0.3, pull_interval=0.01, pull_batch=2)]
    assert sorted(got) == ["m0", "m1", "m2", "m3"]
    assert all(len(ids) <= 2 for ids in grid.pulls)
    assert ["m4"] in grid.pulls[-3:]  # still asked for until the deadline
    with pytest.raises(ValueError, match="pull_batch"):
        next(replies_as_they_arrive(grid, sent, timeout=0.1, pull_batch=0))


@pytest.mark.parametrize("method", ["median", "krum"])
def test_robust_aggregators_keep_updates_on_disk_above_the_budget_with_the_same_result(method, tmp_path):
    sent, replies = _round(6, seed=7)
    params = {"num_malicious": 1} if method == "krum" else {}
    in_ram = _strategy(build_aggregator(method, dict(params)), sent)
    on_disk = _strategy(build_aggregator(method, dict(params)), sent)
    on_disk.updates_ram_budget_bytes, on_disk.spill_dir = 2 * 4 * 128, str(tmp_path)  # room for two updates
    written = []
    real_memmap = np.memmap

    def recording_memmap(path, *args, **kwargs):
        written.append(Path(path))
        return real_memmap(path, *args, **kwargs)

    np.memmap = recording_memmap
    try:
        shuffled = [replies[i] for i in (4, 0, 5, 2, 1, 3)]
        disk_out = from_array_record(on_disk.aggregate_train_as_they_arrive(1, iter(shuffled))[0])
    finally:
        np.memmap = real_memmap
    ram_out = from_array_record(in_ram.aggregate_train(1, replies)[0])
    assert len({p for p in written}) == 4  # 6 updates, 2 within the budget
    assert all(p.parent.parent == tmp_path for p in written)
    assert not any(tmp_path.iterdir())  # removed after the round
    for key in ram_out:
        assert disk_out[key].tobytes() == ram_out[key].tobytes()


class ShuffledGrid:
    """Replies become available in a given arrival order, one more per pull; `never` ids never arrive."""

    def __init__(self, replies_by_id, arrival, never=()):
        self.replies, self.arrival, self.never = replies_by_id, list(arrival), set(never)
        self.available: set[str] = set()

    def push_messages(self, messages):
        self.pushed_to = [m.metadata.dst_node_id for m in messages]
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        while self.arrival and self.arrival[0] in self.never:
            self.arrival.pop(0)
        if self.arrival:
            self.available.add(self.arrival.pop(0))
        return [self.replies.pop(i) for i in message_ids if i in self.available and i in self.replies]


def test_fixed_fold_order_gives_the_same_adapter_bit_for_bit_whatever_the_arrival_order():
    """federation.fold_order=fixed: the replies are taken in node id order however the sites finish, so a re-run or
    a resumed run folds the same sum (with arrival order, a different order differs in the last float bits)."""
    from server.reply_stream import replies_in_order

    results = []
    for arrival_seed in (0, 1, 2):
        sent, replies = _round(9, seed=3)
        by_id = {m.metadata.reply_to_message_id: m for m in replies}
        arrival = list(by_id)
        np.random.default_rng(arrival_seed).shuffle(arrival)
        grid = ShuffledGrid(by_id, arrival)
        strategy = _strategy(FedAvgAggregator(), sent)
        arrays, _ = strategy.aggregate_train_as_they_arrive(
            1, replies_in_order(grid, list(reversed(sent)), timeout=None, pull_interval=0.0))
        assert grid.pushed_to == sorted(grid.pushed_to)
        results.append({k: v.tobytes() for k, v in from_array_record(arrays).items()})
    assert results[0] == results[1] == results[2]


def test_fixed_fold_order_still_takes_the_replies_that_came_when_one_site_never_answers():
    from server.reply_stream import replies_in_order

    sent, replies = _round(5, seed=4)
    by_id = {m.metadata.reply_to_message_id: m for m in replies}
    grid = ShuffledGrid(by_id, reversed(list(by_id)), never={"m0"})  # the first in node order never answers
    got = list(replies_in_order(grid, sent, timeout=0.05, pull_interval=0.01))
    assert [m.metadata.reply_to_message_id for m in got] == ["m1", "m2", "m3", "m4"]
