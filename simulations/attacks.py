"""Faulty or malicious sites for robustness experiments: a ClientApp whose chosen sites corrupt their delta."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import app as honest
from federation.adapter import to_array_record
from federation.compression import decode_upload


def make_attacking_client_app(attacker_partition_ids: set[int], scale: float) -> ClientApp:
    """Sites in `attacker_partition_ids` upload `scale` x their true delta (100: blown up, -1: sign-flipped)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest.train(msg, context)
        if int(context.node_config.get("partition-id", -1)) not in attacker_partition_ids:
            return reply
        delta = decode_upload({k: v.numpy() for k, v in reply.content["arrays"].items()})
        corrupted = to_array_record({k: v * scale for k, v in delta.items()})
        return Message(content=RecordDict({"arrays": corrupted, "metrics": reply.content["metrics"]}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest.evaluate(msg, context)

    return app
