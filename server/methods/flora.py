"""Coordinator side of FLoRA stacking (Wang et al. 2024), and what FlexLoRA (server/methods/flexlora.py) and FedEx-LoRA
(server/methods/fedex_lora.py) build on: per-site messages at each site's rank, an exact stacked global update.

Each site trains a LoRA of its own rank r_i (client.task.site_settings says where it comes from);
the coordinator learns the ranks with a site-profile query (once per node, and again after a node
failed) and keeps the EXACT global update as stacked factors B_g (out, R), A_g (R, in) with scaling 1
(``HeteroLoraState``, checkpointed as the strategy state).

flora: every round, global += sum_i w_i s_i B_i A_i exactly (stack_lora_updates; R grows by sum r_i).
  Sites receive the rounds they have not merged yet as a frozen part and a fresh LoRA (A seeded
  uniform as PEFT initialises it, B = 0) at their rank, re-initialised every round.
flexlora (flexlora.py): every round, global = sum_i w_i s_i B_i A_i of the sites' full local factors; site j then
  trains from the best rank-r_j factors of global / s_j (SVD, Eckart-Young). Components with zero
  singular value (a global of rank < r_j) get a fresh A row and a zero B column, so they can train.

Weights w_i are example counts, s_i = lora.alpha / r_i (PEFT scaling). The round loop's ``arrays`` is
the rank-``lora.r`` SVD truncation of the exact global (a PEFT-loadable export, exact when the global
rank is <= lora.r); evaluation always runs on the exact global update.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from federation.adapter import from_array_record, to_array_record
from federation.protocol import (EVALUATE, TRAIN, FROZEN_ACCUMULATE, FROZEN_FROM_KEY, FROZEN_MODE_KEY, FROZEN_RECORD, FROZEN_TO_KEY,
                                 METRIC_FROZEN_COUNT, METRIC_LOCAL_STEPS, METRIC_RANK, RUN_CONFIG_KEY,
                                 message_type as wire_message_type)
from federation.validation import check_rank_plan, mixed_ranks_message  # noqa: F401 (check_rank_plan re-exported)
from server.replies import (COUNT, EVAL_REPLY, POSITIVE_COUNT, TRAIN_REPLY, MetricSchema, Number, reply_node,
                            sent_to)
from server.strategy import LoraDeltaStrategy, sampling_kwargs, weighted_metrics
from strategies.aggregators import MixedRanksError
from strategies.fedavg import AdapterArrays, UpdateRejected
from strategies.registry import strategy_spec
from strategies.lora_exact import (LORA_A_SUFFIX, LORA_B_SUFFIX, lora_pairs, lora_ranks, non_lora_keys,
                                   stack_lora_updates, truncate_factors)

log = logging.getLogger("fedtune.server")

STATE_PREFIX = "hetero."
STATE_OFFSETS = "hetero.offsets"
# A site-profile reply (client.flora.site_profile); train and evaluate replies may add the merged-updates count.
SITE_PROFILE_REPLY = MetricSchema(required={METRIC_RANK: POSITIVE_COUNT, METRIC_LOCAL_STEPS: POSITIVE_COUNT,
                                            METRIC_FROZEN_COUNT: COUNT})


@dataclass
class SiteProfile:
    """What a site reported: its LoRA rank, local steps, and how many FLoRA global updates it has merged."""

    rank: int
    local_steps: int
    frozen_updates: int


def query_site_profiles(grid: Grid, node_ids: Sequence[int], config: ConfigRecord, timeout: float | None,
                        max_rank: int | None = None) -> tuple[dict[int, SiteProfile], dict[int, str]]:
    """({node: profile}, {node: why no profile}) from one query message per node (client.flora.site_profile).

    max_rank: the largest LoRA rank a site may report (the coordinator builds each site's LoRA at its rank)."""
    schema = SITE_PROFILE_REPLY if max_rank is None else MetricSchema(
        {**SITE_PROFILE_REPLY.required, METRIC_RANK: Number(whole=True, minimum=1, maximum=max_rank)})
    content = RecordDict({"config": ConfigRecord({RUN_CONFIG_KEY: str(config[RUN_CONFIG_KEY])})})
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=node) for node in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    destinations = sent_to(messages)
    profiles, errors = {}, {}
    for reply in replies:
        node = reply_node(reply, destinations)
        if reply.has_error():
            errors[node] = reply.error.reason
            continue
        try:
            metric_records = list(reply.content.metric_records.values())
            if len(metric_records) != 1:
                raise UpdateRejected(f"site profile must be one MetricRecord, got {len(metric_records)}")
            metrics = schema.check(metric_records[0], f"node {node}")
        except UpdateRejected as exc:
            errors[node] = f"malformed site profile: {exc}"
            continue
        profiles[node] = SiteProfile(metrics[METRIC_RANK], metrics[METRIC_LOCAL_STEPS], metrics[METRIC_FROZEN_COUNT])
    for node in set(node_ids) - set(profiles) - set(errors):
        errors[node] = "no reply to the site-profile query"
    return profiles, errors


def check_site_ranks(grid: Grid, cfg: Any, config: ConfigRecord, timeout: float | None) -> dict[int, SiteProfile]:
    """Query the connected sites; raise MixedRanksError if any asks for a rank the strategy cannot train.

    Sites that cannot answer (an app without the query handler) are logged and assumed to train lora.r.
    """
    profiles, errors = query_site_profiles(grid, sorted(grid.get_node_ids()), config, timeout)
    for node, reason in errors.items():
        log.warning("node %d gave no site profile (%s); assuming LoRA rank %d", node,
                    reason.splitlines()[0] if reason else "error", cfg.lora.r)
    if not strategy_spec(cfg.strategy.name).mixed_ranks:
        asked = {f"node {node}": p.rank for node, p in sorted(profiles.items()) if p.rank != cfg.lora.r}
        if asked:
            raise MixedRanksError(mixed_ranks_message(cfg.strategy.name, cfg.lora.r, asked))
    return profiles


def fresh_lora_a(rank: int, in_features: int, rng: np.random.Generator) -> np.ndarray:
    """lora_A (rank, in) as PEFT initialises it: U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a=sqrt(5))."""
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(rank, in_features))


class HeteroLoraState:
    """The exact global update as stacked factors per LoRA layer; sits in the strategy's aggregator slot.

    ``offsets[k]`` is the stacked rank after k merged updates (flora, fedex_lora: aggregated rounds), so
    the rows ``offsets[k]:`` of A (columns of B) are exactly the updates after the k-th. fedex_lora
    (server/methods/fedex_lora.py) keeps its accumulated residuals here the same way.
    """

    supports_mixed_ranks = True

    def __init__(self, method: str, accumulates: bool = True) -> None:
        self.name = method
        # True: each merge adds to the held updates (flora, fedex_lora); False: it replaces them (flexlora).
        self.accumulates = accumulates
        self.factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # prefix -> (A (R, in), B (out, R))
        self.offsets: list[int] = [0]

    @property
    def num_updates(self) -> int:
        """How many global updates the factors hold (flora: aggregated rounds; flexlora: 0 or 1)."""
        return len(self.offsets) - 1

    def merge(self, stacked: Mapping[str, np.ndarray]) -> None:
        """flora, fedex_lora: append the round's stacked factors; flexlora: replace the global with them."""
        pairs = lora_pairs(stacked)
        added = 0
        for prefix, (a_key, b_key) in pairs.items():
            a, b = np.asarray(stacked[a_key], np.float64), np.asarray(stacked[b_key], np.float64)
            if self.accumulates and prefix in self.factors:
                a_old, b_old = self.factors[prefix]
                a, b = np.concatenate([a_old, a], axis=0), np.concatenate([b_old, b], axis=1)
            self.factors[prefix] = (a, b)
            added = a.shape[0]
        self.offsets = [*self.offsets, added] if self.accumulates else [0, added]

    def factors_since(self, start: int) -> AdapterArrays:
        """Stacked factors of the updates after the `start`-th ({prefix.lora_A.weight: (R', in), ...})."""
        row = self.offsets[start]
        out: AdapterArrays = {}
        for prefix, (a, b) in self.factors.items():
            out[prefix + LORA_A_SUFFIX] = a[row:]
            out[prefix + LORA_B_SUFFIX] = b[:, row:]
        return out

    def site_factors(self, prefix: str, rank: int, scaling: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B (out, rank), A (rank, in), singular values) with scaling * B @ A ~= the global update of `prefix`."""
        a, b = self.factors[prefix]
        return truncate_factors(b / scaling, a, rank)

    def export(self, template: Mapping[str, np.ndarray], rank: int, scaling: float) -> AdapterArrays:
        """The global update as an adapter shaped like `template` (rank `rank`, PEFT scaling `scaling`)."""
        if not self.factors:
            return {key: np.array(value, copy=True) for key, value in template.items()}
        out = {}
        for prefix, (a_key, b_key) in lora_pairs(template).items():
            b, a, _ = self.site_factors(prefix, rank, scaling)
            out[a_key] = a.astype(np.asarray(template[a_key]).dtype)
            out[b_key] = b.astype(np.asarray(template[b_key]).dtype)
        return out

    def aggregate(self, global_adapter, updates, weights, site_ids) -> AdapterArrays:
        """Not a delta aggregator: HeteroLoraStrategy.aggregate_train needs each site's full factors."""
        raise RuntimeError(f"{self.name!r} aggregates per-site factors of mixed ranks in HeteroLoraStrategy; "
                           "it cannot aggregate a mean delta (SecAgg+ / central DP are not supported)")

    def state_dict(self) -> dict[str, Any]:
        """{"hetero.offsets": (k+1,), "hetero.<prefix>.lora_A.weight": (R, in), "hetero.<...>.lora_B.weight": (out, R)}."""
        state: dict[str, Any] = {STATE_OFFSETS: np.asarray(self.offsets, dtype=np.int64)}
        for prefix, (a, b) in self.factors.items():
            state[STATE_PREFIX + prefix + LORA_A_SUFFIX] = a
            state[STATE_PREFIX + prefix + LORA_B_SUFFIX] = b
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the factors and offsets written by state_dict."""
        self.offsets = [int(x) for x in np.atleast_1d(state.get(STATE_OFFSETS, [0]))]
        arrays = {key[len(STATE_PREFIX):]: np.asarray(value, np.float64) for key, value in state.items()
                  if key.startswith(STATE_PREFIX) and key != STATE_OFFSETS}
        self.factors = {prefix: (arrays[a_key], arrays[b_key]) for prefix, (a_key, b_key) in lora_pairs(arrays).items()}


def _layer_dims(template: Mapping[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """{prefix: (in, out)} of the global adapter; heterogeneous ranks support LoRA factors only."""
    extra = non_lora_keys(template)
    if extra:
        raise ValueError(f"flora/flexlora handle LoRA factors only; the adapter also has {extra[:3]} "
                         "(modules_to_save / trained biases)")
    return {prefix: (np.shape(template[a_key])[1], np.shape(template[b_key])[0])
            for prefix, (a_key, b_key) in lora_pairs(template).items()}


class HeteroLoraStrategy(LoraDeltaStrategy):
    """FLoRA: sampling and bookkeeping as LoraDeltaStrategy; per-site messages at each site's rank; exact stacked global.

    Subclasses change where a site's LoRA starts (``_start_factors``), what frozen update it gets (``_frozen``) and
    how a round merges (``_merge_round``).
    """

    accumulates = True  # HeteroLoraState: each round's update is appended (False: it replaces the global)

    folds_replies_as_they_arrive = False  # stacking needs every site's factors together

    train_schema = TRAIN_REPLY.with_optional({METRIC_FROZEN_COUNT: COUNT})
    eval_schema = EVAL_REPLY.with_optional({METRIC_FROZEN_COUNT: COUNT})

    def __init__(self, method: str, *, lora_alpha: float, export_rank: int, init_seed: int = 0,
                 min_completed_clients: int = 1, query_timeout: float | None = None, **strategy_kwargs) -> None:
        super().__init__(HeteroLoraState(method, self.accumulates), **strategy_kwargs)
        if strategy_kwargs.get("central_dp") is not None:
            raise ValueError(f"{method}: central DP is not supported (it would need to clip and noise mixed-rank "
                             "factor products)")
        self.method = method
        self.lora_alpha = float(lora_alpha)
        self.export_rank = int(export_rank)
        self.init_seed = int(init_seed)
        self.min_completed_clients = int(min_completed_clients)
        self.query_timeout = query_timeout
        self.profiles: dict[int, SiteProfile] = {}
        self.sent: dict[int, dict[str, np.ndarray]] = {}  # node -> trainable adapter sent this round (float32)

    def scaling(self, rank: int) -> float:
        """PEFT scaling of a rank-`rank` LoRA: alpha / r."""
        return self.lora_alpha / rank

    def _profiles_for(self, grid: Grid, nodes: Sequence[int], config: ConfigRecord, ledger_failed: dict) -> list[int]:
        unknown = [node for node in nodes if node not in self.profiles]
        if unknown:
            # A rank beyond every layer's min(in, out) adds nothing B @ A can hold; a site asking for one would only
            # make the coordinator build (rank x features) factors for it, up to 2**53 rows.
            max_rank = max(min(dims) for dims in _layer_dims(self.current_global).values())
            profiles, errors = query_site_profiles(grid, unknown, config, self.query_timeout, max_rank)
            self.profiles.update(profiles)
            for node, reason in errors.items():
                ledger_failed[node] = f"site-profile query failed: {reason}"
                log.warning("node %d: no site profile, not sent this round: %s", node, reason)
        return [node for node in nodes if node in self.profiles]

    def _trainable(self, server_round: int, node: int, dims: Mapping[str, tuple[int, int]]) -> AdapterArrays:
        rank = self.profiles[node].rank
        rng = np.random.default_rng([self.init_seed, server_round, node])
        adapter: AdapterArrays = {}
        for prefix, (in_features, out_features) in dims.items():
            a, b = self._start_factors(prefix, rank, fresh_lora_a(rank, in_features, rng), np.zeros((out_features, rank)))
            adapter[prefix + LORA_A_SUFFIX] = a.astype(np.float32)
            adapter[prefix + LORA_B_SUFFIX] = b.astype(np.float32)
        return adapter

    def _start_factors(self, prefix: str, rank: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A (rank, in), B (out, rank)) a site trains from, given a fresh LoRA: FLoRA restarts from it."""
        return a, b

    def _evaluated(self, rank: int, dims: Mapping[str, tuple[int, int]]) -> AdapterArrays:
        """The LoRA a site evaluates with: zero (B @ A = 0), so the frozen part alone is the global model."""
        adapter: AdapterArrays = {}
        for prefix, (in_features, out_features) in dims.items():
            adapter[prefix + LORA_A_SUFFIX] = np.zeros((rank, in_features), np.float32)
            adapter[prefix + LORA_B_SUFFIX] = np.zeros((out_features, rank), np.float32)
        return adapter

    def _frozen(self, node: int, evaluate: bool) -> tuple[dict[str, Any], dict[str, ArrayRecord]]:
        """(config entries, records) carrying the frozen global update this node needs."""
        state = self.aggregator
        merged = self.profiles[node].frozen_updates
        # A site ahead of the coordinator (which resumed from an older checkpoint) starts over from 0.
        start = merged if merged <= state.num_updates else 0
        config = {FROZEN_MODE_KEY: FROZEN_ACCUMULATE, FROZEN_FROM_KEY: start, FROZEN_TO_KEY: state.num_updates}
        if start == state.num_updates:
            return config, {}
        return config, {FROZEN_RECORD: to_array_record(state.factors_since(start))}

    def _messages(self, server_round: int, nodes: Sequence[int], config: ConfigRecord, message_type: str,
                  ledger) -> list[Message]:
        dims = _layer_dims(self.current_global)
        action = self.client_train_action if message_type == TRAIN else self.client_evaluate_action
        messages = []
        for node in nodes:
            rank = self.profiles[node].rank
            if message_type == MessageType.TRAIN:
                adapter = self.sent[node] = self._trainable(server_round, node, dims)
            else:
                adapter = self._evaluated(rank, dims)
            frozen_config, frozen_records = self._frozen(node, evaluate=message_type == MessageType.EVALUATE)
            content = RecordDict({"arrays": to_array_record(adapter, self.transport_dtype),
                                  "config": ConfigRecord({**dict(config), **frozen_config}), **frozen_records})
            ledger.bytes_down += sum(record.count_bytes() for record in content.array_records.values())
            messages.append(Message(content=content, message_type=wire_message_type(message_type, action),
                                    dst_node_id=node))
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample as FedAvg; send each site a fresh (flora) or SVD-truncated (flexlora) LoRA at its rank."""
        self.current_global = from_array_record(arrays)
        sampled = [m.metadata.dst_node_id for m in FedAvg.configure_train(self, server_round, arrays, config, grid)]
        ledger = self.ledger(server_round)
        ledger.sampled = sampled
        self.sent = {}
        nodes = self._profiles_for(grid, sampled, config, ledger.failed)
        self._sent = self._messages(server_round, nodes, config, TRAIN, ledger)
        return self._sent

    def _sent_adapter(self, node: int) -> AdapterArrays:
        """The LoRA this node was sent this round (its delta's reference)."""
        if node not in self.sent:
            raise UpdateRejected("reply from a node that was not sent a LoRA this round")
        return self.sent[node]

    def note_reply(self, node: int, metrics: Mapping[str, int | float] | None) -> None:
        """Keep the site's merged-updates count; forget the profile of a site that failed or was rejected."""
        if metrics is None:
            self.profiles.pop(node, None)  # re-query: the site may be out of sync, restarted or changed rank
        elif node in self.profiles and METRIC_FROZEN_COUNT in metrics:
            self.profiles[node].frozen_updates = int(metrics[METRIC_FROZEN_COUNT])

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Rebuild each site's factors (sent + delta); merge sum_i w_i s_i B_i A_i into the exact global."""
        local_adapters, weights, site_ids, metric_rows = [], [], [], []
        for node, delta, num_examples, metrics in self.accepted_updates(server_round, replies, self._sent_adapter):
            local_adapters.append({key: np.asarray(value, np.float64) + np.asarray(delta[key], np.float64)
                                   for key, value in self.sent[node].items()})
            weights.append(float(num_examples))
            site_ids.append(str(node))
            metric_rows.append(metrics)
            self.ledger(server_round).per_site[node][METRIC_RANK] = self.profiles[node].rank
        if len(local_adapters) < max(self.min_completed_clients, 1):
            log.error("round %d: %d usable updates (< %d); global update unchanged", server_round,
                      len(local_adapters), max(self.min_completed_clients, 1))
            return None, None
        try:
            export = self._merge_round(server_round, local_adapters, weights)
        except ValueError as exc:  # incl. LinAlgError
            return self.aggregation_failed(server_round, exc)
        return to_array_record(export, self.transport_dtype), weighted_metrics(metric_rows, weights)

    def _merge_round(self, server_round: int, local_adapters: Sequence[AdapterArrays],
                     weights: Sequence[float]) -> AdapterArrays:
        """Merge sum_i w_i s_i B_i A_i into the exact global; the round loop's next adapter (SVD export)."""
        ranks = [next(iter(lora_ranks(adapter).values())) for adapter in local_adapters]
        stacked = stack_lora_updates(local_adapters, weights, [self.scaling(r) for r in ranks], stacked_scaling=1.0)
        self.aggregator.merge(stacked)
        log.info("round %d: %s merged ranks %s (weights %s); global stacked rank %d", server_round, self.method,
                 ranks, weights, self.aggregator.offsets[-1])
        return self.aggregator.export(self.current_global, self.export_rank, self.scaling(self.export_rank))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Sample as FedAvg; every site evaluates the exact global update (frozen) with a zero LoRA of its rank."""
        self.current_global = from_array_record(arrays)
        sampled = [m.metadata.dst_node_id for m in FedAvg.configure_evaluate(self, server_round, arrays, config, grid)]
        ledger = self.ledger(server_round)
        ledger.eval_sampled = sampled
        nodes = self._profiles_for(grid, sampled, config, ledger.eval_failed)
        self._sent_eval = self._messages(server_round, nodes, config, EVALUATE, ledger)
        return self._sent_eval


def hetero_kwargs(cfg: Any) -> dict[str, Any]:
    """HeteroLoraStrategy's settings from a (validated) RunConfig, shared by its subclasses' builders."""
    return dict(lora_alpha=cfg.lora.alpha, export_rank=cfg.lora.r, init_seed=cfg.lora.init_seed,
                min_completed_clients=cfg.federation.min_completed_clients, **sampling_kwargs(cfg))


def build(cfg: Any) -> HeteroLoraStrategy:
    """FLoRA's coordinator (cfg validated: federation.validation)."""
    return HeteroLoraStrategy("flora", query_timeout=cfg.federation.query_timeout(), **hetero_kwargs(cfg))
