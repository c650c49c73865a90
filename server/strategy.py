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
from federation.compression import decode_upload
from strategies.fedavg import UpdateRejected, validate_update
from strategies.streaming import StreamingWeightedMean

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
    # node id -> that site's train metrics and upload size, for per-site reporting
    per_site: dict[int, dict] = field(default_factory=dict)

    @property
    def missing(self) -> list[int]:
        """Sampled nodes that sent no usable reply (no reply at all, error, or rejected)."""
        return sorted(set(self.sampled) - set(self.accepted))


def decode_update(msg: Message) -> tuple[dict[str, np.ndarray], int, MetricRecord]:
    """(delta arrays as sent, example count, metrics) of a train reply; raises UpdateRejected when malformed."""
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise UpdateRejected("reply must carry exactly one ArrayRecord and one MetricRecord")
    record = next(iter(content.array_records.values()))
    metrics = next(iter(content.metric_records.values()))
    try:
        arrays = decode_upload({k: v.numpy() for k, v in record.items()})
    except Exception as exc:  # undecodable bytes/dtype or malformed encoding: reject this site only
        raise UpdateRejected(f"undecodable arrays: {exc}") from exc
    num_examples = metrics.get("num-examples")
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)) or num_examples <= 0 \
            or not np.isfinite(num_examples):
        raise UpdateRejected(f"num-examples must be a positive number, got {num_examples!r}")
    return arrays, int(num_examples), metrics


class LoraDeltaStrategy(FedAvg):
    """Sample sites, send the global adapter, aggregate their validated LoRA deltas with `aggregator`."""

    def __init__(self, aggregator, *, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 2, min_evaluate_nodes: int = 2, min_available_nodes: int = 2,
                 transport_dtype: str = "float32", central_dp=None):
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, weighted_by_key="num-examples")
        self.aggregator = aggregator
        self.transport_dtype = transport_dtype
        # server.privacy.CentralDP or None: when set, sites are clipped and noised before `aggregator`.
        self.central_dp = central_dp
        self.privacy_reports: dict[int, dict] = {}
        self.current_global: dict[str, np.ndarray] = {}
        self.ledgers: dict[int, RoundLedger] = {}
        # The train messages of the round in flight, to attribute replies (accepted_updates);
        # Grid.push_messages fills metadata.message_id of these very objects.
        self._sent: list[Message] = []

    def ledger(self, server_round: int) -> RoundLedger:
        """The round's participation record (created on first use)."""
        return self.ledgers.setdefault(server_round, RoundLedger())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember the global adapter the deltas will be relative to, then sample and send it."""
        self.current_global = from_array_record(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = messages
        ledger = self.ledger(server_round)
        ledger.sampled = [m.metadata.dst_node_id for m in messages]
        ledger.bytes_down += arrays.count_bytes() * len(messages)
        return messages

    def accepted_updates(self, server_round: int, replies: Iterable[Message],
                         reference: Callable[[int], Mapping[str, np.ndarray]]
                         ) -> Iterator[tuple[int, dict[str, np.ndarray], int, MetricRecord]]:
        """(node, delta, example count, metrics) of each reply whose delta fits reference(node); the ledger notes
        failures, rejections (logged, never yielded), upload bytes and the accepted sites.

        reference(node) may raise UpdateRejected (e.g. a node that was sent nothing this round).
        """
        ledger = self.ledger(server_round)
        # Flower answers for an unreachable node itself (src_node_id = the SuperLink's id), so a reply is
        # attributed to the node its request went to.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent if m.metadata.message_id}
        replies = sorted(replies, key=lambda msg: reply_order(msg, sent_to))  # see reply_order
        for msg in replies:
            node = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                ledger.failed[node] = msg.error.reason
                log.warning("round %d: node %d failed: %s", server_round, node, msg.error.reason)
                continue
            upload = sum(r.count_bytes() for r in msg.content.array_records.values())
            ledger.bytes_up += upload
            try:
                arrays, num_examples, metrics = decode_update(msg)
                validate_update(arrays, reference(node))
            except UpdateRejected as exc:
                ledger.rejected[node] = str(exc)
                log.warning("round %d: REJECTED update from node %d, not aggregated: %s", server_round, node, exc)
                continue
            ledger.accepted.append(node)
            ledger.per_site[node] = {**{k: v for k, v in metrics.items() if not isinstance(v, list)},
                                     "bytes_up": upload}
            yield node, arrays, num_examples, metrics

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
        if streaming is not None:
            new_global = self.aggregator.aggregate_mean(self.current_global, streaming.result())
        elif self.central_dp is not None:
            # The DP mean is uniform over sites by design (weights would change the sensitivity); the
            # aggregator then post-processes it (server optimizers keep the guarantee).
            noisy_mean, self.privacy_reports[server_round] = self.central_dp.aggregate(deltas)
            new_global = self.aggregator.aggregate(self.current_global, [noisy_mean], [1.0], ["dp-mean"])
        else:
            new_global = self.aggregator.aggregate(self.current_global, deltas, weights, site_ids)
        return to_array_record(new_global, self.transport_dtype), weighted_metrics(metric_rows, weights)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Sample sites to evaluate the global adapter on their held-out data."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        ledger = self.ledger(server_round)
        ledger.eval_sampled = [m.metadata.dst_node_id for m in messages]
        ledger.bytes_down += arrays.count_bytes() * len(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Union eval loss: every site's summed token loss over all sites' target tokens."""
        ledger = self.ledger(server_round)
        loss_sum, tokens, examples = 0.0, 0, 0
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: evaluation failed on node %d: %s", server_round, msg.metadata.src_node_id,
                            msg.error.reason)
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            loss, n_tok = float(metrics["eval-loss"]), int(metrics["eval-tokens"])
            if not np.isfinite(loss) or n_tok <= 0:
                log.warning("round %d: ignoring eval from node %d (loss=%s, tokens=%s)", server_round,
                            msg.metadata.src_node_id, loss, n_tok)
                continue
            loss_sum += loss * n_tok
            tokens += n_tok
            examples += int(metrics["num-examples"])
            ledger.eval_ok.append(msg.metadata.src_node_id)
        if tokens == 0:
            return None
        return MetricRecord({"eval-loss": loss_sum / tokens, "eval-tokens": tokens, "num-examples": examples})


def reply_order(msg: Message, sent_to: Mapping[str, int]) -> tuple[int, int]:
    """Sort key of a train reply: (partition id, node id), so the coordinator sums updates in a fixed order.

    Float sums depend on their order, and replies arrive in any order: summed as they came, a re-run or a
    resumed run would not reproduce the adapter bit for bit. The node id is stable in a deployment (it comes
    with the site's registered key); Flower's simulation draws new node ids per run, hence the partition id
    the sites report first (-1 in a deployment, or when a reply has none).
    """
    partition = -1
    if not msg.has_error():
        for record in msg.content.metric_records.values():
            value = record.get("partition-id")
            if isinstance(value, int) and not isinstance(value, bool):
                partition = value
    return partition, sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)


def weighted_metrics(rows: list[MetricRecord], weights: list[float]) -> MetricRecord:
    """Example-weighted mean of scalar train metrics; token and time counts are summed."""
    summed_keys = {"train-tokens", "input-tokens", "train-steps", "num-examples"}
    total = sum(weights)
    out: dict[str, float] = {}
    for key in rows[0]:
        values = [row.get(key) for row in rows]
        if key == "partition-id" or any(isinstance(v, list) or v is None for v in values):
            continue
        if key in summed_keys:
            out[key] = float(sum(values))
        elif key in ("train-seconds", "peak-memory-bytes"):
            out[key] = float(max(values))
        else:
            out[key] = float(sum(w * v for w, v in zip(weights, values)) / total)
    return MetricRecord(out)
