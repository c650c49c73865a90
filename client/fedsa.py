"""The site's side of FedSA-LoRA (Guo et al. 2024): lora_A is shared and averaged, lora_B stays at the site.

The coordinator sends the whole global adapter; the site overwrites every received lora_B with its
own (round state of the site, client/site_state.py; before its first round it starts from the received,
initial B), trains, stores its trained B and uploads the delta of lora_A and of any non-LoRA keys only: lora_B
is ABSENT from the reply, so neither B nor its change ever leaves the site. The coordinator
(server/methods/fedsa_lora.py) treats the missing B deltas as zero, so the global B stays at its
initial value. Evaluation uses the site's own B (a personalised model).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message

from client import task
from client.site_state import server_round_of, site_state
from federation.adapter import from_array_record, get_adapter_arrays, to_array_record
from federation.compression import SEPARATOR
from federation.packing import pack_arrays, unpack_arrays
from federation.protocol import RUN_CONFIG_KEY
from strategies.lora_exact import fedsa_keeps_local, fedsa_split

LORA_B_STATE = "fedtune.fedsa.lora-b"


def is_lora_b_part(upload_key: str) -> bool:
    """Whether an upload array (plain ``key`` or a codec part ``key::...``) belongs to a lora_B tensor."""
    return fedsa_keeps_local(upload_key.split(SEPARATOR)[0])


def own_lora_b(msg: Message, context: Context, server_round: int) -> dict[str, np.ndarray] | None:
    """This site's lora_B tensors ({key: (out, r)}) as it enters `server_round`, None before it trained once."""
    cfg = task.parse_run_config(str(msg.content["config"][RUN_CONFIG_KEY]))
    return site_state(msg, context, cfg.output_dir).load_arrays(LORA_B_STATE, server_round)


def with_own_lora_b(msg: Message, context: Context, server_round: int) -> Message:
    """`msg` with every received lora_B replaced by this site's own as of `server_round` (unchanged before any)."""
    own = own_lora_b(msg, context, server_round)
    if own is None:
        return msg
    arrays = from_array_record(msg.content["arrays"])
    b_keys = set(fedsa_split(arrays)[1])
    if set(own) != b_keys or any(own[k].shape != arrays[k].shape for k in b_keys):
        raise ValueError("FedSA-LoRA: this site's stored lora_B does not fit the received adapter "
                         "(different model or LoRA config than in earlier rounds of this run)")
    return task.message_with(msg, arrays=to_array_record({**arrays, **own}))


def train(msg: Message, context: Context) -> Message:
    """Handler of ``train.fedsa_lora``: train from (global A, own B); keep the trained B; reply with the A delta."""
    msg = task.for_this_site(msg, context)
    cfg = task.parse_run_config(str(msg.content["config"][RUN_CONFIG_KEY]))
    server_round = server_round_of(msg)
    reply = task.train_reply(with_own_lora_b(msg, context, server_round), context)
    if reply.has_error():
        return reply
    trained = get_adapter_arrays(task.get_runtime(cfg).model)
    site_state(msg, context, cfg.output_dir).save_arrays(
        LORA_B_STATE, server_round + 1, fedsa_split(trained)[1])
    encoded = unpack_arrays(reply.content["arrays"])
    reply.content["arrays"] = pack_arrays({k: v for k, v in encoded.items() if not is_lora_b_part(k)})
    return reply


def evaluate(msg: Message, context: Context) -> Message:
    """Handler of ``evaluate.fedsa_lora``: the global A with this site's own B (the B it trained in this round)."""
    msg = task.for_this_site(msg, context)
    return task.evaluate_reply(with_own_lora_b(msg, context, server_round_of(msg) + 1), context)
