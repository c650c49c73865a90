"""Flower strategy that aggregates LoRA *deltas* with a pure aggregator from strategies/.

Built on Flower's message-API FedAvg for node sampling and message construction; replaces its
aggregation because (1) sites send deltas, not weights, (2) each update is validated on its own
and a bad one is dropped, where Flower's consistency check would abort the whole round, and
(3) the math lives in strategies/ so it is tested without Flower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from federation.adapter import from_array_record, to_array_record
from federation.protocol import EVALUATE, TRAIN, message_type
from federation.text_metrics import perplexity
from server.replies import (EVAL_GENERATED, EVAL_LOSS, EVAL_PERPLEXITY, EVAL_REPLY, EVAL_TOKENS, GENERATION_SCORES,
                            INPUT_TOKENS, NUM_EXAMPLES, PARTITION_ID,
                            PEAK_MEMORY_BYTES, TRAIN_REPLY, TRAIN_SECONDS, TRAIN_STEPS, TRAIN_TOKENS, MetricSchema,
                            decode_data_fingerprint, decode_eval_reply, decode_train_reply, reply_node, sent_to)
from strategies.fedavg import UpdateRejected, validate_update
from server.streaming import StreamingWeightedMean

log = logging.getLogger("fedtune.server")


@dataclass
class RoundLedger:
    """Who took part in a round and what crossed the wire."""

    sampled: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    eval_sampled: list[int] = field(default_factory=list)
    eval_ok: list[int] = field(default_factory=list)
    eval_failed: dict[int, str] = field(default_factory=dict)
    eval_rejected: dict[int, str] = field(default_factory=dict)
    # why the accepted updates could not be aggregated (e.g. too few for Multi-Krum); None when they were
    aggregation_error: str | None = None
    # node id -> that site's train metrics and upload size, for per-site reporting
    per_site: dict[int, dict] = field(default_factory=dict)
    # node id -> {"sha256", "examples"} of the training data behind that site's accepted update (provenance)
    data_fingerprints: dict[int, dict] = field(default_factory=dict)
    # node id -> that site's checked evaluate metrics (loss, perplexity, generation scores and counts)
    eval_per_site: dict[int, dict] = field(default_factory=dict)

    @property
    def missing(self) -> list[int]:
        """Sampled nodes that sent no usable reply (no reply at all, error, or rejected)."""
        return sorted(set(self.sampled) - set(self.accepted))


class LoraDeltaStrategy(FedAvg):
    """Sample sites, send the global adapter, aggregate their validated LoRA deltas with `aggregator`."""

    # What a train / evaluate reply must carry (server.replies); a strategy with metrics of its own extends them.
    train_schema: MetricSchema = TRAIN_REPLY
    eval_schema: MetricSchema = EVAL_REPLY
    # The ClientApp handler a site runs for this strategy's messages: None is the default handler, an action
    # ("scaffold") sends message type "train.scaffold" (client/app.py lists the handlers). Set from the
    # strategy's registry entry (strategies/registry.py) by server.app.build_strategy.
    client_train_action: str | None = None
    client_evaluate_action: str | None = None

    def __init__(self, aggregator, *, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 2, min_evaluate_nodes: int = 2, min_available_nodes: int = 2,
                 transport_dtype: str = "float32", central_dp=None):
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, weighted_by_key=NUM_EXAMPLES)
        self.aggregator = aggregator
        self.transport_dtype = transport_dtype
        # server.privacy.CentralDP or None: when set, sites are clipped and noised before `aggregator`.
        self.central_dp = central_dp
        self.privacy_reports: dict[int, dict] = {}
        self.current_global: dict[str, np.ndarray] = {}
        self.ledgers: dict[int, RoundLedger] = {}
        # The train / evaluate messages of the round in flight, to attribute replies (reply_node);
        # Grid.push_messages fills metadata.message_id of these very objects.
        self._sent: list[Message] = []
        self._sent_eval: list[Message] = []

    def ledger(self, server_round: int) -> RoundLedger:
        """The round's participation record (created on first use)."""
        return self.ledgers.setdefault(server_round, RoundLedger())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember the global adapter the deltas will be relative to, then sample and send it."""
        self.current_global = from_array_record(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            message.metadata.message_type = message_type(TRAIN, self.client_train_action)
        self._sent = messages
        ledger = self.ledger(server_round)
        ledger.sampled = [m.metadata.dst_node_id for m in messages]
        ledger.bytes_down += arrays.count_bytes() * len(messages)
        return messages

    def decode_reply(self, node: int, msg: Message, reference: Callable[[int], Mapping[str, np.ndarray]]
                     ) -> tuple[dict[str, np.ndarray], int, dict[str, int | float]]:
        """(delta, example count, checked metrics) of one train reply, or UpdateRejected with the reason.

        The one validation of a train reply: its records and metrics (server.replies), its arrays against
        reference(node) (keys, shapes, float dtype, finite values), and the aggregator's own precondition on
        a single update (``check_update``, e.g. FFA-LoRA's frozen A). Strategies with extra records override it.
        """
        expected = reference(node)
        largest = max((int(np.size(value)) for value in expected.values()), default=0)
        arrays, num_examples, metrics = decode_train_reply(msg, self.train_schema, f"node {node}", largest,
                                                           expected)
        arrays = self.complete_update(arrays)
        validate_update(arrays, expected)
        check_update = getattr(self.aggregator, "check_update", None)
        if check_update is not None:
            check_update(expected, arrays)
        return arrays, num_examples, metrics

    def complete_update(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The delta as the aggregator expects it, from the decoded upload (FedSA-LoRA fills in lora_B)."""
        return arrays

    def note_reply(self, node: int, metrics: Mapping[str, int | float] | None) -> None:
        """Called for every train or evaluate reply: its checked metrics, or None when it failed or was rejected."""

    def accepted_updates(self, server_round: int, replies: Iterable[Message],
                         reference: Callable[[int], Mapping[str, np.ndarray]]
                         ) -> Iterator[tuple[int, dict[str, np.ndarray], int, dict[str, int | float]]]:
        """(node, delta, example count, checked metrics) of each reply that decode_reply accepts; the ledger notes
        failures, rejections (logged, never yielded), upload bytes and the accepted sites.

        reference(node) may raise UpdateRejected (e.g. a node that was sent nothing this round).
        """
        ledger = self.ledger(server_round)
        destinations = sent_to(self._sent)
        replies = sorted(replies, key=lambda msg: reply_order(msg, destinations))  # see reply_order
        for msg in replies:
            node = reply_node(msg, destinations)
            if msg.has_error():
                ledger.failed[node] = msg.error.reason
                log.warning("round %d: node %d failed: %s", server_round, node, msg.error.reason)
                self.note_reply(node, None)
                continue
            upload = sum(r.count_bytes() for r in msg.content.array_records.values())
            ledger.bytes_up += upload
            try:
                arrays, num_examples, metrics = self.decode_reply(node, msg, reference)
            except UpdateRejected as exc:
                ledger.rejected[node] = str(exc)
                log.warning("round %d: REJECTED update from node %d, not aggregated: %s", server_round, node, exc)
                self.note_reply(node, None)
                continue
            ledger.accepted.append(node)
            ledger.per_site[node] = {**metrics, "bytes_up": upload}
            fingerprint = decode_data_fingerprint(msg, f"node {node}")
            if fingerprint is not None:
                ledger.data_fingerprints[node] = fingerprint
            self.note_reply(node, metrics)
            yield node, arrays, num_examples, metrics

    def aggregation_failed(self, server_round: int, exc: ValueError) -> tuple[None, None]:
        """The accepted updates cannot be aggregated together (an aggregator's precondition on the set, e.g.
        Multi-Krum's minimum count): the round keeps the global adapter; the ledger says why."""
        ledger = self.ledger(server_round)
        ledger.aggregation_error = f"{type(exc).__name__}: {exc}"
        log.error("round %d: the %d accepted updates could not be aggregated (%s); global adapter unchanged",
                  server_round, len(ledger.accepted), ledger.aggregation_error)
        return None, None

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each delta on its own; aggregate the accepted ones into the next global adapter."""
        ledger = self.ledger(server_round)
        deltas, weights, site_ids, metric_rows = [], [], [], []
        # Mean-based aggregators (FedAvg, server optimizers) take a running sum: each decoded delta is added
        # and dropped, so the coordinator holds one float64 sum instead of every site's float32 delta.
        streaming = StreamingWeightedMean("float64") if (
            self.central_dp is None and hasattr(self.aggregator, "aggregate_mean")) else None
        for node, arrays, num_examples, metrics in self.accepted_updates(server_round, replies,
                                                                         lambda node: self.current_global):
            # Otherwise kept in the decoded float32: aggregators accumulate in float64 themselves, and a
            # float64 copy per site would double the coordinator's memory.
            if streaming is not None:
                streaming.add(arrays, float(num_examples))
            else:
                deltas.append(arrays)
            del arrays
            weights.append(float(num_examples))
            site_ids.append(str(node))
            metric_rows.append(metrics)
        if ledger.missing:
            log.warning("round %d: no usable update from nodes %s", server_round, ledger.missing)
        if not ledger.accepted:
            log.error("round %d: no valid updates; global adapter unchanged", server_round)
            return None, None
        try:
            if streaming is not None:
                new_global = self.aggregator.aggregate_mean(self.current_global, streaming.result())
            elif self.central_dp is not None:
                # The DP mean is uniform over sites by design (weights would change the sensitivity); the
                # aggregator then post-processes it (server optimizers keep the guarantee).
                noisy_mean, self.privacy_reports[server_round] = self.central_dp.aggregate(deltas)
                new_global = self.aggregator.aggregate(self.current_global, [noisy_mean], [1.0], ["dp-mean"])
            else:
                new_global = self.aggregator.aggregate(self.current_global, deltas, weights, site_ids)
        except ValueError as exc:  # incl. UpdateRejected, MixedRanksError, LinAlgError
            return self.aggregation_failed(server_round, exc)
        return to_array_record(new_global, self.transport_dtype), weighted_metrics(metric_rows, weights)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Sample sites to evaluate the global adapter on their held-out data."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        for message in messages:
            message.metadata.message_type = message_type(EVALUATE, self.client_evaluate_action)
        self._sent_eval = messages
        ledger = self.ledger(server_round)
        ledger.eval_sampled = [m.metadata.dst_node_id for m in messages]
        ledger.bytes_down += arrays.count_bytes() * len(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Union eval loss (every site's summed token loss over all sites' target tokens) and its perplexity, and
        the generation scores weighted by each site's number of generated answers (checked replies only)."""
        ledger = self.ledger(server_round)
        destinations = sent_to(self._sent_eval)
        loss_sum, tokens, examples = 0.0, 0, 0
        generated, score_sums = 0, dict.fromkeys(GENERATION_SCORES, 0.0)
        for msg in replies:
            node = reply_node(msg, destinations)
            if msg.has_error():
                ledger.eval_failed[node] = msg.error.reason
                log.warning("round %d: evaluation failed on node %d: %s", server_round, node, msg.error.reason)
                self.note_reply(node, None)
                continue
            try:
                metrics = decode_eval_reply(msg, self.eval_schema, f"node {node}")
            except UpdateRejected as exc:
                ledger.eval_rejected[node] = str(exc)
                log.warning("round %d: REJECTED evaluation from node %d, not counted: %s", server_round, node, exc)
                self.note_reply(node, None)
                continue
            loss_sum += metrics[EVAL_LOSS] * metrics[EVAL_TOKENS]
            tokens += metrics[EVAL_TOKENS]
            examples += metrics[NUM_EXAMPLES]
            # A site's scores count only with their answer count (each was checked on its own, so one may be gone).
            if EVAL_GENERATED in metrics and all(name in metrics for name in GENERATION_SCORES):
                generated += metrics[EVAL_GENERATED]
                for name in GENERATION_SCORES:
                    score_sums[name] += metrics[name] * metrics[EVAL_GENERATED]
            ledger.eval_ok.append(node)
            ledger.eval_per_site[node] = dict(metrics)
            self.note_reply(node, metrics)
        if tokens == 0:
            return None
        out = {EVAL_LOSS: loss_sum / tokens, EVAL_PERPLEXITY: perplexity(loss_sum / tokens), EVAL_TOKENS: tokens,
               NUM_EXAMPLES: examples}
        if generated:
            out[EVAL_GENERATED] = generated
            out.update({name: total / generated for name, total in score_sums.items()})
        return MetricRecord(out)


def reply_order(msg: Message, destinations: Mapping[str, int]) -> tuple[int, int]:
    """Sort key of a train reply: (partition id, node id), so the coordinator sums updates in a fixed order.

    Float sums depend on their order, and replies arrive in any order: summed as they came, a re-run or a
    resumed run would not reproduce the adapter bit for bit. The node id is stable in a deployment (it comes
    with the site's registered key); Flower's simulation draws new node ids per run, hence the partition id
    the sites report first (-1 in a deployment, or when a reply has none).
    """
    partition = -1
    if not msg.has_error():
        for record in msg.content.metric_records.values():
            value = record.get(PARTITION_ID)
            if isinstance(value, int) and not isinstance(value, bool):
                partition = value
    return partition, reply_node(msg, destinations)


def weighted_metrics(rows: list[Mapping[str, int | float]], weights: list[float]) -> MetricRecord:
    """Example-weighted mean of the (checked, scalar) train metrics; token and time counts are summed."""
    summed_keys = {TRAIN_TOKENS, INPUT_TOKENS, TRAIN_STEPS, NUM_EXAMPLES}
    total = sum(weights)
    out: dict[str, float] = {}
    for key in rows[0]:
        values = [row.get(key) for row in rows]
        if key == PARTITION_ID or any(isinstance(v, list) or v is None for v in values):
            continue
        if key in summed_keys:
            out[key] = float(sum(values))
        elif key in (TRAIN_SECONDS, PEAK_MEMORY_BYTES):
            out[key] = float(max(values))
        else:
            out[key] = float(sum(w * v for w, v in zip(weights, values)) / total)
    return MetricRecord(out)
