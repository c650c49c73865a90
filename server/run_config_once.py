"""A Grid that sends the run config to each site once: later messages carry only its sha256.

The coordinator puts the whole run config (JSON, a few kB) into every message's config record under
``RUN_CONFIG_KEY``. Wrapped in ``RunConfigOnceGrid``, each outgoing config record that holds it also gets
``RUN_CONFIG_SHA256_KEY``, and the JSON itself is dropped from messages to a site that has already answered a
message carrying it (without error). The site keeps it in its Context.state (client/run_config_cache.py), which
Flower keeps per (Flower run, node): in deployment at the SuperNode, in simulation in the simulation engine.

What this process knows is kept in memory only: a restarted coordinator (``federation.resume=true``, a new
Flower run, so new Context.state at every site) sends the full config again with its first message to each
site. A site that answers with an error (any code: ``UNKNOWN_RUN_CONFIG_ERROR`` when it lost its Context.state
by restarting, or a crash) gets the full config again with the next message.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from federation.protocol import RUN_CONFIG_KEY, RUN_CONFIG_SHA256_KEY, run_config_sha256


class RunConfigOnceGrid(Grid):
    """`inner` with the run config sent in full only until a site has answered a message that carried it."""

    def __init__(self, inner: Grid):
        self.inner = inner
        self.confirmed: dict[int, set[str]] = {}  # node -> run config hashes it has answered a message with
        self._pending: dict[int, set[str]] = {}  # node -> hashes sent in full, no reply yet
        self._hashes: dict[str, str] = {}  # JSON text -> its sha256 (one entry per run: the text never changes)

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
        return self.inner.push_messages([self._compact(msg) for msg in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._observe(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._observe(self.inner.send_and_receive([self._compact(msg) for msg in messages], timeout=timeout))

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
