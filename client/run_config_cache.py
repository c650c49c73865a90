"""The site's copy of the run config: kept in Context.state, so a message may name it by its sha256 alone.

The coordinator sends a site the full run config (JSON) until the site has answered a message carrying it, and
afterwards only its sha256 (server/run_config_once.py). ``run_config_from_context`` (a mod on the whole ClientApp,
so it runs before every handler, SecAgg+'s mod included) stores the JSON the first time and puts it back into later
messages, so every handler reads ``RUN_CONFIG_KEY`` as before. Flower keeps Context.state per (Flower run, node):
a site that restarted has none, and answers a hash it does not hold with an ``UNKNOWN_RUN_CONFIG_ERROR`` reply,
upon which the coordinator sends the full config again.

The process also keeps the newest few run configs it has seen (``_RECENT``). Why: the resident worker
(client/worker.py), like Flower's own flwr-clientapp, pushes the reply *before* the updated Context
(push_message, then push_task_output), so a coordinator that answers at once could reach the site before the
SuperNode holds the new Context.state; the process copy closes that window wherever the process outlives the
message (the resident worker, the simulation engines). The JSON is the coordinator's own config, named by its
sha256: nothing secret, and a hash cannot name a different text.
"""

from __future__ import annotations

from collections import OrderedDict

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from federation.protocol import RUN_CONFIG_KEY, RUN_CONFIG_SHA256_KEY, UNKNOWN_RUN_CONFIG_ERROR, run_config_sha256

# Context.state record: {sha256: run config JSON}, the newest run config only (a Flower run has one).
STATE_RECORD = "fedtune.run-config"
# This process's newest run configs, {sha256: JSON}: one per run, so a handful covers every run a daemon serves
# at once.
_RECENT: OrderedDict[str, str] = OrderedDict()
_RECENT_LIMIT = 8


def _remember(digest: str, text: str) -> None:
    _RECENT[digest] = text
    _RECENT.move_to_end(digest)
    while len(_RECENT) > _RECENT_LIMIT:
        _RECENT.popitem(last=False)


def forget_recent_run_configs() -> None:
    """Drop this process's copies (what a restarted site process starts with)."""
    _RECENT.clear()


class UnknownRunConfigError(LookupError):
    """A message names a run config (by sha256) that this site does not hold."""


def restore_run_config(msg: Message, context: Context) -> Message:
    """`msg` with the full run config in every config record that names it; stores a newly received one.

    Raises UnknownRunConfigError for a hash this site has not been sent (or has forgotten by restarting).
    """
    restored = {}
    for name, record in msg.content.config_records.items():
        if RUN_CONFIG_SHA256_KEY not in record:
            continue
        digest = str(record[RUN_CONFIG_SHA256_KEY])
        if RUN_CONFIG_KEY in record:
            text = str(record[RUN_CONFIG_KEY])
            if run_config_sha256(text) != digest:
                raise ValueError(f"config record {name!r}: the run config does not match its sha256 {digest[:16]}…")
            if str(context.state.config_records.get(STATE_RECORD, {}).get(digest, "")) != text:
                context.state[STATE_RECORD] = ConfigRecord({digest: text})
            _remember(digest, text)
            continue
        held = context.state.config_records.get(STATE_RECORD)
        if held is not None and digest in held:
            text = str(held[digest])
        elif digest in _RECENT:
            text = _RECENT[digest]
            context.state[STATE_RECORD] = ConfigRecord({digest: text})
        else:
            raise UnknownRunConfigError(
                f"this site holds no run config with sha256 {digest[:16]}… (it restarted since the coordinator "
                "sent it); the coordinator sends the full run config with its next message")
        restored[name] = ConfigRecord({**dict(record), RUN_CONFIG_KEY: text})
    if not restored:
        return msg
    content = RecordDict(dict(msg.content.items()))
    for name, record in restored.items():
        content[name] = record
    return Message(metadata=msg.metadata, content=content)


def run_config_from_context(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: the handler gets `msg` with its full run config; an unknown hash gets an error reply."""
    try:
        full = restore_run_config(msg, context)
    except UnknownRunConfigError as exc:
        return Message(Error(code=UNKNOWN_RUN_CONFIG_ERROR, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
    return call_next(full, context)
