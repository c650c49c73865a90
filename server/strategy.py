"""Flower strategy that aggregates LoRA *deltas* with a pure aggregator from strategies/.

Built on Flower's message-API FedAvg for node sampling and message construction; replaces its
aggregation because (1) sites send deltas, not weights, (2) each update is validated on its own
and a bad one is dropped, where Flower's consistency check would abort the whole round, and
(3) the math lives in strategies/ so it is tested without Flower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
from strategies.params import AGGREGATOR_PARAMS, param_fields
from strategies.registry import aggregator_of
from server.reply_stream import replies_as_they_arrive, replies_in_order
from server.streaming import SpillingUpdates, StreamingWeightedMean

log = logging.getLogger("fedtune.server")

# The running sum's accumulator (server.streaming.ACCUMULATORS). float32: the benchmark's fastest and smallest
# (one adapter of state) with a max error vs the float64 reference far below a float32 ulp of the mean's largest
# entries (BENCHMARKS.md, "Coordinator round").
DEFAULT_ACCUMULATOR = "float32"
# Aggregators that need every site's update (median, trimmed mean, Krum) keep up to this many bytes of them in RAM;
# the rest go to np.memmap files in the run directory (server.streaming.SpillingUpdates).
UPDATES_RAM_BUDGET_BYTES = 2 * 2**30


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


class NonFiniteAggregate(ValueError):
    """Accepted updates (each finite) whose aggregate is not: a float overflow, e.g. of a float32 running sum."""


def check_finite_aggregate(adapter: Mapping[str, np.ndarray], what: str, dtype: str = "float32") -> None:
    """NonFiniteAggregate naming the first tensor of `adapter` that is not finite once cast to `dtype`.

    Each update is checked for NaN/Inf on its own (validate_update), but finite updates can still sum past the
    float range: a site may send values near float32's maximum with a large example count as their weight.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        for key, value in adapter.items():
            if not np.all(np.isfinite(np.asarray(value, dtype=dtype))):
                raise NonFiniteAggregate(f"{what} is not finite in {key} ({dtype} overflow: accepted updates whose "
                                         "values times their example counts exceed the float range)")


class LoraDeltaStrategy(FedAvg):
    """Sample sites, send the global adapter, aggregate their validated LoRA deltas with `aggregator`."""

    # What a train / evaluate reply must carry (server.replies); a strategy with metrics of its own extends them.
    train_schema: MetricSchema = TRAIN_REPLY
    eval_schema: MetricSchema = EVAL_REPLY
    # The ClientApp handler a site runs for this strategy's messages: None is the default handler, an action
    # ("scaffold") sends message type "train.scaffold" (client/app.py lists the handlers). Set from the
    # strategy's registry entry (strategies/registry.py) by server.methods.build_coordinator.
    client_train_action: str | None = None
    client_evaluate_action: str | None = None
    # train_round folds each train reply into the round's sum as it arrives (server.reply_stream). A strategy whose
    # aggregate_train needs all the replies together (FLoRA's stacking, SCAFFOLD's control variates) sets False:
    # train_round then collects them with Grid.send_and_receive and calls its aggregate_train.
    folds_replies_as_they_arrive: bool = True
    # federation.fold_order: "fixed" (node id order, reproducible bit for bit) or "arrival" (server/reply_stream.py).
    fold_order: str = "fixed"

    def __init__(self, aggregator, *, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 2, min_evaluate_nodes: int = 2, min_available_nodes: int = 2,
                 transport_dtype: str = "float32", central_dp=None, accumulator: str = DEFAULT_ACCUMULATOR,
                 updates_ram_budget_bytes: int = UPDATES_RAM_BUDGET_BYTES, spill_dir: str | None = None):
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, weighted_by_key=NUM_EXAMPLES)
        self.aggregator = aggregator
        self.transport_dtype = transport_dtype
        # server.privacy.CentralDP or None: when set, sites are clipped and noised before `aggregator`.
        self.central_dp = central_dp
        self.accumulator = accumulator
        self.updates_ram_budget_bytes = updates_ram_budget_bytes
        self.spill_dir = spill_dir  # where SpillingUpdates writes (the run directory); None: the system temp dir
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
        self.current_global = {}  # the previous one goes first: one decoded global adapter at a time
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
                         reference: Callable[[int], Mapping[str, np.ndarray]], *, in_arrival_order: bool = False
                         ) -> Iterator[tuple[int, dict[str, np.ndarray], int, dict[str, int | float]]]:
        """(node, delta, example count, checked metrics) of each reply that decode_reply accepts; the ledger notes
        failures, rejections (logged, never yielded), upload bytes and the accepted sites.

        Replies are taken in reply_order (all of them held first), or with in_arrival_order one at a time as
        `replies` yields them, each dropped before the next is taken. reference(node) may raise UpdateRejected
        (e.g. a node that was sent nothing this round).
        """
        destinations = sent_to(self._sent)
        if not in_arrival_order:
            replies = sorted(replies, key=lambda msg: reply_order(msg, destinations))  # see reply_order
        for msg in replies:
            accepted = self._take_train_reply(server_round, msg, destinations, reference)
            # In arrival order nothing of a reply may outlive its turn: the next one is pulled while this generator
            # is suspended, so the names bound here are dropped first (else a decoded delta lingers per reply).
            del msg
            if accepted is not None:
                yield accepted
                del accepted

    def _take_train_reply(self, server_round: int, msg: Message, destinations: Mapping[str, int],
                          reference: Callable[[int], Mapping[str, np.ndarray]]
                          ) -> tuple[int, dict[str, np.ndarray], int, dict[str, int | float]] | None:
        """accepted_updates' step for one reply: its (node, delta, count, metrics), or None (noted in the ledger)."""
        ledger = self.ledger(server_round)
        node = reply_node(msg, destinations)
        if msg.has_error():
            ledger.failed[node] = msg.error.reason
            log.warning("round %d: node %d failed: %s", server_round, node, msg.error.reason)
            self.note_reply(node, None)
            return None
        upload = sum(r.count_bytes() for r in msg.content.array_records.values())
        ledger.bytes_up += upload
        try:
            arrays, num_examples, metrics = self.decode_reply(node, msg, reference)
        except UpdateRejected as exc:
            ledger.rejected[node] = str(exc)
            # The reason as text: a log record that kept the exception would keep its frames, and with them the reply.
            log.warning("round %d: REJECTED update from node %d, not aggregated: %s", server_round, node,
                        ledger.rejected[node])
            self.note_reply(node, None)
            return None
        ledger.accepted.append(node)
        ledger.per_site[node] = {**metrics, "bytes_up": upload}
        fingerprint = decode_data_fingerprint(msg, f"node {node}")
        if fingerprint is not None:
            ledger.data_fingerprints[node] = fingerprint
        self.note_reply(node, metrics)
        return node, arrays, num_examples, metrics

    def aggregation_failed(self, server_round: int, exc: ValueError) -> tuple[None, None]:
        """The accepted updates cannot be aggregated together (an aggregator's precondition on the set, e.g.
        Multi-Krum's minimum count): the round keeps the global adapter; the ledger says why."""
        ledger = self.ledger(server_round)
        ledger.aggregation_error = f"{type(exc).__name__}: {exc}"
        log.error("round %d: the %d accepted updates could not be aggregated (%s); global adapter unchanged",
                  server_round, len(ledger.accepted), ledger.aggregation_error)
        return None, None

    def train_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                    timeout: float | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """configure_train, then each reply folded as it arrives (folds_replies_as_they_arrive) or all collected
        and handed to aggregate_train; returns the new global adapter (None: unchanged) and the train metrics."""
        messages = self.configure_train(server_round, arrays, config, grid)
        if not self.folds_replies_as_they_arrive:
            return self.aggregate_train(server_round, grid.send_and_receive(messages, timeout=timeout))
        replies = (replies_as_they_arrive if self.fold_order == "arrival" else replies_in_order)(grid, messages, timeout)
        return self.aggregate_train_as_they_arrive(server_round, replies)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each delta on its own; aggregate the accepted ones, summed in reply_order, into the next
        global adapter."""
        return self._aggregate_train(server_round, replies, in_arrival_order=False)

    def aggregate_train_as_they_arrive(self, server_round: int, replies: Iterable[Message]
                                       ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """aggregate_train over replies taken as `replies` yields them: each is validated, folded into the running
        sum and dropped before the next is taken (mean-based aggregators without central DP); other aggregators
        keep the accepted deltas (SpillingUpdates: on disk above the RAM budget) and sort them into reply_order.

        The running sum is added in arrival order: equal to aggregate_train's bit for bit when the replies arrive
        in reply_order (the in-process engine's push order); otherwise its float rounding may differ in the last
        bits (accumulator float32: ~1e-7 of the mean), so a re-run or resumed run over a real transport reproduces
        the adapter to that precision, not bit for bit. aggregate_train keeps the fixed order.
        """
        return self._aggregate_train(server_round, replies, in_arrival_order=True)

    def _aggregate_train(self, server_round: int, replies: Iterable[Message], *, in_arrival_order: bool
                         ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ledger = self.ledger(server_round)
        # Mean-based aggregators (FedAvg, server optimizers) take a running sum: each decoded delta is added and
        # dropped, so the coordinator holds one accumulator instead of every site's delta.
        streaming = StreamingWeightedMean(self.accumulator) if (
            self.central_dp is None and hasattr(self.aggregator, "aggregate_mean")) else None
        if streaming is None:
            log.info("round %d: %s needs every site's update; keeping them (in RAM up to %.1f GiB, then on disk)",
                     server_round, "central DP" if self.central_dp is not None else self.aggregator.name,
                     self.updates_ram_budget_bytes / 2**30)
        deltas = None if streaming is not None else SpillingUpdates(self.updates_ram_budget_bytes, self.spill_dir)
        keys, weights, site_ids, metric_rows = [], [], [], []
        try:
            for node, arrays, num_examples, metrics in self.accepted_updates(
                    server_round, replies, lambda node: self.current_global, in_arrival_order=in_arrival_order):
                if streaming is not None:
                    streaming.add(arrays, float(num_examples))
                else:
                    # Kept in the decoded float32: aggregators accumulate in float64 themselves.
                    deltas.append(arrays)
                del arrays
                keys.append((_partition_of(metrics), node))
                weights.append(float(num_examples))
                site_ids.append(str(node))
                metric_rows.append(metrics)
            # Everything but the running sum is put in reply_order, whatever order the replies came in.
            order = sorted(range(len(keys)), key=keys.__getitem__)
            weights, site_ids, metric_rows = ([items[i] for i in order] for items in (weights, site_ids, metric_rows))
            ledger.accepted = [int(site) for site in site_ids]
            if deltas is not None:
                deltas.reorder(order)
            if ledger.missing:
                log.warning("round %d: no usable update from nodes %s", server_round, ledger.missing)
            if not ledger.accepted:
                log.error("round %d: no valid updates; global adapter unchanged", server_round)
                return None, None
            try:
                if streaming is not None:
                    mean, streaming = streaming.result(), None
                    # Before the aggregator sees it: a server optimizer would fold an overflowed mean into its state.
                    check_finite_aggregate(mean, "the weighted mean of the accepted updates", self.transport_dtype)
                    new_global = self.aggregator.aggregate_mean(self.current_global, mean)
                    del mean  # the accumulator goes before the ArrayRecord is built
                elif self.central_dp is not None:
                    # The DP mean is uniform over sites by design (weights would change the sensitivity); the
                    # aggregator then post-processes it (server optimizers keep the guarantee).
                    noisy_mean, self.privacy_reports[server_round] = self.central_dp.aggregate(list(deltas))
                    new_global = self.aggregator.aggregate(self.current_global, [noisy_mean], [1.0], ["dp-mean"])
                else:
                    new_global = self.aggregator.aggregate(self.current_global, list(deltas), weights, site_ids)
            except ValueError as exc:  # incl. UpdateRejected, MixedRanksError, LinAlgError
                return self.aggregation_failed(server_round, exc)
            return to_array_record(new_global, self.transport_dtype), weighted_metrics(metric_rows, weights)
        finally:
            if deltas is not None:
                deltas.close()

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
        counted: list[Mapping[str, int | float]] = []
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
            counted.append(metrics)
            ledger.eval_ok.append(node)
            ledger.eval_per_site[node] = dict(metrics)
            self.note_reply(node, metrics)
        if not counted:
            return None
        loss = weighted_mean([m[EVAL_LOSS] for m in counted], [m[EVAL_TOKENS] for m in counted])
        out = {EVAL_LOSS: loss, EVAL_PERPLEXITY: perplexity(loss), EVAL_TOKENS: sum(m[EVAL_TOKENS] for m in counted),
               NUM_EXAMPLES: sum(m[NUM_EXAMPLES] for m in counted)}
        # A site's scores count only with their answer count (each was checked on its own, so one may be gone).
        scored = [m for m in counted if EVAL_GENERATED in m and all(name in m for name in GENERATION_SCORES)]
        if scored:
            out[EVAL_GENERATED] = sum(m[EVAL_GENERATED] for m in scored)
            out.update({name: weighted_mean([m[name] for m in scored], [m[EVAL_GENERATED] for m in scored])
                        for name in GENERATION_SCORES})
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


def _partition_of(metrics: Mapping[str, int | float]) -> int:
    """The partition id a site reported (-1: none), reply_order's first key."""
    partition = metrics.get(PARTITION_ID, -1)
    return partition if isinstance(partition, int) and not isinstance(partition, bool) else -1


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """sum(w * v) / sum(w) of checked metric values, summed as sum((w / sum(w)) * v) and kept within the values'
    range, so it stays finite for any finite values: a site may claim a loss near the float maximum and a count up
    to 2**53, whose product overflows."""
    total = float(sum(weights))
    mean = sum((w / total) * v for w, v in zip(weights, values))
    return float(min(max(mean, min(values)), max(values)))


def weighted_metrics(rows: list[Mapping[str, int | float]], weights: list[float]) -> MetricRecord:
    """Example-weighted mean of the (checked, scalar) train metrics; token and time counts are summed."""
    summed_keys = {TRAIN_TOKENS, INPUT_TOKENS, TRAIN_STEPS, NUM_EXAMPLES}
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
            out[key] = weighted_mean(values, weights)
    return MetricRecord(out)


def sampling_kwargs(cfg: Any) -> dict[str, Any]:
    """LoraDeltaStrategy's sampling settings from cfg.strategy (every coordinator samples the same way)."""
    s = cfg.strategy
    return dict(fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
                min_train_nodes=s.min_train_clients, min_evaluate_nodes=s.min_evaluate_clients,
                min_available_nodes=s.min_available_clients)


def aggregator_params(strategy_cfg: Any) -> dict[str, Any]:
    """The strategy.params given for its aggregator (strategies.params.AGGREGATOR_PARAMS), not the sites' own."""
    aggregator = aggregator_of(strategy_cfg.name, strategy_cfg.aggregator)
    takes = param_fields(AGGREGATOR_PARAMS[aggregator]) if aggregator in AGGREGATOR_PARAMS else {}
    return {key: value for key, value in (strategy_cfg.params or {}).items() if key in takes}
