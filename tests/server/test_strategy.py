import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict, Error, Message

from federation.adapter import from_array_record, to_array_record
from server.strategy import LoraDeltaStrategy
from strategies.aggregators import FedAvgAggregator
from tests.flower_messages import instruction, reply

KA = "m.q_proj.lora_A.weight"
KB = "m.q_proj.lora_B.weight"
GLOBAL = {KA: np.array([[1.0, 1.0]], np.float32), KB: np.array([[0.0], [0.0]], np.float32)}


def _train_reply(node: int, delta: dict, n: int = 10) -> Message:
    msg = instruction(RecordDict({"arrays": to_array_record(GLOBAL)}), dst_node_id=node)
    return reply(msg, RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in delta.items()}),
                                  "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0,
                                                           "train-tokens": 5, "tokens-per-second": 1.0})}))


def _strategy():
    s = LoraDeltaStrategy(FedAvgAggregator(), min_train_nodes=1, min_available_nodes=1)
    s.current_global = {k: v.copy() for k, v in GLOBAL.items()}
    return s


def test_bad_updates_are_rejected_logged_and_never_aggregated(caplog):
    good1 = {KA: np.array([[1.0, 0.0]], np.float32), KB: np.array([[2.0], [0.0]], np.float32)}
    good2 = {KA: np.array([[3.0, 0.0]], np.float32), KB: np.array([[0.0], [2.0]], np.float32)}
    nan = {KA: np.array([[np.nan, 0.0]], np.float32), KB: np.zeros((2, 1), np.float32)}
    inf = {KA: np.zeros((1, 2), np.float32), KB: np.array([[np.inf], [0.0]], np.float32)}
    wrong_shape = {KA: np.zeros((2, 2), np.float32), KB: np.zeros((2, 1), np.float32)}
    wrong_keys = {KA: np.zeros((1, 2), np.float32), "m.base_layer.weight": np.zeros((2, 2), np.float32)}
    failed = Message(Error(code=0, reason="site crashed"),
                     reply_to=instruction(RecordDict({"arrays": to_array_record(GLOBAL)}), dst_node_id=9))
    replies = [_train_reply(1, good1, 10), _train_reply(2, good2, 30), _train_reply(3, nan, 1000),
               _train_reply(4, inf, 1000), _train_reply(5, wrong_shape, 1000), _train_reply(6, wrong_keys, 1000),
               _train_reply(7, good1, 0), failed]
    s = _strategy()
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        arrays, metrics = s.aggregate_train(1, replies)
    new = from_array_record(arrays)
    # Only nodes 1 and 2, weights 10:30.
    np.testing.assert_allclose(new[KA], [[1 + 0.25 * 1 + 0.75 * 3, 1.0]])
    np.testing.assert_allclose(new[KB], [[0.5], [1.5]])
    ledger = s.ledger(1)
    assert ledger.accepted == [1, 2]
    assert sorted(ledger.rejected) == [3, 4, 5, 6, 7]
    assert "NaN" in ledger.rejected[3] and "shape" in ledger.rejected[5] and "keys" in ledger.rejected[6]
    assert ledger.failed == {9: "site crashed"}
    assert "REJECTED update from node 3" in caplog.text
    assert metrics["num-examples"] == 40


@pytest.mark.parametrize("aggregator", ["fedavg", "fedadam"])
def test_mean_based_aggregators_stream_and_match_the_all_in_memory_result(monkeypatch, aggregator):
    """FedAvg/server optimizers get a running sum (no list of deltas), with the result of aggregate() on the list."""
    import strategies.aggregators as aggregators

    rng = np.random.default_rng(0)
    deltas = [{KA: rng.standard_normal((1, 2)).astype(np.float32), KB: rng.standard_normal((2, 1)).astype(np.float32)}
              for _ in range(5)]
    counts = [10, 20, 5, 40, 25]
    build = {"fedavg": aggregators.FedAvgAggregator, "fedadam": aggregators.FedAdamAggregator}[aggregator]
    expected = build().aggregate(GLOBAL, deltas, [float(c) for c in counts], [str(i) for i in range(5)])

    def no_list_mean(*args, **kwargs):
        raise AssertionError("the streaming path must not build the list of deltas for weighted_mean")

    monkeypatch.setattr(aggregators, "weighted_mean", no_list_mean)
    s = LoraDeltaStrategy(build(), min_train_nodes=1, min_available_nodes=1)
    s.current_global = {k: v.copy() for k, v in GLOBAL.items()}
    arrays, _ = s.aggregate_train(1, [_train_reply(i + 1, d, n) for i, (d, n) in enumerate(zip(deltas, counts))])
    new = from_array_record(arrays)
    for key in GLOBAL:
        np.testing.assert_allclose(new[key], expected[key], rtol=1e-6, atol=1e-7)


def test_round_with_only_bad_updates_keeps_global():
    s = _strategy()
    nan = {KA: np.array([[np.nan, 0.0]], np.float32), KB: np.zeros((2, 1), np.float32)}
    arrays, metrics = s.aggregate_train(1, [_train_reply(1, nan)])
    assert arrays is None and metrics is None


def test_eval_loss_is_token_weighted_union():
    s = _strategy()
    msgs = []
    for node, loss, tokens in [(1, 2.0, 10), (2, 4.0, 30)]:
        ins = instruction(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="evaluate")
        msgs.append(reply(ins, RecordDict({"metrics": MetricRecord(
            {"eval-loss": loss, "eval-tokens": tokens, "num-examples": 3})})))
    out = s.aggregate_evaluate(1, msgs)
    assert out["eval-loss"] == pytest.approx((2.0 * 10 + 4.0 * 30) / 40)
    assert out["eval-tokens"] == 40


def test_review_case_reply_without_train_loss_is_rejected_and_the_round_goes_on(caplog):
    """Outside review (issue 10): a train reply lacking train-loss ended the whole run with a KeyError."""
    good1 = {KA: np.array([[1.0, 0.0]], np.float32), KB: np.array([[2.0], [0.0]], np.float32)}
    good2 = {KA: np.array([[3.0, 0.0]], np.float32), KB: np.array([[0.0], [2.0]], np.float32)}
    no_loss = _train_reply(3, good1, 1000)
    del no_loss.content["metrics"]["train-loss"]
    s = _strategy()
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        arrays, metrics = s.aggregate_train(1, [_train_reply(1, good1, 10), no_loss, _train_reply(2, good2, 30)])
    ledger = s.ledger(1)
    assert ledger.accepted == [1, 2] and list(ledger.rejected) == [3]
    assert ledger.rejected[3] == "metric 'train-loss' is missing"
    assert "REJECTED update from node 3" in caplog.text
    np.testing.assert_allclose(from_array_record(arrays)[KA], [[1 + 0.25 * 1 + 0.75 * 3, 1.0]])
    assert metrics["train-loss"] == 1.0 and metrics["num-examples"] == 40


def test_optional_metrics_are_dropped_when_malformed_and_kept_when_numbers():
    reply_ = _train_reply(1, {KA: np.zeros((1, 2), np.float32), KB: np.zeros((2, 1), np.float32)})
    reply_.content["metrics"]["train-tokens"] = -5  # malformed optional metric: ignored
    reply_.content["metrics"]["site-note"] = [1.0, 2.0]  # unknown and not a number: ignored
    reply_.content["metrics"]["site-speed"] = 2.5  # unknown number: kept for the per-site report
    s = _strategy()
    s.aggregate_train(1, [reply_])
    assert s.ledger(1).accepted == [1]
    site = s.ledger(1).per_site[1]
    assert "train-tokens" not in site and "site-note" not in site and site["site-speed"] == 2.5


def test_accepted_updates_the_aggregator_cannot_combine_fail_the_round_not_the_coordinator(caplog):
    from strategies.aggregators import build_aggregator

    s = LoraDeltaStrategy(build_aggregator("multi_krum", {"num_malicious": 1, "multi_k": 2}), min_train_nodes=1,
                          min_available_nodes=1)
    s.current_global = {k: v.copy() for k, v in GLOBAL.items()}
    bad = _train_reply(2, {KA: np.zeros((1, 2), np.float32), KB: np.zeros((2, 1), np.float32)}, n=0)
    with caplog.at_level(logging.ERROR, logger="fedtune.server"):
        arrays, metrics = s.aggregate_train(1, [_train_reply(1, {k: np.ones_like(v) for k, v in GLOBAL.items()}),
                                                bad])
    assert arrays is None and metrics is None
    ledger = s.ledger(1)
    assert ledger.accepted == [1] and "num-examples" in ledger.rejected[2]
    assert "Krum needs at least 2 updates" in ledger.aggregation_error and "could not be aggregated" in caplog.text


def test_malformed_and_failed_evaluations_are_recorded_and_left_out_of_the_union_loss():
    s = _strategy()
    msgs = []
    for node, metrics in [(1, {"eval-loss": 2.0, "eval-tokens": 10, "num-examples": 3}),
                          (2, {"eval-tokens": 30, "num-examples": 3}),  # no eval-loss
                          (3, {"eval-loss": float("nan"), "eval-tokens": 30, "num-examples": 3}),
                          (4, {"eval-loss": 1.0, "eval-tokens": 0, "num-examples": 3})]:
        ins = instruction(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="evaluate")
        msgs.append(reply(ins, RecordDict({"metrics": MetricRecord(metrics)})))
    ins = instruction(RecordDict({"config": ConfigRecord({})}), dst_node_id=5, message_type="evaluate")
    msgs.append(Message(Error(code=0, reason="out of memory"), reply_to=ins))
    out = s.aggregate_evaluate(1, msgs)
    assert out["eval-loss"] == 2.0 and out["eval-tokens"] == 10
    ledger = s.ledger(1)
    assert ledger.eval_ok == [1] and ledger.eval_failed == {5: "out of memory"}
    assert ledger.eval_rejected == {2: "metric 'eval-loss' is missing",
                                    3: "metric 'eval-loss' must be a finite number >= 0, got nan",
                                    4: "metric 'eval-tokens' must be a whole number >= 1, got 0"}


def _eval_reply(node: int, metrics: dict, records: int = 1) -> Message:
    """An evaluate reply of `records` MetricRecords holding `metrics` (Flower's type checks bypassed, as a hostile
    site can)."""
    ins = instruction(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="evaluate")
    content = RecordDict()
    for index in range(records):
        record = MetricRecord()
        record.__dict__["_data"].update(metrics)
        content[f"metrics-{index}"] = record
    return reply(ins, content)


HONEST_EVAL = {"eval-loss": 2.0, "eval-tokens": 10, "num-examples": 3}
HOSTILE_EVALS = {
    "inf loss": ({**HONEST_EVAL, "eval-loss": float("inf")}, 1, "'eval-loss' must be a finite number >= 0, got inf"),
    "negative loss": ({**HONEST_EVAL, "eval-loss": -1.0}, 1, "'eval-loss' must be a finite number >= 0, got -1.0"),
    "loss as text": ({**HONEST_EVAL, "eval-loss": "0.1"}, 1, "must be a finite number >= 0, got str '0.1'"),
    "negative examples": ({**HONEST_EVAL, "num-examples": -5}, 1, "'num-examples' must be a whole number >= 1, got -5"),
    "enormous examples": ({**HONEST_EVAL, "num-examples": 2**64}, 1, "of at most 2**53, got an int of 65 bits"),
    "tokens as a list": ({**HONEST_EVAL, "eval-tokens": [10, 10]}, 1,
                         "'eval-tokens' must be a whole number >= 1, got list"),
    "no tokens": ({"eval-loss": 2.0, "num-examples": 3}, 1, "metric 'eval-tokens' is missing"),
    "two records": (HONEST_EVAL, 2, "exactly one MetricRecord and no ArrayRecord, got 2 and 0"),
    "thousands of metrics": ({**HONEST_EVAL, **{f"m{i}": 1.0 for i in range(10_000)}}, 1,
                             "10003 metrics, more than the 64 a reply may carry"),
}


@pytest.mark.parametrize("kind", HOSTILE_EVALS)
def test_hostile_evaluation_is_rejected_with_its_reason_and_the_union_is_the_honest_sites(kind):
    metrics, records, reason = HOSTILE_EVALS[kind]
    s = _strategy()
    out = s.aggregate_evaluate(1, [_eval_reply(1, HONEST_EVAL), _eval_reply(2, metrics, records),
                                   _eval_reply(3, {**HONEST_EVAL, "eval-loss": 4.0, "eval-tokens": 30})])
    ledger = s.ledger(1)
    assert ledger.eval_ok == [1, 3] and list(ledger.eval_rejected) == [2] and 2 not in ledger.eval_per_site
    assert reason in ledger.eval_rejected[2], ledger.eval_rejected[2]
    assert out["eval-loss"] == pytest.approx((2.0 * 10 + 4.0 * 30) / 40) and out["num-examples"] == 6


def test_claims_whose_weighted_sum_overflows_still_give_a_finite_union_and_train_mean():
    from server.strategy import weighted_metrics

    s = _strategy()
    huge = {"eval-loss": 1e308, "eval-tokens": 2**53, "num-examples": 2**53, "eval-generated": 2**53,
            "eval-exact-match": 1.0, "eval-token-f1": 1.0, "eval-rouge-l": 1.0}
    out = s.aggregate_evaluate(1, [_eval_reply(1, HONEST_EVAL), _eval_reply(2, huge), _eval_reply(3, huge)])
    assert s.ledger(1).eval_ok == [1, 2, 3]  # every claim is within the rules: the union reflects them, finitely
    assert np.isfinite(out["eval-loss"]) and 1e307 < out["eval-loss"] <= 1e308
    assert np.isfinite(out["eval-perplexity"]) and out["eval-exact-match"] == 1.0
    train = weighted_metrics([{"train-loss": 1.0}, {"train-loss": 1.7e308}, {"train-loss": 1.7e308}],
                             [1.0, 2.0**53, 2.0**53])
    assert np.isfinite(train["train-loss"]) and train["train-loss"] == pytest.approx(1.7e308)


def test_unnamed_metrics_are_kept_only_under_short_names(caplog):
    s = _strategy()
    with caplog.at_level(logging.WARNING, logger="fedtune.server"):
        s.aggregate_evaluate(1, [_eval_reply(1, {**HONEST_EVAL, "x" * 1_000_000: 1.0, "site-note": 2.0})])
    assert s.ledger(1).eval_per_site[1] == {**HONEST_EVAL, "site-note": 2.0}
    assert "ignoring metric of length 1000000 'xxxxxxxxxxxxxxxxxxxx'...: a name of more than 64 characters" \
        in caplog.text
    assert len(caplog.text) < 1000


def test_topk_upload_declaring_a_huge_shape_is_rejected_before_allocation():
    from federation.compression import UploadCodec
    from strategies.fedavg import UpdateRejected

    encoded = UploadCodec("topk", topk_fraction=0.5).encode({k: np.ones_like(v) for k, v in GLOBAL.items()})
    encoded[f"{KA}::shape"] = np.asarray([2**20, 2**20], dtype=np.int32)  # 2**40 floats if it were allocated
    strategy = _strategy()
    strategy.current_global = GLOBAL
    with pytest.raises(UpdateRejected, match="exceeds the largest expected tensor"):
        strategy.decode_reply(3, _train_reply(3, encoded), lambda node: GLOBAL)


def test_generation_scores_are_weighted_by_answers_and_kept_per_site():
    s = _strategy()
    msgs = []
    sites = [(1, 10, 0.5, 0.6, 0.7, {}), (2, 30, 0.1, 0.2, 0.3, {}),
             # a malformed score is dropped (optional metric), so that site's scores do not count at all
             (3, 1000, 0.9, 0.9, 1.5, {})]
    for node, answers, em, f1, rouge, _ in sites:
        ins = instruction(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="evaluate")
        msgs.append(reply(ins, RecordDict({"metrics": MetricRecord(
            {"eval-loss": 1.0, "eval-tokens": 10, "num-examples": answers, "eval-generated": answers,
             "eval-exact-match": em, "eval-token-f1": f1, "eval-rouge-l": rouge, "eval-perplexity": 2.718})})))
    out = s.aggregate_evaluate(1, msgs)
    assert out["eval-generated"] == 40
    assert out["eval-exact-match"] == pytest.approx((0.5 * 10 + 0.1 * 30) / 40)
    assert out["eval-token-f1"] == pytest.approx((0.6 * 10 + 0.2 * 30) / 40)
    assert out["eval-rouge-l"] == pytest.approx((0.7 * 10 + 0.3 * 30) / 40)
    assert out["eval-perplexity"] == pytest.approx(np.exp(1.0))
    per_site = s.ledger(1).eval_per_site
    assert sorted(per_site) == [1, 2, 3] and "eval-rouge-l" not in per_site[3]
    assert per_site[1]["eval-exact-match"] == 0.5


def test_data_fingerprints_of_accepted_updates_are_recorded_and_malformed_ones_ignored():
    good = {KA: np.array([[1.0, 0.0]], np.float32), KB: np.array([[2.0], [0.0]], np.float32)}
    replies = []
    for node, fingerprint in [(1, {"sha256": "ab" * 32, "examples": 7}), (2, {"sha256": "xyz", "examples": 7}),
                              (3, {"sha256": "cd" * 32, "examples": -1}), (4, None)]:
        msg = _train_reply(node, good)
        if fingerprint is not None:
            msg.content["data-fingerprint"] = ConfigRecord(fingerprint)
        replies.append(msg)
    s = _strategy()
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None and s.ledger(1).accepted == [1, 2, 3, 4]  # provenance never rejects an update
    assert s.ledger(1).data_fingerprints == {1: {"sha256": "ab" * 32, "examples": 7}}


@pytest.mark.parametrize("aggregator", ["fedavg", "fedadam"])
def test_finite_updates_whose_weighted_sum_overflows_fail_the_round_and_leave_the_state_alone(aggregator):
    """Each update is finite (so it passes validate_update), but near float32's maximum times its example count it
    overflows the float32 running sum: the round is not aggregated (it used to save an inf/NaN global adapter and,
    for FedAdam, fold the overflow into its moments)."""
    from strategies.aggregators import build_aggregator

    s = LoraDeltaStrategy(build_aggregator(aggregator, {}), min_train_nodes=1, min_available_nodes=1)
    s.current_global = {k: v.copy() for k, v in GLOBAL.items()}
    state_before = s.aggregator.state_dict()
    huge = {KA: np.full((1, 2), np.finfo(np.float32).max, np.float32), KB: np.zeros((2, 1), np.float32)}
    honest = {KA: np.full((1, 2), 0.5, np.float32), KB: np.ones((2, 1), np.float32)}
    arrays, metrics = s.aggregate_train(1, [_train_reply(1, honest, 10), _train_reply(2, huge, 10)])
    assert arrays is None and metrics is None
    ledger = s.ledger(1)
    assert ledger.accepted == [1, 2] and not ledger.rejected  # each update on its own is valid
    assert ledger.aggregation_error.startswith("NonFiniteAggregate: the weighted mean of the accepted updates is "
                                               f"not finite in {KA}"), ledger.aggregation_error
    assert s.aggregator.state_dict().keys() == state_before.keys()
    for key, value in state_before.items():
        np.testing.assert_array_equal(s.aggregator.state_dict()[key], value)
    # The same updates one order of magnitude smaller sum fine.
    s = LoraDeltaStrategy(build_aggregator(aggregator, {}), min_train_nodes=1, min_available_nodes=1)
    s.current_global = {k: v.copy() for k, v in GLOBAL.items()}
    smaller = {KA: huge[KA] / 1e2, KB: huge[KB]}
    arrays, _ = s.aggregate_train(1, [_train_reply(1, honest, 10), _train_reply(2, smaller, 10)])
    assert arrays is not None and all(np.all(np.isfinite(v)) for v in from_array_record(arrays).values())


def test_check_finite_aggregate_casts_to_the_transport_dtype():
    from server.strategy import NonFiniteAggregate, check_finite_aggregate

    check_finite_aggregate({KA: np.array([3e38])}, "x")  # float64, within float32's range
    with pytest.raises(NonFiniteAggregate, match=f"new global is not finite in {KA}"):
        check_finite_aggregate({KB: np.zeros(2), KA: np.array([1e39])}, "new global")  # finite float64, inf as float32
    with pytest.raises(NonFiniteAggregate):
        check_finite_aggregate({KA: np.array([np.nan], np.float32)}, "x")
