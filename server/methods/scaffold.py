"""Coordinator side of SCAFFOLD (the site side is client/scaffold.py).

SCAFFOLD (Karimireddy et al. 2020): the server control variate c rides along with the global adapter
in every train message; sites reply with their delta and delta_c; c <- c + (1/N) sum_i delta_c_i with
N = all sites of the federation (strategies.scaffold.server_control_update). c lives in the
aggregator slot (``ScaffoldAggregator``), so the round checkpoint saves it and a resume restores it.
The adapter itself is aggregated by the inner aggregator (``strategy.aggregator``, default fedavg:
x + weighted mean of the deltas, i.e. SCAFFOLD with server lr 1; fedavgm gives another server lr).

It does not run under SecAgg+ or central DP (delta_c is a per-site extra the sum would hide and the DP guarantee
would not cover): strategies/registry.py declares it, federation/validation.py refuses those combinations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from federation.adapter import to_array_record
from federation.protocol import C_GLOBAL_RECORD, CONTROL_DTYPE, DELTA_C_RECORD
from server.replies import decode_arrays
from server.strategy import LoraDeltaStrategy, aggregator_params, sampling_kwargs
from strategies.aggregators import build_aggregator
from strategies.fedavg import AdapterArrays, UpdateRejected, validate_update
from strategies.registry import aggregator_of
from strategies.scaffold import server_control_update, zero_control

log = logging.getLogger("fedtune.server")

C_STATE_PREFIX = "scaffold.c."
INNER_STATE_PREFIX = "inner."


class ScaffoldAggregator:
    """The inner aggregator for the adapter, plus the server control variate c (checkpointed with it)."""

    supports_mixed_ranks = False

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = "scaffold"
        self.c_global: AdapterArrays | None = None

    def control(self, global_adapter: Mapping[str, np.ndarray]) -> AdapterArrays:
        """The server control variate c (float64, adapter keys/shapes); zeros before the first round."""
        if self.c_global is None:
            self.c_global = zero_control(global_adapter)
        return self.c_global

    def aggregate(self, global_adapter, updates, weights, site_ids) -> AdapterArrays:
        """The inner aggregator's new global adapter (SCAFFOLD's x update)."""
        return self.inner.aggregate(global_adapter, updates, weights, site_ids)

    def state_dict(self) -> dict[str, Any]:
        """{"scaffold.c.<adapter key>": c, "inner.<key>": inner aggregator state}."""
        state = {INNER_STATE_PREFIX + key: value for key, value in self.inner.state_dict().items()}
        for key, value in (self.c_global or {}).items():
            state[C_STATE_PREFIX + key] = value
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore c and the inner aggregator's state."""
        control = {key[len(C_STATE_PREFIX):]: np.asarray(value, np.float64)
                   for key, value in state.items() if key.startswith(C_STATE_PREFIX)}
        self.c_global = control or None
        self.inner.load_state_dict({key[len(INNER_STATE_PREFIX):]: value for key, value in state.items()
                                    if key.startswith(INNER_STATE_PREFIX)})


def _without(msg: Message, key: str) -> Message:
    return Message(content=RecordDict({k: v for k, v in msg.content.items() if k != key}), metadata=msg.metadata)


class ScaffoldStrategy(LoraDeltaStrategy):
    """LoraDeltaStrategy that sends c with the adapter and updates c from the accepted sites' delta_c."""

    folds_replies_as_they_arrive = False  # aggregate_train reads every accepted site's delta_c after the sum

    def __init__(self, aggregator: ScaffoldAggregator, *, num_sites_total: int, min_completed_clients: int = 1,
                 **strategy_kwargs) -> None:
        super().__init__(aggregator, **strategy_kwargs)
        self.num_sites_total = int(num_sites_total)
        self.min_completed_clients = int(min_completed_clients)
        self.connected_nodes = 0
        self._delta_c: dict[int, AdapterArrays] = {}  # accepted node -> its delta_c, for the round in flight

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """LoraDeltaStrategy's messages with c added (one shared record)."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.connected_nodes = len(list(grid.get_node_ids()))
        record = to_array_record(self.aggregator.control(self.current_global), CONTROL_DTYPE)
        for message in messages:
            message.content[C_GLOBAL_RECORD] = record
        self.ledger(server_round).bytes_down += record.count_bytes() * len(messages)
        return messages

    def decode_reply(self, node: int, msg: Message, reference: Callable[[int], Mapping[str, np.ndarray]]
                     ) -> tuple[dict[str, np.ndarray], int, dict[str, int | float]]:
        """The reply's delta_c (its own ArrayRecord, checked against c); the rest as LoraDeltaStrategy decodes it."""
        if DELTA_C_RECORD not in msg.content.array_records:
            raise UpdateRejected(f"SCAFFOLD reply without the ArrayRecord {DELTA_C_RECORD!r}")
        control = self.aggregator.control(self.current_global)
        delta_c = decode_arrays(msg.content.array_records[DELTA_C_RECORD], control)
        try:
            validate_update(delta_c, control)
        except UpdateRejected as exc:
            raise UpdateRejected(f"control variate: {exc}") from None
        update = super().decode_reply(node, _without(msg, DELTA_C_RECORD), reference)
        self._delta_c[node] = {key: np.asarray(value, np.float64) for key, value in delta_c.items()}
        return update

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the deltas as LoraDeltaStrategy does; then c += sum of the accepted delta_c / N."""
        c_global = self.aggregator.control(self.current_global)
        ledger = self.ledger(server_round)
        self._delta_c = {}
        new_arrays, metrics = super().aggregate_train(server_round, replies)
        if new_arrays is None or len(ledger.accepted) < self.min_completed_clients:
            return None, None  # the round loop keeps the global adapter; c must not move without it
        total = max(self.num_sites_total, self.connected_nodes, len(ledger.accepted))
        self.aggregator.c_global = server_control_update(c_global, [self._delta_c[n] for n in ledger.accepted],
                                                         total)
        return new_arrays, metrics


def build(cfg: Any) -> ScaffoldStrategy:
    """ScaffoldStrategy around the inner aggregator (``strategy.aggregator``, default fedavg) and its params."""
    inner = build_aggregator(aggregator_of(cfg.strategy.name, cfg.strategy.aggregator), aggregator_params(cfg.strategy))
    return ScaffoldStrategy(ScaffoldAggregator(inner), num_sites_total=cfg.federation.num_clients,
                            min_completed_clients=cfg.federation.min_completed_clients, **sampling_kwargs(cfg))
