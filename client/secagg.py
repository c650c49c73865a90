"""The site's side of SecAgg+: train as usual, hand the LoRA delta to Flower's secaggplus_mod to mask.

The ClientApp's default train handler (client/app.py) serves both kinds of train message, so simulation and
``flwr run`` need no switch on the client: a SecAgg+ protocol message (it carries Flower's "secaggplus" config
record) goes through ``secaggplus_mod`` (``secaggplus_when_requested``, the handler's mod); a plain message-API
train message goes straight to plain training (unless the node config sets ``require-secagg``, then it is
refused).

Flower's secaggplus_mod speaks the legacy layout: it calls the app with the legacy FitIns records
(``fitins.parameters``, ``fitins.config``) and reads the reply as a legacy FitRes. ``secagg_fit``
translates: it builds the plain train message local training expects, runs it (``local_update``: the RAW
float delta, never the lossy upload codec or its error feedback — masking hides the values anyway, and
encoding then decoding would only add error), and returns the delta as FitRes parameters (in the key order
the coordinator sent) with the example count as FitRes.num_examples, which secaggplus_mod uses as the weight.
The site's data fingerprint (sha256 and example count: provenance, not secret) rides along in the reply as the
same ConfigRecord a plain train reply carries: secaggplus_mod keeps every record of the app's reply, clears
only its arrays and adds its own "secaggplus" record, so the fingerprint reaches the coordinator unmasked.

Central DP over SecAgg+ needs each site to clip its own delta (the coordinator only sees the sum).
Flower's fixedclipping_mod is not used: it computes ``reply - received params`` and writes back
``received + clipped``, i.e. it assumes the reply holds full weights, whereas ours holds a delta
already; feeding it zero "params" would work but hides a delta/weights convention mismatch in the
mod chain. Clipping here with federation.privacy.clip_update is the same code the coordinator uses
for DP without SecAgg, so both paths clip identically.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client import task
from client.site_policy import SiteRefusal, policy_of
from client.site_state import server_round_of
from federation.compression import decode_upload
from federation.adapter import host_arrays, to_array_record
from federation.packing import unpack_arrays
from federation.privacy import clip_update
from federation.protocol import RUN_CONFIG_KEY
from federation.protocol import (ADAPTER_KEYS_KEY, CLIPPED_VALUES_METRIC, CLIPPING_RANGE_KEY, DATA_FINGERPRINT_RECORD,
                                 DP_CLIP_NORM_KEY, FEDERATION_RUN_ID_KEY, LEGACY_FIT_PARAMETERS, MASK_SCHEME,
                                 MASK_SCHEME_KEY, MAX_WEIGHT_KEY, REQUIRE_SECAGG_NODE_KEY, SERVER_ROUND_KEY)
from federation.secagg_masks import use_cryptographic_masks

log = logging.getLogger("fedtune.client")
# Flower's own SecAgg+ masks come from a 32-bit seed (federation/secagg_masks.py): replaced before any round.
use_cryptographic_masks("site")

TrainFn = Callable[[Message, Context], Message]
# (train message, context) -> (raw float delta, reply metrics, data fingerprint {"sha256", "examples"} or None)
UpdateFn = Callable[[Message, Context], tuple[dict[str, np.ndarray], dict, dict | None]]


def local_update(msg: Message, context: Context) -> tuple[dict[str, np.ndarray], dict, dict | None]:
    """Plain local training for SecAgg+: (the raw float delta, the train metrics, the data fingerprint); no upload
    codec, no feedback."""
    update = task.train_update(task.for_this_site(msg, context, site_steps=False), context)
    result = update.result
    log.info("round %d: trained on %d examples (%d steps, %d tokens, loss %.4f, %.0f tok/s); masking for SecAgg+",
             server_round_of(msg), result.num_examples, result.steps, result.input_tokens, result.train_loss,
             result.tokens_per_second)
    fingerprint = task.data_fingerprint(task.get_runtime(update.cfg), update.cfg, context)
    return host_arrays(update.delta), dict(task.train_metrics(context, result, update.extra_metrics)), fingerprint


def update_from_reply(train_fn: TrainFn) -> UpdateFn:
    """An UpdateFn from a train handler that replies with a Message (stand-in sites: tests, attack simulations)."""
    def update(msg: Message, context: Context) -> tuple[dict[str, np.ndarray], dict, dict | None]:
        reply = train_fn(msg, context)
        if reply.has_error():
            raise RuntimeError(f"local training failed: {reply.error.reason}")
        delta = decode_upload(unpack_arrays(reply.content["arrays"]))
        fingerprint = reply.content.config_records.get(DATA_FINGERPRINT_RECORD)
        return delta, dict(reply.content["metrics"]), None if fingerprint is None else dict(fingerprint)

    return update


def secagg_upload(delta: Mapping[str, np.ndarray], num_examples: int, max_weight: float, clipping_range: float,
                  dp_clip_norm: float = 0.0) -> tuple[dict[str, np.ndarray], int, int]:
    """(float64 delta to mask, weight for secaggplus_mod, count of values SecAgg+ will clip to +-c).

    Without DP the weight is the example count (FedAvg); secaggplus_mod scales the delta by
    weight / max_weight before quantizing, so values with |weight / max_weight * x| > c are cut.
    With DP (dp_clip_norm > 0) the delta is clipped to L2 norm C and weighs 1 (uniform DP-FedAvg).
    """
    update = {key: np.asarray(value, dtype=np.float64) for key, value in delta.items()}
    if dp_clip_norm > 0:
        update, _ = clip_update(update, dp_clip_norm)
        weight = 1
    else:
        weight = int(num_examples)
        if weight > max_weight:
            # Flower only warns: the weighted values and the weight sum could then overflow the modulus.
            raise ValueError(f"this site's weight (num-examples={weight}) exceeds privacy.secagg.max_weight="
                             f"{max_weight}; raise max_weight on the coordinator")
        if weight <= 0:
            raise ValueError(f"num-examples must be positive for SecAgg+, got {weight}")
    scale = weight / max_weight
    clipped = int(sum(np.count_nonzero(np.abs(value) * scale > clipping_range) for value in update.values()))
    if clipped:
        log.warning("SecAgg+: %d values of this site's weighted delta exceed clipping_range %g and will be clipped; "
                    "raise privacy.secagg.clipping_range", clipped, clipping_range)
    return update, weight, clipped


def secagg_fit(msg: Message, context: Context, update_fn: UpdateFn = local_update) -> Message:
    """Legacy FitIns in (as secaggplus_mod passes it) -> local training -> legacy FitRes with the raw delta."""
    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = fit_ins.config
    if config.get(MASK_SCHEME_KEY) != MASK_SCHEME:
        # A coordinator that would unmask with Flower's 32-bit-seed masks gets nothing from this site.
        raise ValueError(f"the coordinator did not announce SecAgg+ mask scheme {MASK_SCHEME!r} "
                         f"(got {config.get(MASK_SCHEME_KEY)!r}); this site masks only with it")
    keys = json.loads(str(config[ADAPTER_KEYS_KEY]))
    arrays = parameters_to_ndarrays(fit_ins.parameters)
    if len(keys) != len(arrays):
        raise ValueError(f"SecAgg+ FitIns carries {len(arrays)} arrays for {len(keys)} adapter keys")
    global_arrays = dict(zip(keys, arrays))
    train_config = {RUN_CONFIG_KEY: str(config[RUN_CONFIG_KEY]), SERVER_ROUND_KEY: int(config[SERVER_ROUND_KEY])}
    if FEDERATION_RUN_ID_KEY in config:  # keys the site's round state (client/site_state.py)
        train_config[FEDERATION_RUN_ID_KEY] = str(config[FEDERATION_RUN_ID_KEY])
    train_msg = Message(
        metadata=copy.copy(msg.metadata),
        content=RecordDict({"arrays": to_array_record(global_arrays), "config": ConfigRecord(train_config)}),
    )
    delta, metrics, fingerprint = update_fn(train_msg, context)
    update, weight, clipped = secagg_upload(delta, int(metrics["num-examples"]), float(config[MAX_WEIGHT_KEY]),
                                            float(config[CLIPPING_RANGE_KEY]), float(config[DP_CLIP_NORM_KEY]))
    metrics[CLIPPED_VALUES_METRIC] = clipped
    # float64 on purpose: secaggplus_mod scales and quantizes in the arrays' dtype, and float32 would
    # add up to ~0.6 quantization levels of rounding per value at Q = 2**22. Only the masked integer
    # vector (uint32 for the default modulus) leaves the site; these arrays are cleared by secaggplus_mod.
    fit_res = FitRes(status=Status(code=Code.OK, message=""),
                     parameters=ndarrays_to_parameters([update[key] for key in keys]),
                     num_examples=weight, metrics={k: v for k, v in metrics.items() if not isinstance(v, list)})
    content = compat.fitres_to_recorddict(fit_res, keep_input=False)
    if fingerprint is not None:  # outside the FitRes: never masked or summed, read per site by the coordinator
        content.config_records[DATA_FINGERPRINT_RECORD] = ConfigRecord(fingerprint)
    return Message(content, reply_to=msg)


def _requires_secagg(context: Context) -> bool:
    """The site's policy (require_secagg), or a simulation node's config (require-secagg), refuses plain uploads."""
    policy = policy_of(context)
    if policy is not None and policy.require_secagg:
        return True
    value = context.node_config.get(REQUIRE_SECAGG_NODE_KEY, False)
    return value is True or str(value).lower() in ("true", "1", "yes")


def secaggplus_when_requested(msg: Message, context: Context, call_next: TrainFn) -> Message:
    """Mod: Flower's secaggplus_mod for SecAgg+ protocol messages; plain train messages pass through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    if _requires_secagg(context):
        raise SiteRefusal(f"this site requires SecAgg+ (policy.require_secagg, or node config {REQUIRE_SECAGG_NODE_KEY}) "
                          "and does not upload plain deltas; run the coordinator with privacy.secagg.enabled=true")
    return call_next(msg, context)


def make_secagg_app(train_fn: TrainFn, evaluate_fn: TrainFn = task.evaluate_reply) -> ClientApp:
    """A ClientApp around a stand-in train handler (tests, attack simulations): plain and SecAgg+ train, evaluate.

    The real sites run client.app.app; this one masks whatever delta `train_fn`'s reply carries (decoded).
    """
    app = ClientApp()

    @app.train(mods=[secaggplus_when_requested])
    def train(msg: Message, context: Context) -> Message:
        if LEGACY_FIT_PARAMETERS in msg.content.array_records:
            return secagg_fit(msg, context, update_from_reply(train_fn))
        return train_fn(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return evaluate_fn(msg, context)

    return app
