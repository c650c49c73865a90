"""The site's side of FLoRA stacking and FlexLoRA SVD redistribution (sites with their own LoRA rank), and the
frozen global update that FedEx-LoRA (client/fedex.py) shares.

Where a site's rank and local steps come from: client.task.site_settings. ``lora.alpha`` is shared, so
scaling = alpha / r_i.

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

Handlers (registered in client/app.py): ``train`` / ``evaluate`` for message types ``train.flora`` /
``evaluate.flora`` (FLoRA and FlexLoRA), and ``site_profile`` for ``query``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import task
from federation.adapter import from_array_record, to_array_record
from federation.protocol import (FROZEN_ACCUMULATE, FROZEN_FROM_KEY, FROZEN_MODE_KEY, FROZEN_RECORD, FROZEN_TO_KEY,
                                 FROZEN_TRANSIENT, METRIC_FROZEN_COUNT, METRIC_LOCAL_STEPS, METRIC_RANK,
                                 RUN_CONFIG_KEY)
from strategies.aggregators import MixedRanksError
from strategies.lora_exact import lora_pairs, lora_ranks

log = logging.getLogger("fedtune.client")

# Site state (FLoRA): the merged global update and how many aggregated rounds it holds.
FROZEN_STATE = "fedtune.flora.frozen-update"
FROZEN_COUNT_STATE = "fedtune.flora.frozen-count"


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


def _check_received_rank(msg: Message, settings: task.SiteSettings) -> None:
    ranks = set(lora_ranks(from_array_record(msg.content["arrays"])).values())
    if ranks != {settings.rank}:
        raise MixedRanksError(f"the coordinator sent LoRA rank(s) {sorted(ranks)}, this site trains rank "
                              f"{settings.rank}; it must re-query this site's profile")


def _on_frozen_update(msg: Message, context: Context, handler) -> Message:
    """Run handler(msg, context) with the frozen global update applied to the resident model; note its count."""
    cfg = task.parse_run_config(str(msg.content["config"][RUN_CONFIG_KEY]))
    _check_received_rank(msg, task.site_settings(cfg, context.node_config))
    frozen, count = frozen_update_for(msg, context)
    runtime = task.get_runtime(cfg)
    with frozen_lora_update(runtime.model, frozen):
        reply = handler(msg, context)
    if not reply.has_error():
        reply.content["metrics"][METRIC_FROZEN_COUNT] = count
    return reply


def hetero_train(msg: Message, context: Context) -> Message:
    """Train this site's LoRA (its own rank) on top of the frozen global update; reply with the delta."""
    return _on_frozen_update(msg, context, task.train_reply)


def hetero_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global update (frozen part) with this site's LoRA as sent (zero for the global model)."""
    return _on_frozen_update(msg, context, task.evaluate_reply)


def site_profile(msg: Message, context: Context) -> Message:
    """Query handler: this site's rank, local steps and FLoRA merged-rounds count (no model is loaded)."""
    cfg = task.parse_run_config(str(msg.content["config"][RUN_CONFIG_KEY]))
    settings = task.site_settings(cfg, context.node_config)
    _, count = _stored_frozen(context)
    return Message(RecordDict({"metrics": MetricRecord({
        METRIC_RANK: settings.rank, METRIC_LOCAL_STEPS: settings.local_steps, METRIC_FROZEN_COUNT: count,
    })}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """Handler of ``train.flora`` (FLoRA, FlexLoRA): train this site's own-rank LoRA on the frozen global update."""
    return hetero_train(task.for_this_site(msg, context, own_rank=True), context)


def evaluate(msg: Message, context: Context) -> Message:
    """Handler of ``evaluate.flora``: the global update (frozen part) with the LoRA as sent."""
    return hetero_evaluate(task.for_this_site(msg, context, own_rank=True), context)
