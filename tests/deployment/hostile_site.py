"""A partner site turned hostile, for tests/deployment/test_hostile_site.py: its own code on its own machine.

It runs the stock `fedtune site` daemon with its registered key, so it connects, authenticates and is sampled
like any site; but its resident worker answers every train message with round r's malformed reply, KINDS[r - 1],
instead of training, and every evaluate message with EVAL_KINDS[r - 1]. In a SecAgg+ run it takes part in the
protocol with the installed ClientApp and rewrites one stage's reply per round, SECAGG_KINDS[r - 1]. Anything else
gets the installed ClientApp's honest answer. A real attacker controls its machine, so nothing at the site stops
this; only the coordinator's checks (server/replies.py, server/strategy.py, server/secagg.py, strategies/) stand
between these replies and the global adapter.

    python -m tests.deployment.hostile_site --config site.yaml                      # the site daemon
    python -m tests.deployment.hostile_site worker --runtime-api-address HOST:PORT  # its worker (the daemon starts it)

Every reply is logged on the site as ``HOSTILE round <r>: <kind> (<detail>)`` (``HOSTILE evaluate round <r>: ...``,
``HOSTILE secagg round <r>: ...``), so the test can tell that the coordinator saw what was sent.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import numpy as np

log = logging.getLogger("fedtune.site.hostile")

# What the hostile site claims in every train reply (an honest-looking example count and loss).
CLAIMED_EXAMPLES = 25
SCALE = 1e6
HOSTILE_LINE = "HOSTILE round {round}: {kind} ({detail})"
HOSTILE_EVAL_LINE = "HOSTILE evaluate round {round}: {kind}"
HOSTILE_SECAGG_LINE = "HOSTILE secagg round {round}: {kind} ({stage} reply)"


def _packed(arrays: dict[str, np.ndarray], change: Callable[[dict], dict] | None = None, buffer_bytes: int = 0):
    """A packed ArrayRecord as federation.packing.pack_arrays builds it, its layout then changed by `change`
    (the bytes stay as packed; buffer_bytes extra zero bytes are appended)."""
    from flwr.app import Array, ArrayRecord

    from federation.packing import LAYOUT_KEY, PACKED_KEY, canonical_offsets, layout_json

    values = [np.ascontiguousarray(v) for v in arrays.values()]
    offsets, nbytes = canonical_offsets([v.dtype for v in values], [v.shape for v in values])
    buffer = np.zeros(nbytes + buffer_bytes, np.uint8)
    for value, offset in zip(values, offsets):
        buffer[offset:offset + value.nbytes] = value.reshape(-1).view(np.uint8)
    layout = json.loads(layout_json(list(arrays), [v.dtype for v in values], [v.shape for v in values]))
    if change is not None:
        layout = change(layout)
    layout_bytes = np.frombuffer(json.dumps(layout).encode(), np.uint8)
    return ArrayRecord({PACKED_KEY: Array(buffer), LAYOUT_KEY: Array(layout_bytes)})


def _with(layout: dict, field: str, index: int, value) -> dict:
    values = list(layout[field])
    values[index] = value
    return {**layout, field: values}


def _overlapping_offsets(delta):
    return _packed(delta, lambda layout: {**layout, "offsets": [0] * len(layout["offsets"])}), \
        "every packed entry at offset 0"


def _huge_declared_size(delta):
    # Its entries then run 2**64 bytes past the end of the buffer.
    return _packed(delta, lambda layout: _with(layout, "shapes", -1, [2**31, 2**31])), \
        "last entry declares shape [2**31, 2**31] (2**64 bytes of float32)"


def _wrong_dtype(delta):
    key = next(iter(delta))
    return _packed({**delta, key: np.round(delta[key] * 1e3).astype(np.int32)}), f"{key} as int32"


def _unknown_tensor(delta):
    key = next(iter(delta))
    renamed = {("base_model.model.lm_head.weight" if k == key else k): v for k, v in delta.items()}
    return _packed(renamed), f"{key} renamed to base_model.model.lm_head.weight"


def _non_finite(delta):
    key = next(iter(delta))
    poisoned = delta[key].copy().reshape(-1)
    poisoned[:2] = [np.nan, np.inf]
    return _packed({**delta, key: poisoned.reshape(delta[key].shape)}), f"NaN and inf in {key}"


def _scaled(delta):
    scaled = {k: (v * SCALE).astype(np.float32) for k, v in delta.items()}
    norm = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in scaled.values())))
    return _packed(scaled), f"the delta times {SCALE:g}, L2 norm {norm:.6g}"


def _no_arrays(delta):
    return None, "metrics only"


# Round r's reply is KINDS[r - 1] (cycled); each builds (ArrayRecord or None, detail) from a plausible delta.
KINDS: dict[str, Callable[[dict[str, np.ndarray]], tuple]] = {
    "overlapping offsets": _overlapping_offsets,
    "huge declared size": _huge_declared_size,
    "wrong dtype": _wrong_dtype,
    "tensor not in the adapter": _unknown_tensor,
    "NaN and inf values": _non_finite,
    "update scaled 1e6": _scaled,
    "no arrays": _no_arrays,
}


def kind_of_round(server_round: int) -> str:
    """The kind of malformed reply the hostile site sends in `server_round` (1-based)."""
    return list(KINDS)[(server_round - 1) % len(KINDS)]


def hostile_train_reply(msg, server_round: int):
    """(reply, kind, detail): round `server_round`'s malformed answer to the train message `msg`."""
    from flwr.app import Message, MetricRecord, RecordDict

    from federation.adapter import from_array_record

    global_adapter = from_array_record(msg.content["arrays"])
    rng = np.random.default_rng(server_round)
    delta = {k: rng.normal(0.0, 1e-3, v.shape).astype(np.float32) for k, v in global_adapter.items()}
    kind = kind_of_round(server_round)
    record, detail = KINDS[kind](delta)
    content = RecordDict({"metrics": MetricRecord({"num-examples": CLAIMED_EXAMPLES, "train-loss": 1.0})})
    if record is not None:
        content["arrays"] = record
    return Message(content=content, reply_to=msg), kind, detail


def _metrics(values: dict):
    from flwr.app import MetricRecord

    return MetricRecord(values)


# What an honest evaluate reply claims (the other kinds change one thing of it).
HONEST_EVAL = {"num-examples": 8, "eval-loss": 2.0, "eval-tokens": 40}

# Round r's evaluate reply is EVAL_KINDS[r - 1] (cycled): its records (name -> record), built fresh each time.
# Only what Flower's wire format carries: a MetricRecord holds integers and floats (and lists of them).
EVAL_KINDS: dict[str, Callable[[], dict]] = {
    "NaN loss": lambda: {"metrics": _metrics({**HONEST_EVAL, "eval-loss": float("nan")})},
    "negative examples": lambda: {"metrics": _metrics({**HONEST_EVAL, "num-examples": -3})},
    "no token count": lambda: {"metrics": _metrics({"num-examples": 8, "eval-loss": 2.0})},
    "metrics as text": lambda: {"metrics": _config({key: str(value) for key, value in HONEST_EVAL.items()})},
    "arrays besides the metrics": lambda: {"metrics": _metrics(HONEST_EVAL), "arrays": _arrays()},
    "thousands of metrics": lambda: {"metrics": _metrics({**HONEST_EVAL, **{f"m{i}": 1.0 for i in range(5000)}})},
    # Within the rules, each of them; their product overflows a plain weighted sum.
    "claims near the float maximum": lambda: {"metrics": _metrics({**HONEST_EVAL, "eval-loss": 1e308,
                                                                   "eval-tokens": 2**53})},
}


def _config(values: dict):
    from flwr.app import ConfigRecord

    return ConfigRecord(values)


def _arrays():
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({"x": Array(np.zeros(4, np.float32))})


def eval_kind_of_round(server_round: int) -> str:
    """The kind of malformed evaluate reply the hostile site sends in `server_round` (1-based)."""
    return list(EVAL_KINDS)[(server_round - 1) % len(EVAL_KINDS)]


def hostile_eval_reply(msg, server_round: int):
    """(reply, kind): round `server_round`'s malformed answer to the evaluate message `msg`."""
    from flwr.app import Message, RecordDict

    kind = eval_kind_of_round(server_round)
    return Message(content=RecordDict(EVAL_KINDS[kind]()), reply_to=msg), kind


def _unreadable_public_key(values: dict) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    values[Key.PUBLIC_KEY_2] = b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n"


def _masked_vector_of_int64(values: dict) -> None:
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    values[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(bytes_to_ndarray(b).astype(np.int64))
                                     for b in values[Key.MASKED_PARAMETERS]]


def _wrong_shares(values: dict) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    # A share is a 4-byte index, then 16 bytes per chunk of the padded secret: a changed first chunk still
    # combines (the padding is intact), into a wrong secret, so the masks it removes are wrong.
    values[Key.SHARE_LIST] = [share[:4] + bytes([share[4] ^ 1]) + share[5:] for share in values[Key.SHARE_LIST]]


# Round r's SecAgg+ reply change is SECAGG_KINDS[r - 1] (cycled): (the stage whose reply it rewrites, a change
# of that reply's "secaggplus" ConfigRecord values, Flower 1.41's keys). One per way a round ends: refused before
# its keys were shared, refused with its masked vector, a wrong sum (tests/server/test_secagg.py has the rest).
SECAGG_KINDS: dict[str, tuple[str, Callable[[dict], None]]] = {
    "unreadable public key": ("setup", _unreadable_public_key),
    "wrong key shares": ("unmask", _wrong_shares),
    "masked vector of int64": ("collect_masked_vectors", _masked_vector_of_int64),
}


def secagg_kind_of_round(server_round: int) -> str:
    """The SecAgg+ reply change the hostile site makes in `server_round` (1-based)."""
    return list(SECAGG_KINDS)[(server_round - 1) % len(SECAGG_KINDS)]


def secagg_stage_of(msg) -> str | None:
    """The SecAgg+ stage a message asks for (None: no SecAgg+ protocol message); read it before the ClientApp
    runs."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if configs is None else str(configs.get(Key.STAGE))


def hostile_secagg_reply(stage: str, reply, server_round: int) -> str | None:
    """Rewrite the honest reply to a SecAgg+ message of `stage` with round `server_round`'s change if it is that
    change's stage; the kind, or None when the reply goes out unchanged."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    kind = secagg_kind_of_round(server_round)
    if reply.has_error() or SECAGG_KINDS[kind][0] != stage:
        return None
    change = SECAGG_KINDS[kind][1]
    change(reply.content.config_records[RECORD_KEY_CONFIGS].__dict__["_data"])  # past Flower's type checks
    return kind


def hostile_app(message, context):
    """The worker's ClientApp: a malformed reply to every train and evaluate message, a rewritten one in SecAgg+
    rounds, the installed app's for anything else."""
    from client.app import app as installed_app
    from federation.protocol import EVALUATE, TRAIN

    category = message.metadata.message_type.split(".")[0]
    stage = secagg_stage_of(message)  # before the app runs: secaggplus_mod takes its record out of the message
    if stage is not None:  # every SecAgg+ message is a train message; the round is its group id
        reply = installed_app(message, context)
        server_round = int(message.metadata.group_id)
        kind = hostile_secagg_reply(stage, reply, server_round)
        if kind is not None:
            log.warning(HOSTILE_SECAGG_LINE.format(round=server_round, kind=kind, stage=stage))
        return reply
    if category == EVALUATE:
        server_round = int(message.content["config"].get("server-round", 0))
        reply, kind = hostile_eval_reply(message, server_round)
        log.warning(HOSTILE_EVAL_LINE.format(round=server_round, kind=kind))
        return reply
    if category != TRAIN:
        return installed_app(message, context)
    server_round = int(message.content["config"].get("server-round", 0))
    reply, kind, detail = hostile_train_reply(message, server_round)
    log.warning(HOSTILE_LINE.format(round=server_round, kind=kind, detail=detail))
    return reply


def main(argv: list[str]) -> int:
    """The hostile site's daemon (`--config ...`) or, with `worker` first, its resident worker."""
    if argv[:1] == ["worker"]:
        import client.worker

        client.worker.client_app = hostile_app  # what handle_message runs for an approved FAB
        return client.worker.main(argv[1:])
    import client.daemon
    from simulations.cli import main as fedtune_main

    def worker_command(cfg) -> list[str]:
        return [sys.executable, "-m", "tests.deployment.hostile_site", "worker", "--runtime-api-address",
                f"127.0.0.1:{cfg.clientappio_port}"]

    client.daemon.worker_command = worker_command
    return fedtune_main(["site", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
