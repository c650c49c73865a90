"""Build Flower Messages outside a running SuperLink (unit tests of ClientApp/strategy code)."""

from __future__ import annotations

from flwr.app import Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def set_task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> None:
    """Flower stamps instruction messages with the running task's identity; fake one."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def instruction(content: RecordDict, dst_node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    """A server -> node message."""
    set_task_identity()
    return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)


def reply(to: Message, content: RecordDict) -> Message:
    """A node -> server reply to `to`."""
    return Message(content=content, reply_to=to)
