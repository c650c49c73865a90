"""The site's side of SCAFFOLD (Karimireddy et al. 2020, option II) on the LoRA adapter.

The coordinator sends its control variate c next to the global adapter (ArrayRecord ``C_GLOBAL_RECORD``);
the site keeps its own c_i as round state (client/site_state.py: per federation run and round, so a
resumed run continues from the same c_i), corrects every
gradient to ``grad - c_i + c`` before the optimizer step, and after training replies with the usual
LoRA delta plus ``delta_c = c_i+ - c_i`` (ArrayRecord ``DELTA_C_RECORD``).

Option II reads the mean corrected gradient off the displacement: with K plain SGD steps at a
constant lr, (x - y_i) / (K * lr) = mean_k (g_k - c_i + c), so c_i+ = c_i - c + (x - y_i) / (K * lr)
= mean_k g_k. The local trainer runs AdamW with warm-up and a cosine schedule, whose displacement is
in units of lr per step, not of gradients (it made c dominate the gradient and slowed training on the
demo task). So by default (``strategy.params.control_variate: gradient``) the site hands
client_control_update the point SGD would have reached with the same corrected gradients,
y_sgd = x - lr * sum_k (g_k - c_i + c), which yields the paper's c_i+ = mean_k g_k exactly;
``control_variate: displacement`` uses the real trained adapter instead (the formula verbatim).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message

from client import task
from client.site_state import SiteState, server_round_of, site_state
from federation.adapter import from_array_record, get_adapter_arrays, lora_parameters, to_array_record
from federation.packing import unpack_arrays
from federation.protocol import C_GLOBAL_RECORD, CONTROL_DTYPE, DELTA_C_RECORD, RUN_CONFIG_KEY
from strategies.params import CONTROL_VARIATES
from strategies.registry import strategy_params
from strategies.scaffold import client_control_update, correct_gradient, zero_control

# The site's own c_i (site round state).
C_LOCAL_STATE = "fedtune.scaffold.c-local"


def _float64(record) -> dict[str, np.ndarray]:
    return {key: np.asarray(value, dtype=np.float64) for key, value in unpack_arrays(record).items()}


def local_control(site: SiteState, server_round: int, c_global: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The c_i this site enters `server_round` with, zeros (shaped like c) before its first round."""
    stored = site.load_arrays(C_LOCAL_STATE, server_round)
    if stored is None:
        return zero_control(c_global)
    c_local = {key: np.asarray(value, dtype=np.float64) for key, value in stored.items()}
    if set(c_local) != set(c_global) or any(c_local[k].shape != c_global[k].shape for k in c_global):
        raise ValueError("SCAFFOLD: this site's stored control variate does not match the coordinator's c "
                         "(different model or LoRA config than in earlier rounds of this run)")
    return c_local


def train(msg: Message, context: Context) -> Message:
    """Handler of ``train.scaffold``: SCAFFOLD-corrected gradients; reply with the delta and delta_c; keep c_i+."""
    msg = task.for_this_site(msg, context)
    cfg = task.parse_run_config(str(msg.content["config"][RUN_CONFIG_KEY]))
    if cfg.privacy.local_dp_sgd.enabled:
        # The DP-SGD path (Opacus) does not call before_step, so the correction would be silently missing.
        raise ValueError("SCAFFOLD cannot run with privacy.local_dp_sgd (the Opacus step skips the gradient "
                         "correction)")
    if C_GLOBAL_RECORD not in msg.content.array_records:
        raise ValueError(f"SCAFFOLD train message without the coordinator's control variate ({C_GLOBAL_RECORD})")
    c_global = _float64(msg.content[C_GLOBAL_RECORD])
    site, server_round = site_state(msg, context, cfg.output_dir), server_round_of(msg)
    c_local = local_control(site, server_round, c_global)
    runtime = task.get_runtime(cfg)
    key_of = {id(param): key for key, param in lora_parameters(runtime.model).items()}
    device = next(iter(lora_parameters(runtime.model).values())).device
    # Converted once per round, not per step.
    c_local_t = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in c_local.items()}
    c_global_t = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in c_global.items()}

    variant = strategy_params(cfg.strategy).control_variate
    if variant not in CONTROL_VARIATES:  # checked where the config was composed; a message could still carry any
        raise ValueError(f"strategy.params.control_variate must be one of {CONTROL_VARIATES}, got {variant!r}")
    corrected_sum = {key: torch.zeros_like(value) for key, value in c_local_t.items()}

    def before_step(params) -> None:
        for param in params:
            if param.grad is not None:
                key = key_of[id(param)]
                param.grad.copy_(correct_gradient(param.grad, c_local_t[key], c_global_t[key]))
                corrected_sum[key] += param.grad

    reply = task.train_reply(msg, context, before_step=before_step)
    if reply.has_error():
        return reply
    global_arrays = from_array_record(msg.content["arrays"])
    steps = int(reply.content["metrics"]["train-steps"])
    if variant == "gradient":
        end_point = {key: global_arrays[key].astype(np.float64)
                     - cfg.train.lr * corrected_sum[key].double().cpu().numpy() for key in global_arrays}
    else:
        end_point = get_adapter_arrays(runtime.model)
    new_c_local, delta_c = client_control_update(c_local, c_global, global_arrays, end_point, steps, cfg.train.lr)
    site.save_arrays(C_LOCAL_STATE, server_round + 1, {k: np.asarray(v, CONTROL_DTYPE) for k, v in new_c_local.items()})
    reply.content[DELTA_C_RECORD] = to_array_record(delta_c, CONTROL_DTYPE)
    return reply

