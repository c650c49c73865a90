"""Secure aggregation (SecAgg+) of the sites' LoRA deltas: the coordinator learns only their weighted sum.

Flower 1.41 implements SecAgg+ (Bell et al. 2020) only in its legacy layer: ``SecAggPlusWorkflow``
needs a ``LegacyContext`` and a legacy ``Strategy`` (configure_fit / aggregate_fit), and the client
side is the legacy ``secaggplus_mod``. Our round loop (server/app.py) runs one round at a time, so
``secagg_train_round`` drives one SecAgg+ round by hand: it builds a LegacyContext whose legacy
strategy (``_SecureSumCollector``) only hands the FitIns to the sampled nodes and receives the
unmasked aggregate in aggregate_fit. The crypto, masking and dropout recovery are Flower's.

What crosses the wire per site (the coordinator sees): public keys, encrypted key shares, ONE masked
integer vector (mod ``modulus_range``, sent as uint32 for the default 2**32; masks are ChaCha20 streams keyed by
the full shared secrets, federation/secagg_masks.py; no plaintext arrays), the site's plaintext FitRes metrics
(train loss, example count, ...), its data fingerprint (sha256 + example count, a ConfigRecord of its own beside the
FitRes, read per site here and never part of the sum) and Shamir shares in the unmask stage.

Weighting and quantization (Flower's secaggplus_mod / workflow; notation of secagg_error_bound):
site i with delta x_i and weight w_i (its example count; 1 under DP) sends r_i = round(w_i/M * Q)
and z_i = stochastic_round((clip(r_i/Q * x_i, -c, c) + c) * Q / (2c)), c = clipping_range,
Q = quantization_range, M = max_weight. The coordinator unmasks S = sum_i z_i and R = sum_i r_i and
returns (S * 2c/Q - n c) * Q/R = sum_i r_i x_i / R + (2c/R) sum_i e_i with |e_i| < 1 per coordinate.
So, when no value hits c:  |SecAgg mean - FedAvg mean| < 2 c n / R  per coordinate, with R = Q W / M
(W = sum of weights) whenever M divides w_i * Q (M a power of two <= Q: then r_i/R = w_i/W exactly).
Otherwise the rounded weights add at most (n / R) * max_i |x_i|. Requirements: every |w_i/M * x_i| <= c
(else that value is clipped: the site counts them in the metric ``secagg-clipped-values``), w_i <= M,
n * Q < modulus_range (no wrap-around of the sum), Q < 2**31 (Flower quantizes into int32).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import Code, FitIns, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as flower_workflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, generate_key_pairs

from federation.adapter import to_array_record
from federation.config import SECAGG_MAX_MODULUS_RANGE as DEFAULT_MODULUS_RANGE
from federation.privacy import add_gaussian_noise
from federation.protocol import (ADAPTER_KEYS_KEY, CLIPPING_RANGE_KEY, DP_CLIP_NORM_KEY, FEDERATION_RUN_ID_KEY,
                                 MASK_SCHEME, MASK_SCHEME_KEY, MAX_WEIGHT_KEY, RUN_CONFIG_KEY, SERVER_ROUND_KEY)
from federation.secagg_masks import narrow_dtype, use_cryptographic_masks
from federation.validation import check_secagg_aggregator, check_secagg_params  # noqa: F401 (the first re-exported)
from server.replies import (NUM_EXAMPLES, POSITIVE_COUNT, TRAIN_REPLY, decode_data_fingerprint, reply_node,
                            sent_to)
from strategies.fedavg import UpdateRejected, validate_update

log = logging.getLogger("fedtune.server")
# Unmask with the same ChaCha20 masks the sites use (Flower's own come from a 32-bit seed).
use_cryptographic_masks("coordinator")

SCALAR_BYTES = 8  # int / float / bool config values on the wire (at most 64 bits)
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
COLLECT_STAGE = "collect_masked_vectors"  # the stage whose replies carry the masked vector and plaintext FitRes
# float64 steps (multiply/add, client and server) on values of up to Q quantization units, each
# rounding by at most eps * Q units; covered by the (1 + FLOAT64_STEPS * eps * Q) factor of the bound.
FLOAT64_STEPS = 8


@dataclass(frozen=True)
class SecAggParams:
    """SecAgg+ settings (Flower's SecAggPlusWorkflow arguments) for one run.

    num_shares: > 1 -> neighbours per site incl. itself (odd, >= 3; SecAgg+); <= 1 -> fraction of the
      sampled sites (1 = everyone, i.e. SecAgg). reconstruction_threshold: > 1 -> shares needed to
      unmask (>= 2); <= 1 -> fraction of num_shares. A site's neighbourhood must keep at least that
      many live members through every stage or the round fails.
    clipping_range c: values are clipped to [-c, c] before quantization; power of two keeps zeros exact.
    quantization_range Q: integer levels over [-c, c]. max_weight M: largest site weight (example count);
      a power of two dividing Q makes the FedAvg weights exact. timeout: seconds per stage (0: the
      caller's round timeout).
    """

    num_shares: float = 3
    reconstruction_threshold: float = 2
    clipping_range: float = 1.0
    quantization_range: int = 2**22
    max_weight: float = 1024.0
    modulus_range: int = DEFAULT_MODULUS_RANGE
    timeout: float = 0.0

    def __post_init__(self) -> None:
        check_secagg_params(self)  # the same range checks as the run config's privacy.secagg (ConfigError)

    @classmethod
    def from_config(cls, cfg: Any) -> SecAggParams:
        """From federation.config.SecAggConfig (or any object with the same fields)."""
        return cls(num_shares=cfg.num_shares, reconstruction_threshold=cfg.reconstruction_threshold,
                   clipping_range=float(cfg.clipping_range), quantization_range=int(cfg.quantization_range),
                   max_weight=float(cfg.max_weight),
                   modulus_range=int(getattr(cfg, "modulus_range", DEFAULT_MODULUS_RANGE)),
                   timeout=float(cfg.timeout))

    def flower_num_shares(self) -> int | float:
        """Flower's convention: int = count, float = fraction of the sampled sites."""
        return int(self.num_shares) if self.num_shares > 1 else float(self.num_shares)

    def flower_threshold(self) -> int | float:
        """Flower's convention: int = count, float = fraction of num_shares."""
        return int(self.reconstruction_threshold) if self.reconstruction_threshold > 1 \
            else float(self.reconstruction_threshold)

    def resolve(self, num_sampled: int) -> tuple[int, int]:
        """(neighbourhood size incl. self, reconstruction threshold) for num_sampled sites, as Flower computes them."""
        shares = self.flower_num_shares()
        if isinstance(shares, float):
            count = round(shares * num_sampled)
            if count < num_sampled and count % 2 == 0:
                count += 1
            if count <= 2:
                count = num_sampled
        else:
            count = shares
        threshold = self.flower_threshold()
        if isinstance(threshold, float):
            threshold = max(round(threshold * count), 2)
        return min(count, num_sampled), threshold


def secagg_error_bound(weights: Sequence[float], clipping_range: float, quantization_range: int, max_weight: float,
                       max_abs_update: float | None = None) -> float:
    """Largest per-coordinate |SecAgg+ weighted mean - exact FedAvg mean| over the sites with `weights`.

    Valid when no value was clipped (|w_i / max_weight * x_i| <= clipping_range for every coordinate).
    2 c n / R from stochastic rounding (< 1 level per site), R = sum_i round(w_i / M * Q); plus
    (n / R) * max_abs_update when the weights had to be rounded (M does not divide w_i * Q);
    max_abs_update defaults to the largest unclipped value, c * Q / min_i r_i.
    """
    if not weights:
        raise ValueError("need at least one weight")
    q, c, n = int(quantization_range), float(clipping_range), len(weights)
    ratios = [w / max_weight * q for w in weights]
    rounded = [round(r) for r in ratios]
    if min(rounded) <= 0:
        raise ValueError(f"a weight rounds to 0 quantization levels (weights {list(weights)}, max_weight "
                         f"{max_weight}, quantization_range {q}): that site would not count; lower max_weight")
    total = float(sum(rounded))
    bound = 2.0 * c * n / total * (1.0 + FLOAT64_STEPS * np.finfo(np.float64).eps * q)
    if any(r != e for r, e in zip(rounded, ratios)):
        largest = c * q / min(rounded) if max_abs_update is None else float(max_abs_update)
        bound += n / total * largest
    return bound


@dataclass
class SecAggRoundResult:
    """What one SecAgg+ training round produced; mean_delta is None when the round failed (see error)."""

    server_round: int
    mean_delta: dict[str, np.ndarray] | None = None
    # sites whose masked vectors are in the sum, and their plaintext example counts / weights / metrics
    aggregated_nodes: list[int] = field(default_factory=list)
    total_examples: int = 0
    weights: dict[int, float] = field(default_factory=dict)
    site_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    data_fingerprints: dict[int, dict[str, Any]] = field(default_factory=dict)  # {"sha256", "examples"} per site
    sampled_nodes: list[int] = field(default_factory=list)
    # node -> "stage: reason" for sampled sites that dropped out (no reply or an error reply)
    dropped_nodes: dict[int, str] = field(default_factory=dict)
    # node -> why its masked-vector reply was refused (kept out of the sum; its masks removed as for a dropout)
    rejected_nodes: dict[int, str] = field(default_factory=dict)
    masked_bytes_up: dict[int, int] = field(default_factory=dict)  # size of each site's masked vector
    bytes_up: dict[int, int] = field(default_factory=dict)  # all four stages' replies
    bytes_down: int = 0
    num_shares: int = 0
    threshold: int = 0
    error_bound: float | None = None  # per-coordinate quantization bound of mean_delta (before DP noise)
    privacy_report: dict[str, Any] | None = None
    error: str | None = None

    @property
    def num_sites(self) -> int:
        """Sites in the aggregate."""
        return len(self.aggregated_nodes)


class _SecureSumCollector(Strategy):
    """Legacy strategy the SecAgg+ workflow needs: sends one FitIns to fixed nodes, keeps the unmasked mean.

    The workflow overwrites every FitRes.parameters with the unmasked weighted mean before calling
    aggregate_fit, so no individual update ever reaches this object.
    """

    def __init__(self, node_ids: Sequence[int], fit_config: dict[str, Any], grid: Grid, run_id: int):
        self.node_ids = list(node_ids)
        self.fit_config = fit_config
        self.grid = grid
        self.run_id = run_id
        self.mean: list[np.ndarray] | None = None
        self.site_results: dict[int, tuple[int, dict[str, Any]]] = {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        fit_ins = FitIns(parameters, dict(self.fit_config))
        return [(GridClientProxy(node, self.grid, self.run_id), fit_ins) for node in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.site_results = {proxy.node_id: (int(res.num_examples), dict(res.metrics)) for proxy, res in results}
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def check_masked_vector_reply(content: RecordDict, shapes: Sequence[tuple[int, ...]], max_weight: float,
                              where: str, modulus_range: int = DEFAULT_MODULUS_RANGE) -> dict[str, int | float]:
    """Checked plaintext metrics of a site's collect-masked-vectors reply; UpdateRejected when the reply could not
    be summed (masked vector of the wrong count, shape or dtype) or its FitRes or metrics are malformed.

    Flower's workflow would otherwise raise on it and lose the round for everyone; refused, the site counts as
    dropped out at this stage, so its vector stays out of the sum and its pairwise masks are reconstructed.
    """
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    masked = None if configs is None else configs.get(Key.MASKED_PARAMETERS)
    expected = [(1,), *(tuple(shape) for shape in shapes)]  # the weight factor, then one vector per adapter array
    if not isinstance(masked, list) or len(masked) != len(expected) or not all(isinstance(b, bytes) for b in masked):
        raise UpdateRejected(f"masked vector must be {len(expected)} serialized arrays, got "
                             f"{type(masked).__name__} of {len(masked) if isinstance(masked, list) else 0}")
    for index, (blob, shape) in enumerate(zip(masked, expected)):
        try:
            vector = bytes_to_ndarray(blob)
        except Exception as exc:  # not an .npy payload (or a pickled one): this site only
            raise UpdateRejected(f"masked vector part {index} undecodable: {type(exc).__name__}: {exc}") from None
        # Exactly the sites' dtype: mixing e.g. uint64 with int64 would make numpy sum in float64, inexactly.
        if vector.shape != shape or vector.dtype != narrow_dtype(modulus_range):
            raise UpdateRejected(f"masked vector part {index} is {vector.dtype} {vector.shape}, expected "
                                 f"{narrow_dtype(modulus_range)} of shape {shape}")
        if vector.size and int(vector.max()) >= modulus_range:
            raise UpdateRejected(f"masked vector part {index} holds {int(vector.max())}, outside the modulus range "
                                 f"[0, {modulus_range})")
    try:
        fit_res = compat.recorddict_to_fitres(content, keep_input=True)
    except Exception as exc:  # missing or mistyped FitRes records
        raise UpdateRejected(f"malformed FitRes: {type(exc).__name__}: {exc}") from None
    if fit_res.status.code != Code.OK:
        raise UpdateRejected(f"FitRes status {fit_res.status.code.name}: {fit_res.status.message}")
    try:
        weight = POSITIVE_COUNT(fit_res.num_examples)
    except ValueError as exc:
        raise UpdateRejected(f"SecAgg+ weight (FitRes num_examples) {exc}") from None
    if weight > max_weight:
        raise UpdateRejected(f"SecAgg+ weight {weight} exceeds max_weight {max_weight:g}")
    return TRAIN_REPLY.check(fit_res.metrics, where)


# The elliptic curve of the sites' SecAgg+ key pairs (Flower's secaggplus_mod: generate_key_pairs).
_SITE_KEY_CURVE = generate_key_pairs()[1].curve.name


def _public_key_problem(value: object) -> str | None:
    """Why `value` is not a public key a site's secaggplus_mod can agree a shared key with (None: it is one)."""
    if not isinstance(value, bytes):
        return f"not bytes but {type(value).__name__}"
    try:
        key = bytes_to_public_key(value)
    except Exception as exc:  # not PEM, not a public key, a point off its curve
        return f"unreadable: {type(exc).__name__}"
    curve = getattr(key, "curve", None)
    return None if curve is not None and curve.name == _SITE_KEY_CURVE else \
        f"not an elliptic-curve key on {_SITE_KEY_CURVE}"


def _node_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UpdateRejected(f"{what} must be a list of node ids, got {type(value).__name__}")
    if len(set(value)) != len(value):
        raise UpdateRejected(f"{what} names a node more than once")
    return value


def _bytes_list(value: object, what: str, length: int) -> None:
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise UpdateRejected(f"{what} must be a list of bytes, got {type(value).__name__}")
    if len(value) != length:
        raise UpdateRejected(f"{what} has {len(value)} entries for {length} nodes")


def check_key_reply(stage: str, node: int, sent: RecordDict, content: RecordDict) -> None:
    """UpdateRejected unless node `node`'s setup, share-keys or unmask reply holds what an honest site's
    secaggplus_mod sends for the request `sent`: two distinct readable public keys; one ciphertext for each
    neighbour it was sent the keys of; one key share for each node the request named.

    Flower's workflow reads these fields unchecked: a missing or mistyped one raised out of it and lost the round for
    everyone, and a share sent for a node nobody asked about, or ciphertexts for other nodes than the neighbours,
    would leave masks in the sum that nothing removes.
    """
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        raise UpdateRejected(f"no {RECORD_KEY_CONFIGS!r} ConfigRecord")
    asked = sent.config_records.get(RECORD_KEY_CONFIGS, {})  # the coordinator's own request
    if stage == "setup":
        keys = [configs.get(Key.PUBLIC_KEY_1), configs.get(Key.PUBLIC_KEY_2)]
        for name, key in zip((Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2), keys):
            problem = _public_key_problem(key)
            if problem is not None:
                raise UpdateRejected(f"public key {name!r} {problem}")
        if keys[0] == keys[1]:
            raise UpdateRejected("its two public keys are the same key")
    elif stage == "share_keys":
        others = {int(name) for name in asked if name != Key.STAGE} - {node}
        destinations = _node_list(configs.get(Key.DESTINATION_LIST), "destination list")
        _bytes_list(configs.get(Key.CIPHERTEXT_LIST), "ciphertext list", len(destinations))
        if set(destinations) != others:
            raise UpdateRejected(f"ciphertexts for nodes {sorted(destinations)}, expected one for each of its "
                                 f"neighbours {sorted(others)}")
    elif stage == "unmask":
        expected = [*asked[Key.ACTIVE_NODE_ID_LIST], *asked[Key.DEAD_NODE_ID_LIST]]
        owners = _node_list(configs.get(Key.NODE_ID_LIST), "share owner list")
        _bytes_list(configs.get(Key.SHARE_LIST), "share list", len(owners))
        if sorted(owners) != sorted(expected):
            raise UpdateRejected(f"key shares of nodes {sorted(owners)}, asked for {sorted(expected)}")
    else:
        raise ValueError(f"no key reply in SecAgg+ stage {stage!r}")


class _RecordingGrid:
    """Passes the workflow's send_and_receive through and records, per stage, who replied and how much.

    Every reply is checked before the workflow reads it: at the collect stage by check_masked_vector(content, where)
    (check_masked_vector_reply; the checked metrics are kept in `site_metrics`, well-formed data fingerprints in
    `data_fingerprints`), at the others by check_key_reply. A refused reply is withheld from the workflow, so the
    site counts as dropped out at that stage, and its reason is recorded in `rejected` ("<stage>: <reason>").
    """

    def __init__(self, grid: Grid, check_masked_vector: Callable[[RecordDict, str], dict[str, int | float]]):
        self.grid = grid
        self.check_masked_vector = check_masked_vector
        self.rejected: dict[int, str] = {}
        self.site_metrics: dict[int, dict[str, int | float]] = {}
        self.data_fingerprints: dict[int, dict[str, str | int]] = {}
        self.stage = ""
        self.sent: dict[str, list[int]] = {}
        self.ok: dict[str, list[int]] = {}
        self.errors: dict[str, dict[int, str]] = {}
        self.bytes_up: dict[int, int] = {}
        self.bytes_down = 0
        self.masked_bytes: dict[int, int] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        # Flower's setup stage gives every node the SAME RecordDict and secaggplus_mod pops from it;
        # a real transport serializes each message, an in-process grid must not share it.
        seen: set[int] = set()
        for message in messages:
            if id(message.content) in seen:
                message.content = copy.deepcopy(message.content)
            seen.add(id(message.content))
        self.sent[self.stage] = [m.metadata.dst_node_id for m in messages]
        self.bytes_down += sum(_content_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        destinations = sent_to(messages)
        requests = {m.metadata.dst_node_id: m.content for m in messages}
        self.ok[self.stage], self.errors[self.stage] = [], {}
        passed = []
        for reply in replies:
            node = reply_node(reply, destinations)
            if reply.has_error():
                self.errors[self.stage][node] = reply.error.reason
                passed.append(reply)
                continue
            self.bytes_up[node] = self.bytes_up.get(node, 0) + _content_bytes(reply.content)
            try:
                if node not in requests:
                    raise UpdateRejected("a reply to no request of this stage")
                if self.stage == COLLECT_STAGE:
                    self.site_metrics[node] = self.check_masked_vector(reply.content, f"node {node}")
                else:
                    check_key_reply(self.stage, node, requests[node], reply.content)
            except UpdateRejected as exc:
                self.rejected[node] = f"{self.stage}: {exc}"
                log.warning("SecAgg+: REJECTED %s reply of node %d (handled as a dropout at this stage): %s",
                            self.stage, node, exc)
                continue
            if self.stage == COLLECT_STAGE:
                fingerprint = decode_data_fingerprint(reply, f"node {node}")
                if fingerprint is not None:
                    self.data_fingerprints[node] = fingerprint
            self.ok[self.stage].append(node)
            passed.append(reply)
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and isinstance(configs.get(Key.MASKED_PARAMETERS), list):
                self.masked_bytes[node] = sum(len(b) for b in configs[Key.MASKED_PARAMETERS] if isinstance(b, bytes))
        return passed


def _content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message (ConfigRecord.count_bytes rejects the list values SecAgg+ uses, flwr 1.41)."""
    total = sum(record.count_bytes() for record in content.array_records.values())
    for record in [*content.config_records.values(), *content.metric_records.values()]:
        for key, value in record.items():
            total += len(key) + sum(_value_bytes(v) for v in (value if isinstance(value, list) else [value]))
    return total


def _value_bytes(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    return SCALAR_BYTES


class _StagedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's workflow with its four-stage loop written out, to report where a round stopped, forget the sites
    that dropped out before sharing their keys, and keep the unmasked sum for check_unmasked_sum.

    SecAggPlusWorkflow.__call__ only logs "halted"; the stages themselves are Flower's, unchanged.
    """

    unmasked_sum: list[np.ndarray] | None = None

    def run_stages(self, grid: _RecordingGrid, context: LegacyContext) -> tuple[str | None, WorkflowState]:
        """Run setup, share_keys, collect_masked_vectors, unmask; (name of the stage that halted or None, state)."""
        state = WorkflowState()
        steps = (self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage, self.unmask_stage)
        self.unmasked_sum = None
        flower_factor_extract = flower_workflow.factor_extract

        def keeping_unmasked_sum(parameters: list[np.ndarray]):
            # Flower's unmask stage splits the unmasked sum (modulo the range) into weight factor and arrays here.
            self.unmasked_sum = list(parameters)
            return flower_factor_extract(parameters)

        flower_workflow.factor_extract = keeping_unmasked_sum
        try:
            for name, step in zip(STAGES, steps):
                grid.stage = name
                if not step(grid, context, state):  # type: ignore[arg-type]
                    return name, state
                if name in ("setup", "share_keys"):
                    _forget_sites_without_shared_keys(state)
        finally:
            flower_workflow.factor_extract = flower_factor_extract
        return None, state


def _forget_sites_without_shared_keys(state: WorkflowState) -> None:
    """Leave the sites that dropped out (or were refused) before their key shares were forwarded out of the round.

    A site masks only with the neighbours whose key shares it received (secaggplus_mod), so such a site is in no
    mask of the sum, and no site holds shares of its keys. Flower 1.41 still counts it as sampled: at unmask it asks
    the others for its shares and fails the round for want of them.
    """
    live = set(state.active_node_ids)
    state.sampled_node_ids = live
    state.nid_to_neighbours = {node: neighbours & live for node, neighbours in state.nid_to_neighbours.items()
                               if node in live}


def check_unmasked_sum(unmasked: Sequence[np.ndarray], weights: Sequence[float], max_weight: float,
                       quantization_range: int) -> None:
    """ValueError unless `unmasked` (the weight factor, then the arrays) is what the masked vectors of sites with
    these plaintext weights add up to: the factor is the sum of their quantized weights (secaggplus_mod sends
    round(w / max_weight * Q)), every other value lies in [0, n * Q] (n values in [0, Q] each).

    Masks that did not cancel (a site sent wrong key shares, or masked with other neighbours than it shared keys
    with) leave every value uniform over the modulus: the factor alone then matches with probability 1 / modulus.
    A site that tampers with its own masked vector is caught when the sum leaves that range.
    """
    q = int(quantization_range)
    expected = sum(round(weight / max_weight * q) for weight in weights)
    factor = int(np.asarray(unmasked[0]).reshape(-1)[0])
    if factor != expected:
        raise ValueError(f"its weight factor is {factor}, but the weights {sorted(weights)} of the sites in the sum "
                         f"quantize to {expected}")
    top = len(weights) * q
    for index, values in enumerate(unmasked[1:]):
        values = np.asarray(values)
        if values.size and (int(values.min()) < 0 or int(values.max()) > top):
            raise ValueError(f"array {index} holds values in [{int(values.min())}, {int(values.max())}], outside the "
                             f"[0, {top}] that {len(weights)} sites' quantized values add up to")


def _dropped(recorder: _RecordingGrid) -> dict[int, str]:
    dropped: dict[int, str] = {}
    for stage in STAGES:
        if stage not in recorder.sent:
            continue
        for node in recorder.sent[stage]:
            if node in recorder.ok.get(stage, []) or node in dropped or node in recorder.rejected:
                continue
            reason = recorder.errors.get(stage, {}).get(node, "no reply")
            dropped[node] = f"{stage}: {reason.splitlines()[0] if reason else 'error'}"
    return dropped


def secagg_train_round(
    grid: Grid,
    server_round: int,
    global_arrays: Mapping[str, np.ndarray],
    run_config_json: str,
    params: SecAggParams,
    timeout: float | None,
    *,
    node_ids: Sequence[int] | None = None,
    central_dp: Any = None,
    run_id: str | None = None,
) -> SecAggRoundResult:
    """One SecAgg+ training round over `node_ids` (default: all nodes); returns the unmasked mean delta.

    global_arrays: the global adapter sent to the sites ({key: (r, in) / (out, r)}); mean_delta has
    the same keys and shapes (float64). Sites weight by example count; with `central_dp`
    (server.privacy.CentralDP) they clip their delta to its clip norm and weigh 1, and the
    coordinator adds N(0, (sigma*S)^2) to the unmasked SUM (S = clip norm + quantization slack) and
    divides by the expected number of sites. Never raises for a failed round: result.error says why,
    and the caller keeps the previous global adapter.
    """
    result = SecAggRoundResult(server_round=server_round)
    keys = list(global_arrays)
    nodes = sorted(grid.get_node_ids()) if node_ids is None else sorted(int(n) for n in node_ids)
    result.sampled_nodes = list(nodes)
    stage_timeout = params.timeout if params.timeout > 0 else timeout
    dp_clip_norm = 0.0
    max_weight = params.max_weight
    if central_dp is not None:
        dp_clip_norm = float(central_dp.clip_norm)
        # Uniform weights: an example-count weight would let one site, not C, set the sensitivity.
        max_weight = 1.0
        if params.clipping_range < dp_clip_norm:
            result.error = (f"secagg clipping_range {params.clipping_range} is below the DP clip norm {dp_clip_norm}: "
                            "coordinates of clipped updates could still be cut by SecAgg+; raise clipping_range")
            return result
    if len(nodes) < 2:
        result.error = f"SecAgg+ needs at least 2 sampled sites, got {len(nodes)} ({nodes})"
        return result
    num_shares, threshold = params.resolve(len(nodes))
    result.num_shares, result.threshold = num_shares, threshold
    if threshold > num_shares:
        result.error = (f"reconstruction threshold {threshold} exceeds the neighbourhood size {num_shares} "
                        f"({len(nodes)} sampled sites): no round can succeed; lower reconstruction_threshold")
        return result
    if len(nodes) * params.quantization_range >= params.modulus_range:
        result.error = (f"{len(nodes)} sites x quantization_range {params.quantization_range} would wrap around "
                        f"modulus_range {params.modulus_range}; lower quantization_range")
        return result

    fit_config = {
        RUN_CONFIG_KEY: run_config_json,
        SERVER_ROUND_KEY: int(server_round),
        ADAPTER_KEYS_KEY: json.dumps(keys),
        MAX_WEIGHT_KEY: float(max_weight),
        CLIPPING_RANGE_KEY: float(params.clipping_range),
        DP_CLIP_NORM_KEY: dp_clip_norm,
        MASK_SCHEME_KEY: MASK_SCHEME,
        # the federation run id keys the sites' round state (client/site_state.py)
        **({FEDERATION_RUN_ID_KEY: run_id} if run_id else {}),
    }
    collector = _SecureSumCollector(nodes, fit_config, grid, grid.run.run_id)
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(server_round)})
    # Legacy Parameters carry no names: the arrays go in `keys` order (sent along in ADAPTER_KEYS_KEY).
    state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.asarray(global_arrays[k], dtype=np.float32) for k in keys]), keep_input=True)
    # Only for Flower's log line "sampled N clients (out of M)"; the collector picks the nodes itself.
    client_manager = SimpleClientManager()
    for node in nodes:
        client_manager.register(GridClientProxy(node, grid, grid.run.run_id))
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={}),
                            config=ServerConfig(num_rounds=server_round), strategy=collector,
                            client_manager=client_manager)
    workflow = _StagedSecAggPlusWorkflow(
        params.flower_num_shares(), params.flower_threshold(), max_weight=max_weight,
        clipping_range=float(params.clipping_range), quantization_range=int(params.quantization_range),
        modulus_range=int(params.modulus_range), timeout=stage_timeout)
    shapes = [np.shape(global_arrays[key]) for key in keys]
    recorder = _RecordingGrid(grid, lambda content, where: check_masked_vector_reply(
        content, shapes, max_weight, where, modulus_range=int(params.modulus_range)))
    try:
        halted_at, flower_state = workflow.run_stages(recorder, context)
    except Exception as exc:  # a protocol error must not end the federation: this round fails, the next runs
        log.exception("round %d: SecAgg+ raised", server_round)
        halted_at, flower_state = "exception", None
        result.error = f"SecAgg+ round {server_round} raised {type(exc).__name__}: {exc}"
    result.dropped_nodes = _dropped(recorder)
    result.rejected_nodes = dict(recorder.rejected)
    result.masked_bytes_up = dict(recorder.masked_bytes)
    result.bytes_up = dict(recorder.bytes_up)
    result.bytes_down = recorder.bytes_down
    if halted_at is not None or collector.mean is None:
        if result.error is None:
            live = sorted(flower_state.active_node_ids) if flower_state is not None else []
            result.error = (
                f"SecAgg+ round {server_round} failed at stage {halted_at!r}: {len(live)} of {len(nodes)} sampled "
                f"sites still live ({live}); every site needs >= {threshold} live members among its {num_shares} "
                f"neighbours (reconstruction threshold) to unmask; dropped: {result.dropped_nodes}. "
                "Nothing aggregated; the global adapter stays at the previous round")
        log.error("round %d: %s", server_round, result.error)
        return result

    try:
        check_unmasked_sum(workflow.unmasked_sum, [weight for weight, _ in collector.site_results.values()],
                           max_weight, params.quantization_range)
    except ValueError as exc:
        result.error = (f"SecAgg+ round {server_round}: the unmasked sum is no sum of the sites' masked vectors "
                        f"({exc}): a site sent wrong key shares or a tampered masked vector. Nothing aggregated; the "
                        "global adapter stays at the previous round")
        log.error("round %d: %s", server_round, result.error)
        return result
    mean = {key: np.asarray(value, dtype=np.float64).reshape(np.shape(global_arrays[key]))
            for key, value in zip(keys, collector.mean)}
    try:
        validate_update(mean, global_arrays)
    except UpdateRejected as exc:
        result.error = f"SecAgg+ round {server_round}: unmasked aggregate unusable: {exc}"
        log.error("round %d: %s", server_round, result.error)
        return result
    # Only replies that passed check_masked_vector_reply reach the collector: their metrics are the checked ones.
    result.aggregated_nodes = sorted(collector.site_results)
    result.weights = {node: float(n) for node, (n, _) in collector.site_results.items()}
    result.site_metrics = {node: recorder.site_metrics[node] for node in result.aggregated_nodes}
    result.data_fingerprints = {node: recorder.data_fingerprints[node] for node in result.aggregated_nodes
                                if node in recorder.data_fingerprints}
    result.total_examples = int(sum(metrics[NUM_EXAMPLES] for metrics in result.site_metrics.values()))
    result.error_bound = secagg_error_bound(list(result.weights.values()), params.clipping_range,
                                            params.quantization_range, max_weight)
    if central_dp is not None:
        mean, result.privacy_report = _noisy_mean_of_secure_sum(
            central_dp, mean, result.num_sites, dp_clip_norm, params)
    result.mean_delta = mean
    log.info("round %d: SecAgg+ aggregated %d of %d sites (%d examples), dropped %s, quantization bound %.3g",
             server_round, result.num_sites, len(nodes), result.total_examples, result.dropped_nodes or "none",
             result.error_bound)
    return result


def quantized_sensitivity(clip_norm: float, num_coordinates: int, clipping_range: float,
                          quantization_range: int) -> float:
    """L2 bound on one site's contribution to the unmasked sum: C + sqrt(d) * 2c/Q (stochastic rounding)."""
    return clip_norm + math.sqrt(num_coordinates) * 2.0 * clipping_range / quantization_range


def _noisy_mean_of_secure_sum(central_dp: Any, mean: dict[str, np.ndarray], num_sites: int, clip_norm: float,
                              params: SecAggParams) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """DP-FedAvg on the secure sum: (sum + N(0, (sigma*S)^2)) / expected sites; records the round in the ledger.

    The sites clipped to C themselves; quantization can add up to sqrt(d) * 2c/Q to a site's norm, so
    the noise is scaled to that sensitivity S and the ledger's noise multiplier stays sigma.
    """
    num_coordinates = int(sum(np.size(v) for v in mean.values()))
    sensitivity = quantized_sensitivity(clip_norm, num_coordinates, params.clipping_range, params.quantization_range)
    secure_sum = {key: value * num_sites for key, value in mean.items()}
    noisy = add_gaussian_noise(secure_sum, central_dp.sum_noise_multiplier, sensitivity, central_dp.rng)
    noisy_mean = {key: value / central_dp.expected_sites for key, value in noisy.items()}
    epsilon = central_dp.ledger.record_round(central_dp.noise_multiplier, central_dp.sample_rate)
    report = {"epsilon": epsilon, "delta": central_dp.cfg.delta, "noise_multiplier": central_dp.noise_multiplier,
              "clip_norm": clip_norm, "next_clip_norm": clip_norm, "sample_rate": central_dp.sample_rate,
              "sensitivity": sensitivity, "accountant": central_dp.cfg.accountant, "secagg": True,
              "num_sites": num_sites}
    log.info("central DP over SecAgg+: epsilon %.4f (delta %.1e); C=%.4g, sensitivity %.6g, sigma=%.4g",
             epsilon, central_dp.cfg.delta, clip_norm, sensitivity, central_dp.noise_multiplier)
    return noisy_mean, report


def secure_train_round(strategy: Any, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                       params: SecAggParams, timeout: float | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Drop-in for configure_train + send_and_receive + aggregate_train of server.strategy.LoraDeltaStrategy.

    Samples with the strategy, runs secagg_train_round, fills the strategy's round ledger and hands
    the (noisy, under DP) mean delta to its aggregator as one update weighted by the total examples.
    Returns (new global ArrayRecord, train metrics) or (None, None) when the round failed.
    """
    from server.strategy import weighted_metrics  # the strategy module imports flwr's message API only

    check_secagg_aggregator(strategy.aggregator.name)
    if strategy.central_dp is not None and strategy.central_dp.adaptive is not None:
        raise ValueError("adaptive clipping needs each site's clipped/unclipped bit, which SecAgg+ hides; "
                         "use a fixed clip norm with privacy.secagg")
    messages = strategy.configure_train(server_round, arrays, ConfigRecord(dict(config)), grid)
    node_ids = [m.metadata.dst_node_id for m in messages]
    result = secagg_train_round(grid, server_round, strategy.current_global, str(config[RUN_CONFIG_KEY]), params,
                                timeout, node_ids=node_ids, central_dp=strategy.central_dp,
                                run_id=config.get(FEDERATION_RUN_ID_KEY))
    ledger = strategy.ledger(server_round)
    ledger.bytes_down = result.bytes_down
    ledger.bytes_up += sum(result.bytes_up.values())
    ledger.failed.update(result.dropped_nodes)
    ledger.rejected.update(result.rejected_nodes)
    if result.error is not None:
        for node in node_ids:
            if node not in ledger.rejected:
                ledger.failed.setdefault(node, result.error)
        return None, None
    ledger.accepted.extend(result.aggregated_nodes)
    for node in result.aggregated_nodes:
        ledger.per_site[node] = {**result.site_metrics[node], "bytes_up": result.bytes_up.get(node, 0),
                                 "masked_bytes_up": result.masked_bytes_up.get(node, 0)}
    ledger.data_fingerprints.update(result.data_fingerprints)
    if result.privacy_report is not None:
        strategy.privacy_reports[server_round] = result.privacy_report
    new_global = strategy.aggregator.aggregate(strategy.current_global, [result.mean_delta],
                                               [float(max(result.total_examples, 1))], ["secagg"])
    rows = [result.site_metrics[n] for n in result.aggregated_nodes]
    site_weights = [float(result.site_metrics[n][NUM_EXAMPLES]) for n in result.aggregated_nodes]
    return to_array_record(new_global, strategy.transport_dtype), weighted_metrics(rows, site_weights)


def secagg_params_for_run(cfg: Any) -> SecAggParams | None:
    """SecAggParams for a RunConfig with privacy.secagg.enabled (None otherwise).

    The setups SecAgg+ cannot serve (aggregator, adaptive clipping, clip ranges, wrap-around, sites per round)
    were refused when cfg was composed (federation.validation).
    """
    if not cfg.privacy.secagg.enabled:
        return None
    return SecAggParams.from_config(cfg.privacy.secagg)
