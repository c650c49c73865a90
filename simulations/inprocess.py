"""A Flower Grid that runs the ClientApp in this process, node after node.

For machines without Ray (the lent GPU box) and for benchmarks: the coordinator's round loop
(``server.app.run_federation``) and the real ClientApp run unchanged; only transport differs.
Replies are produced sequentially, so per-client timings are not disturbed by each other, except
that with ``federation.clients_per_batch`` > 1 the plain train messages of a round are trained
together, up to that many virtual clients per forward/backward (client/multi_adapter.py).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.run import Run
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0
log = logging.getLogger("fedtune.simulation")


def _copy_content(content: RecordDict) -> RecordDict:
    """Shallow copy of the record containers (arrays are read-only payloads and stay shared)."""
    return RecordDict({key: type(record)(dict(record)) for key, record in content.items()})


class InProcessGrid(Grid):
    """`num_nodes` virtual sites with node ids 1..N and partition ids 0..N-1 (or given node configs)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, node_configs: list[dict] | None = None,
                 run_id: int = 1):
        self.client_app = client_app
        self.node_configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        self.contexts = {
            i + 1: Context(run_id=run_id, node_id=i + 1, node_config=cfg, state=RecordDict(), run_config={})
            for i, cfg in enumerate(self.node_configs)
        }
        self._run = Run.create_empty(run_id)
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}
        self.down_nodes: set[int] = set()  # tests mark nodes as crashed
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, run_id

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.down_nodes]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids, delivered = [], []
        for msg in messages:
            msg_id = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = msg_id
            node = msg.metadata.dst_node_id
            if node in self.down_nodes:
                continue
            # A real transport hands every node its own copy; mods (SecAgg+) mutate the content they receive.
            delivered.append(Message(content=_copy_content(msg.content), metadata=msg.metadata))
            ids.append(msg_id)
        from client.multi_adapter import answer_together

        replies = answer_together(self.client_app, delivered,
                                  [self.contexts[m.metadata.dst_node_id] for m in delivered])
        for msg, reply in zip(delivered, replies):
            self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
