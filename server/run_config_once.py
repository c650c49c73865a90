"""A Grid that sends the run config to each site once: later messages carry only its sha256.

The coordinator puts the whole run config (JSON, a few kB) into every message's config record under
``RUN_CONFIG_KEY``. Wrapped in ``RunConfigOnceGrid``, each outgoing config record that holds it also gets
``RUN_CONFIG_SHA256_KEY``, and the JSON itself is dropped from messages to a site that has already answered a
message carrying it (without error). The site keeps it in its Context.state (client/run_config_cache.py), which
Flower keeps per (Flower run, node): in deployment at the SuperNode, in simulation in the simulation engine.

What this process knows is kept in memory only: a restarted coordinator (``federation.resume=true``, a new
Flower run, so new Context.state at every site) sends the full config again with its first message to each
site. A site that answers with an error gets the full config again with the next message. A site that restarted
(so holds neither the Context.state nor the process copy) answers ``UNKNOWN_RUN_CONFIG_ERROR``: that reply is not
handed to the caller; the same message goes again at once with the full config, and its reply is handed over
under the original message id, so a restarted site does not lose the round it rejoins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from federation.protocol import RUN_CONFIG_KEY, RUN_CONFIG_SHA256_KEY, UNKNOWN_RUN_CONFIG_ERROR, run_config_sha256
from server.reply_stream import replies_as_they_arrive

log = logging.getLogger("fedtune.server")

# Message ids per pull in send_and_receive: it returns every reply at once anyway, so a large batch only saves
# round trips to the SuperLink (replies_as_they_arrive's default of 1 is for the streaming fold's memory bound).
SEND_AND_RECEIVE_PULL_BATCH = 64


class RunConfigOnceGrid(Grid):
    """`inner` with the run config sent in full only until a site has answered a message that carried it."""

    def __init__(self, inner: Grid):
        self.inner = inner
        self.confirmed: dict[int, set[str]] = {}  # node -> run config hashes it has answered a message with
        self._pending: dict[int, set[str]] = {}  # node -> hashes sent in full, no reply yet
        self._hashes: dict[str, str] = {}  # JSON text -> its sha256 (one entry per run: the text never changes)
        # The full form of the newest hash-only message to each node, resent if the site lost the run config:
        # node -> (message id, full message). One per node, so nothing piles up when replies never come.
        self._full: dict[int, tuple[str, Message]] = {}
        self._retry_of: dict[str, str] = {}  # original message id -> id of its resend with the full config
        self._original_of: dict[str, str] = {}  # the reverse

    def __getattr__(self, name: str):  # what test grids and Flower's grids offer beyond the Grid interface
        return getattr(self.inner, name)

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        compact = [self._compact(msg) for msg in messages]
        message_ids = list(self.inner.push_messages(compact))
        for full, small, message_id in zip(messages, compact, message_ids):
            if message_id and _names_run_config_by_hash_only(small):
                self._full[full.metadata.dst_node_id] = (message_id, full)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        replies = []
        for reply in self.inner.pull_messages([self._retry_of.get(mid, mid) for mid in message_ids]):
            answered = reply.metadata.reply_to_message_id
            original = self._original_of.pop(answered, answered)
            self._retry_of.pop(original, None)
            if self._resend_with_full_config(reply, answered, original):
                continue
            if original != answered:  # the caller waits for the id it pushed
                reply.metadata.__dict__["_reply_to_message_id"] = original
            replies.append(reply)
        return self._observe(replies)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        # Built on this grid's own push/pull (as Flower's Grid.send_and_receive is on the inner grid's), so a
        # site that lost the run config is answered within the same call.
        return list(replies_as_they_arrive(self, messages, timeout, pull_batch=SEND_AND_RECEIVE_PULL_BATCH))

    def _resend_with_full_config(self, reply: Message, answered: str, original: str) -> bool:
        """Push the full form of the message `reply` answers if the site lost the run config; True if pushed."""
        node = reply.metadata.src_node_id
        held = self._full.get(node)
        if held is None or held[0] != answered:
            return False
        del self._full[node]
        if not (reply.has_error() and reply.error.code == UNKNOWN_RUN_CONFIG_ERROR):
            return False
        full = held[1]
        self.confirmed.pop(node, None)
        retry = Message(full.content, node, full.metadata.message_type, ttl=full.metadata.ttl,
                        group_id=full.metadata.group_id)
        pushed = [mid for mid in self.inner.push_messages([self._compact(retry)]) if mid]
        if not pushed:
            return False
        self._retry_of[original], self._original_of[pushed[0]] = pushed[0], original
        log.info("node %d lost the run config (it restarted); its %s message goes again with it", node,
                 full.metadata.message_type)
        return True

    def _sha256(self, text: str) -> str:
        if text not in self._hashes:
            if len(self._hashes) >= 4:  # one run config per run; never grow without bound
                self._hashes.clear()
            self._hashes[text] = run_config_sha256(text)
        return self._hashes[text]

    def _compact(self, msg: Message) -> Message:
        """`msg` with every run config in its config records replaced by its hash where the site holds it."""
        node = msg.metadata.dst_node_id
        records = {}
        for name, record in msg.content.config_records.items():
            if RUN_CONFIG_KEY not in record:
                continue
            digest = self._sha256(str(record[RUN_CONFIG_KEY]))
            entries = {**dict(record), RUN_CONFIG_SHA256_KEY: digest}
            if digest in self.confirmed.get(node, ()):
                del entries[RUN_CONFIG_KEY]
            else:
                self._pending.setdefault(node, set()).add(digest)
            records[name] = ConfigRecord(entries)
        if not records:
            return msg
        # A new RecordDict: the caller's content may be shared by the messages to several sites.
        content = RecordDict(dict(msg.content.items()))
        for name, record in records.items():
            content[name] = record
        return Message(metadata=msg.metadata, content=content)

    def _observe(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.confirmed.pop(node, None)
                self._pending.pop(node, None)
            elif node in self._pending:
                self.confirmed.setdefault(node, set()).update(self._pending.pop(node))
        return replies


def _names_run_config_by_hash_only(msg: Message) -> bool:
    return any(RUN_CONFIG_SHA256_KEY in record and RUN_CONFIG_KEY not in record
               for record in msg.content.config_records.values())
