"""A Grid of N virtual clients served by a few worker nodes of Flower's simulation engine, a group per message.

Flower's simulation engine (flwr/server/superlink/fleet/vce/vce_api.py) hands each message to one ClientApp call
on a free actor of its RayBackend pool (one actor per `client_resources`, e.g. one per GPU), and a message is the
unit of work: one message per virtual client cannot be trained together with others. So the coordinator's round
loop (server.app.run_federation) talks to this Grid, which shows it N virtual clients (node ids 1..N, partition
ids 0..N-1) and sends each push's messages to Flower's worker nodes in groups: one ``<category>.virtual_clients``
message per group (federation/virtual_clients.py), answered by client/app.py's ``virtual_clients`` handler on
whichever actor is free, batchable train messages trained together (client/multi_adapter.py). Groups are at most
``federation.clients_per_batch`` clients and at least as many as there are actors (so every GPU gets one), sizes
differing by at most one. The backend, actor pool, LinkState and message flow stay Flower's own.

Per-client state: what rounds advance at a site is in files under output_dir/sites/partition-<id>
(client/site_state.py); what a ClientApp keeps in ``Context.state`` (Flower keeps it per node in the driver's
memory) is kept here per virtual client on the host and travels with the client's messages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from itertools import groupby
from uuid import uuid4

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from federation.virtual_clients import GROUP_ACTION, Member, pack_group, unpack_replies


def group_sizes(count: int, max_size: int, min_groups: int) -> list[int]:
    """Sizes of ceil(count / max_size) groups, at least min_groups (when count allows), differing by at most one."""
    if count <= 0:
        return []
    groups = min(count, max(math.ceil(count / max_size), min_groups))
    return [count // groups + (1 if i < count % groups else 0) for i in range(groups)]


class VirtualClientGrid(Grid):
    """`num_clients` virtual clients over the worker nodes of `inner` (Flower's simulation Grid)."""

    def __init__(self, inner: Grid, num_clients: int, clients_per_group: int, min_groups: int = 1,
                 wait_for_workers_s: float = 600.0):
        self.inner = inner
        self.wait_for_workers_s = wait_for_workers_s
        self.num_clients = num_clients
        self.clients_per_group = max(1, clients_per_group)
        self.min_groups = max(1, min_groups)
        self.states: dict[int, RecordDict] = {}  # Context.state per virtual client, on the host
        self._groups: dict[str, list[Message]] = {}  # group message id -> the member messages it carries
        self._replies: dict[str, Message] = {}  # member message id -> reply, until pulled

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, self.num_clients + 1))

    def _workers(self, needed: int) -> list[int]:
        """The worker nodes, once at least `needed` are registered (Flower registers the simulation's nodes while
        the ServerApp already runs, as Flower's own strategies wait for min_available_nodes)."""
        deadline = time.monotonic() + self.wait_for_workers_s
        while len(workers := sorted(self.inner.get_node_ids())) < needed and time.monotonic() < deadline:
            time.sleep(0.1)
        if len(workers) < needed:
            raise RuntimeError(f"{needed} groups of virtual clients need as many worker nodes, {len(workers)} joined "
                               f"within {self.wait_for_workers_s:.0f}s (simulations/simulate.py virtual_client_layout)")
        return workers

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            node = msg.metadata.dst_node_id
            if not 1 <= node <= self.num_clients:
                raise ValueError(f"no virtual client with node id {node} (1..{self.num_clients})")
            msg.metadata.__dict__["_message_id"] = str(uuid4())
        groups: list[tuple[str, list[Message]]] = []
        # One category per group message (Flower routes a message to a handler by its category).
        by_category = sorted(messages, key=lambda m: m.metadata.message_type.split(".")[0])
        for category, same in groupby(by_category, key=lambda m: m.metadata.message_type.split(".")[0]):
            same = list(same)
            start = 0
            for size in group_sizes(len(same), self.clients_per_group, self.min_groups):
                groups.append((category, same[start:start + size]))
                start += size
        workers = self._workers(len(groups))
        envelopes = []
        for (category, members), worker in zip(groups, workers):
            content = pack_group([Member(m, m.metadata.dst_node_id - 1, self.num_clients,
                                         self.states.get(m.metadata.dst_node_id, RecordDict())) for m in members])
            envelopes.append((Message(content=content, dst_node_id=worker,
                                      message_type=f"{category}.{GROUP_ACTION}",
                                      group_id=members[0].metadata.group_id), members))
        pushed = set(self.inner.push_messages([e for e, _ in envelopes]))
        for envelope, members in envelopes:
            if envelope.metadata.message_id in pushed:  # the Grid sets the id; one it did not take gets no reply
                self._groups[envelope.metadata.message_id] = members
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        pending = [g for g, members in self._groups.items() if any(m.metadata.message_id in wanted for m in members)]
        for group_reply in self.inner.pull_messages(pending):
            members = self._groups.pop(group_reply.metadata.reply_to_message_id)
            for reply, state in unpack_replies(group_reply, members):
                if state:  # most clients keep nothing in Context.state (their round state is in files)
                    self.states[reply.metadata.src_node_id] = state
                elif state is not None:
                    self.states.pop(reply.metadata.src_node_id, None)
                self._replies[reply.metadata.reply_to_message_id] = reply
        return [self._replies.pop(i) for i in list(wanted) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Sequence[Message]:
        ids = set(self.push_messages(messages))
        end = time.time() + (timeout or 0.0)
        replies: list[Message] = []
        while ids:
            got = list(self.pull_messages(ids))
            replies += got
            ids -= {r.metadata.reply_to_message_id for r in got}
            if not ids or (timeout is not None and time.time() >= end):
                break
            time.sleep(getattr(self.inner, "pull_interval", 0.1))
        # Groups that did not answer in time: forget them (their late replies are dropped, as Flower drops them).
        for group_id in [g for g, members in self._groups.items() if any(m.metadata.message_id in ids for m in members)]:
            del self._groups[group_id]
        return replies
