"""Sites with their own LoRA rank (and local step count): FLoRA stacking and FlexLoRA SVD redistribution.

Where a site's rank and local steps come from (first match wins):
  node config ``lora-r`` / ``local-steps`` (deployment: ``flower-supernode --node-config "lora-r=4"``),
  then ``strategy.params.site_ranks`` / ``site_local_steps`` indexed by ``partition-id % len`` (simulation),
  then the run's ``lora.r`` / ``train.local_steps``. ``lora.alpha`` is shared, so scaling = alpha / r_i.

The site trains a LoRA of ITS rank on top of a frozen global update that the coordinator keeps as
stacked factors (B_f (out, R), A_f (R, in), scaling 1): every LoRA layer's output gets + x A_f^T B_f^T
from a forward hook. Why a hook and not merging into the base weights or a second PEFT adapter:
- merging into a 4-bit QLoRA weight would requantize it (NF4 error added every round, nothing exact);
- the base model is resident and shared by every site a process serves (Ray actors, in-process
  simulation), so per-site merged weights would need a full per-site copy of the base;
- a second PEFT adapter would show up in the adapter codec (``federation.adapter`` takes every
  ``.lora_`` parameter) and would have to be deleted and re-created whenever its rank grows.
The hook adds one low-rank matmul pair per layer and works for the fp32 and the 4-bit path alike.

FLoRA (``strategy=flora``): the frozen update is the sum of all aggregated rounds; the site keeps it in
``Context.state`` and receives only the rounds it has not merged yet (``FROZEN_FROM_KEY`` ..
``FROZEN_TO_KEY``, counted in aggregated rounds); its own LoRA is re-initialised by the coordinator
every round. FedEx-LoRA (``strategy=fedex_lora``, one rank everywhere): the frozen update is the sum of
the rounds' residuals mean(s B_i A_i) - s mean(B) mean(A), kept and sent exactly as FLoRA's; the site's
own LoRA is the FedAvg of the factors (not re-initialised). FlexLoRA (``strategy=flexlora``): the coordinator sends the site its rank-r_i SVD
truncation of the global update as the trainable LoRA; for evaluation it sends the exact global
update as a transient frozen part (nothing is stored).

client.secagg holds the one dispatching ClientApp (``make_lora_methods_app``): it answers plain,
SecAgg+, FLoRA, FlexLoRA, FedEx-LoRA, SCAFFOLD and FedSA-LoRA messages, picking the handler by the run config's
``strategy.name`` that every message carries, plus the site-profile query.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

import client.app as plain_client
import client.fedsa as fedsa_client
import client.scaffold as scaffold_client
from client.app import RUN_CONFIG_KEY
from client.fedsa import with_run_config
from federation.adapter import from_array_record, to_array_record
from federation.protocol import (FROZEN_ACCUMULATE, FROZEN_FROM_KEY, FROZEN_MODE_KEY, FROZEN_RECORD,  # noqa: F401
                                 FROZEN_TO_KEY, FROZEN_TRANSIENT, METRIC_FROZEN_COUNT, METRIC_LOCAL_STEPS, METRIC_RANK,
                                 NODE_LOCAL_STEPS_KEY, NODE_RANK_KEY)
from federation.config import FEDEX_STRATEGY, FROZEN_UPDATE_STRATEGIES, HETERO_STRATEGIES, PARAM_SITE_LOCAL_STEPS, PARAM_SITE_RANKS, RunConfig
from strategies.aggregators import MixedRanksError
from strategies.lora_exact import lora_pairs, lora_ranks

log = logging.getLogger("fedtune.client")

# Site state (FLoRA): the merged global update and how many aggregated rounds it holds.
FROZEN_STATE = "fedtune.flora.frozen-update"
FROZEN_COUNT_STATE = "fedtune.flora.frozen-count"


@dataclass(frozen=True)
class SiteSettings:
    """This site's LoRA rank and local optimizer steps per round."""

    rank: int
    local_steps: int


def _per_partition(values, node_config: Mapping, what: str) -> int | None:
    if not values:
        return None
    if "partition-id" not in node_config:
        raise ValueError(f"strategy.params.{what} is given per simulation partition, but this node has no "
                         f"partition-id; set node config '{NODE_RANK_KEY}' / '{NODE_LOCAL_STEPS_KEY}' instead")
    return int(list(values)[int(node_config["partition-id"]) % len(values)])


def site_settings(cfg: RunConfig, node_config: Mapping) -> SiteSettings:
    """Rank and local steps of this site: node config, else params lists by partition id, else the run's."""
    return _settings(cfg.strategy.params or {}, cfg.lora.r, cfg.train.local_steps, node_config)


def _settings(params: Mapping, run_rank: int, run_local_steps: int, node_config: Mapping) -> SiteSettings:
    rank = node_config.get(NODE_RANK_KEY)
    if rank is None:
        rank = _per_partition(params.get(PARAM_SITE_RANKS), node_config, PARAM_SITE_RANKS)
    steps = node_config.get(NODE_LOCAL_STEPS_KEY)
    if steps is None:
        steps = _per_partition(params.get(PARAM_SITE_LOCAL_STEPS), node_config, PARAM_SITE_LOCAL_STEPS)
    settings = SiteSettings(int(run_rank if rank is None else rank), int(run_local_steps if steps is None else steps))
    if settings.rank < 1 or settings.local_steps < 1:
        raise ValueError(f"site LoRA rank and local steps must be >= 1, got {settings}")
    return settings


def site_run_config(run_config: Mapping, settings: SiteSettings, own_rank: bool) -> dict:
    """The run config (as the JSON dict on the wire) with this site's local steps and (own_rank) its LoRA rank.

    With its own rank (FLoRA/FlexLoRA) the site's LoRA is re-initialised or replaced every round, so an
    upload codec's error-feedback residual (in the coordinates of last round's factors) would add noise
    to the next delta: the codec still compresses each upload, without feedback.
    """
    site = copy.deepcopy(dict(run_config))
    site["train"]["local_steps"] = settings.local_steps
    if own_rank:
        site["lora"]["r"] = settings.rank
        site["federation"]["upload_error_feedback"] = False
    return site


@contextmanager
def frozen_lora_update(model: torch.nn.Module, factors: Mapping[str, np.ndarray] | None):
    """Inside: every LoRA layer named in `factors` outputs + B_f @ A_f @ x (A_f (R, in), B_f (out, R), scaling 1)."""
    handles = []
    try:
        for prefix, (a_key, b_key) in (lora_pairs(factors) if factors else {}).items():
            if np.shape(factors[a_key])[0] == 0:
                continue
            module = model.get_submodule(prefix)
            device = module.get_base_layer().weight.device
            a = torch.as_tensor(np.asarray(factors[a_key], dtype=np.float32), device=device)
            b = torch.as_tensor(np.asarray(factors[b_key], dtype=np.float32), device=device)
            handles.append(module.register_forward_hook(_adds_low_rank(a, b)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adds_low_rank(a: torch.Tensor, b: torch.Tensor):
    def hook(module, args, output):
        x = args[0]
        # fp32 for the frozen path whatever the compute dtype (bf16 under QLoRA), then back.
        return output + torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b).to(output.dtype)

    return hook


def _stored_frozen(context: Context) -> tuple[dict[str, np.ndarray], int]:
    stored = context.state.array_records.get(FROZEN_STATE)
    count = context.state.config_records.get(FROZEN_COUNT_STATE)
    return (from_array_record(stored) if stored is not None else {}), (int(count["count"]) if count else 0)


def frozen_update_for(msg: Message, context: Context) -> tuple[dict[str, np.ndarray] | None, int]:
    """(frozen factors to apply for this message, merged-rounds count to report); FLoRA updates Context.state."""
    config = msg.content["config"]
    mode = config.get(FROZEN_MODE_KEY)
    received = from_array_record(msg.content[FROZEN_RECORD]) if FROZEN_RECORD in msg.content.array_records else {}
    if mode == FROZEN_TRANSIENT:
        return received, 0
    if mode != FROZEN_ACCUMULATE:
        return None, 0
    stored, count = _stored_frozen(context)
    start, end = int(config[FROZEN_FROM_KEY]), int(config[FROZEN_TO_KEY])
    if start == 0:
        if count:
            log.info("FLoRA: the coordinator resent the global update from the start; replacing %d merged updates",
                     count)
        merged = received
    elif start == count:
        merged = {key: np.concatenate([stored[key], received[key]], axis=0 if ".lora_A." in key else 1)
                  for key in stored} if received and stored else (received or stored)
    else:
        raise RuntimeError(f"FLoRA: this site has merged {count} global updates, the coordinator sent updates "
                           f"{start}..{end}; it will re-query this site's state")
    if start != count or received:
        context.state[FROZEN_STATE] = to_array_record(merged)
        context.state[FROZEN_COUNT_STATE] = ConfigRecord({"count": int(end)})
    return merged, end


def _check_received_rank(msg: Message, settings: SiteSettings) -> None:
    ranks = set(lora_ranks(from_array_record(msg.content["arrays"])).values())
    if ranks != {settings.rank}:
        raise MixedRanksError(f"the coordinator sent LoRA rank(s) {sorted(ranks)}, this site trains rank "
                              f"{settings.rank}; it must re-query this site's profile")


def _on_frozen_update(msg: Message, context: Context, handler) -> Message:
    """Run handler(msg, context) with the frozen global update applied to the resident model; note its count."""
    cfg = plain_client.parse_run_config(str(msg.content["config"][RUN_CONFIG_KEY]))
    _check_received_rank(msg, site_settings(cfg, context.node_config))
    frozen, count = frozen_update_for(msg, context)
    runtime = plain_client.get_runtime(cfg)
    with frozen_lora_update(runtime.model, frozen):
        reply = handler(msg, context)
    if not reply.has_error():
        reply.content["metrics"][METRIC_FROZEN_COUNT] = count
    return reply


def hetero_train(msg: Message, context: Context) -> Message:
    """Train this site's LoRA (its own rank) on top of the frozen global update; reply with the delta."""
    return _on_frozen_update(msg, context, plain_client.train_reply)


def hetero_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global update (frozen part) with this site's LoRA as sent (zero for the global model)."""
    return _on_frozen_update(msg, context, plain_client.evaluate)


def site_profile(msg: Message, context: Context) -> Message:
    """Query handler: this site's rank, local steps and FLoRA merged-rounds count (no model is loaded)."""
    cfg = plain_client.parse_run_config(str(msg.content["config"][RUN_CONFIG_KEY]))
    settings = site_settings(cfg, context.node_config)
    _, count = _stored_frozen(context)
    return Message(RecordDict({"metrics": MetricRecord({
        METRIC_RANK: settings.rank, METRIC_LOCAL_STEPS: settings.local_steps, METRIC_FROZEN_COUNT: count,
    })}), reply_to=msg)


def _routed(msg: Message, context: Context) -> tuple[str, Message]:
    """(strategy name, msg with this site's run config) — refuses a site rank the strategy cannot use."""
    # Plain JSON, not run_config_from_json: the schema validation (~70 ms) runs once, in the handler.
    run_config = json.loads(str(msg.content["config"][RUN_CONFIG_KEY]))
    name, run_rank = run_config["strategy"]["name"], int(run_config["lora"]["r"])
    settings = _settings(run_config["strategy"].get("params") or {}, run_rank,
                         int(run_config["train"]["local_steps"]), context.node_config)
    if name not in HETERO_STRATEGIES and settings.rank != run_rank:
        raise MixedRanksError(f"this site is configured for LoRA rank {settings.rank}, but strategy {name!r} "
                              f"trains rank {run_rank} at every site; use strategy=flora or strategy=flexlora")
    if name not in (*FROZEN_UPDATE_STRATEGIES, "scaffold", "fedsa_lora"):
        return name, msg  # plain strategies run exactly as before
    site_config = site_run_config(run_config, settings, own_rank=name in HETERO_STRATEGIES)
    return name, with_run_config(msg, json.dumps(site_config, sort_keys=True))


def dispatch_train(msg: Message, context: Context) -> Message:
    """Train handler for every strategy: FLoRA/FlexLoRA/FedEx-LoRA, SCAFFOLD, FedSA-LoRA, else client.app.train."""
    name, msg = _routed(msg, context)
    if name in FROZEN_UPDATE_STRATEGIES:
        return hetero_train(msg, context)
    if name == "scaffold":
        return scaffold_client.train(msg, context)
    if name == "fedsa_lora":
        return fedsa_client.train(msg, context)
    return plain_client.train(msg, context)


def dispatch_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate handler for every strategy (FedSA-LoRA: the site's own B; FLoRA/FlexLoRA/FedEx: the frozen global)."""
    name, msg = _routed(msg, context)
    if name in FROZEN_UPDATE_STRATEGIES:
        return hetero_evaluate(msg, context)
    if name == "fedsa_lora":
        return fedsa_client.evaluate(msg, context)
    return plain_client.evaluate(msg, context)
