"""Several virtual clients' messages in one Flower message: how a simulation's worker node serves a group of them.

Flower's simulation engine runs one ClientApp call per message and virtual node, on a pool of Ray actors
(flwr/server/superlink/fleet/vce/vce_api.py, RayBackend). To train a group of a round's virtual clients together
on one actor (client/multi_adapter.py), the coordinator's messages for a group travel in one *group message* to
one worker node: ``<category>.virtual_clients`` (train / evaluate / query), whose handler (client/app.py) rebuilds
each member's message and Context, answers them, and packs the replies. simulations/virtual_grid.py does the
coordinator side. Records that several members share (the global adapter every train message of a round carries)
travel once.

Layout of a group message: ConfigRecord ``virtual-clients`` with ``members`` (JSON list, one entry per member:
its virtual node id, partition id, message metadata, and ``records`` / ``state``: record name -> slot), and the
records themselves under ``slot-<n>``. The reply has the same layout, with an ``error`` per member instead of
metadata. ``state`` carries the member's Context.state (what Flower keeps per node in the driver between
messages): the grid keeps it on the host between rounds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.metadata import Metadata

GROUP_ACTION = "virtual_clients"
GROUP_RECORD = "virtual-clients"
_SLOT = "slot-"


@dataclass
class Member:
    """One virtual client's message in a group: where it goes, and the Context.state it enters with."""

    message: Message
    partition_id: int
    num_partitions: int
    state: RecordDict


class _Slots:
    """Records by slot, each distinct record object stored once."""

    def __init__(self) -> None:
        self.content = RecordDict()
        self._by_object: dict[int, str] = {}

    def names(self, records: RecordDict) -> dict[str, str]:
        out = {}
        for name, record in records.items():
            slot = self._by_object.get(id(record))
            if slot is None:
                slot = self._by_object[id(record)] = f"{_SLOT}{len(self._by_object)}"
                self.content[slot] = record
            out[name] = slot
        return out


def _records(content: RecordDict, names: Mapping[str, str]) -> RecordDict:
    return RecordDict({name: content[slot] for name, slot in names.items()})


def pack_group(members: Sequence[Member]) -> RecordDict:
    """The content of one group message carrying every member's message and state."""
    slots, entries = _Slots(), []
    for member in members:
        meta = member.message.metadata
        entries.append({"node": meta.dst_node_id, "partition": member.partition_id,
                        "partitions": member.num_partitions, "message_id": meta.message_id,
                        "type": meta.message_type, "group_id": meta.group_id, "created_at": meta.created_at,
                        "ttl": meta.ttl, "records": slots.names(member.message.content),
                        "state": slots.names(member.state)})
    slots.content[GROUP_RECORD] = ConfigRecord({"members": json.dumps(entries)})
    return slots.content


def unpack_group(group: Message, context: Context) -> list[tuple[Message, Context]]:
    """Each member's message and Context (node config partition-id / num-partitions, its state) from a group."""
    out = []
    for entry in json.loads(str(group.content[GROUP_RECORD]["members"])):
        meta = Metadata(run_id=group.metadata.run_id, message_id=entry["message_id"],
                        src_node_id=group.metadata.src_node_id, dst_node_id=entry["node"], reply_to_message_id="",
                        group_id=entry["group_id"], created_at=entry["created_at"], ttl=entry["ttl"],
                        message_type=entry["type"])
        message = Message(content=_records(group.content, entry["records"]), metadata=meta)
        member_context = Context(run_id=context.run_id, node_id=entry["node"],
                                 node_config={"partition-id": entry["partition"],
                                              "num-partitions": entry["partitions"]},
                                 state=_records(group.content, entry["state"]), run_config=context.run_config)
        out.append((message, member_context))
    return out


def pack_replies(replies: Sequence[Message], contexts: Sequence[Context]) -> RecordDict:
    """The content of a group's reply: every member's reply (content or error) and its Context.state after it."""
    slots, entries = _Slots(), []
    for reply, context in zip(replies, contexts):
        error = [reply.error.code, reply.error.reason] if reply.has_error() else None
        entries.append({"error": error, "records": {} if error else slots.names(reply.content),
                        "state": slots.names(context.state)})
    slots.content[GROUP_RECORD] = ConfigRecord({"members": json.dumps(entries)})
    return slots.content


def unpack_replies(reply: Message, sent: Sequence[Message]) -> list[tuple[Message, RecordDict]]:
    """(reply to each sent member message, that member's Context.state) from a group's reply, in order."""
    if reply.has_error():  # the group as a whole failed (e.g. the worker died): every member gets the error
        return [(Message(reply.error, reply_to=msg), None) for msg in sent]
    entries = json.loads(str(reply.content[GROUP_RECORD]["members"]))
    if len(entries) != len(sent):
        raise ValueError(f"a group reply answers {len(entries)} virtual clients, {len(sent)} were sent")
    out = []
    for entry, msg in zip(entries, sent):
        if entry["error"] is not None:
            answer = Message(Error(code=int(entry["error"][0]), reason=str(entry["error"][1])), reply_to=msg)
        else:
            answer = Message(_records(reply.content, entry["records"]), reply_to=msg)
        out.append((answer, _records(reply.content, entry["state"])))
    return out
