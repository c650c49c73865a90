"""Bytes of each coordinator -> site message on the demo federation, with the run config sent once vs every time.

    python -m simulations.bench.message_bytes --out /tmp/message_bytes.json [hydra overrides]

Runs server.app.run_federation over simulations.inprocess.InProcessGrid (the default tiny model, 2 sites,
2 rounds) and records every message the coordinator pushes, serialized as Flower puts it on the wire
(flwr.common.serde.message_to_proto). "sent" is the message as sent (server/run_config_once.py: the run config's
JSON only until a site has answered one carrying it); "every_time" is the same message with the JSON put back, as
every message carried it before. Prints, per message type, the mean bytes of both and of the config records alone.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import message_to_proto

from federation.compose import compose_config
from federation.config import run_config_to_json
from federation.protocol import RUN_CONFIG_KEY, RUN_CONFIG_SHA256_KEY
from simulations.bench import machine_info, write_result
from simulations.inprocess import InProcessGrid


class _Recording(InProcessGrid):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[Message] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.extend(messages)
        return super().push_messages(messages)


def _with_json(msg: Message, text: str) -> Message:
    content = RecordDict(dict(msg.content.items()))
    for name, record in msg.content.config_records.items():
        if RUN_CONFIG_SHA256_KEY in record and RUN_CONFIG_KEY not in record:
            content[name] = ConfigRecord({**dict(record), RUN_CONFIG_KEY: text})
    return Message(metadata=msg.metadata, content=content)


def _nbytes(msg: Message) -> tuple[int, int]:
    """(whole message, its config records) serialized."""
    config_only = Message(metadata=msg.metadata, content=RecordDict(dict(msg.content.config_records.items())))
    return message_to_proto(msg).ByteSize(), message_to_proto(config_only).ByteSize()


def main(argv: list[str] | None = None) -> dict:
    """Run the federation, print and return bytes per message type (sent vs run config every time)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    args, overrides = parser.parse_known_args(argv)
    import server.app
    from client.app import app as client_app

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(["federation.num_clients=2", "federation.rounds=2", f"output_dir={tmp}/run", *overrides])
        text = run_config_to_json(cfg)
        grid = _Recording(client_app, cfg.federation.num_clients)
        server.app.run_federation(grid, cfg)
    by_type: dict[str, list] = defaultdict(list)
    for msg in grid.sent:
        by_type[msg.metadata.message_type].append((*_nbytes(msg), *_nbytes(_with_json(msg, text))))
    summary = {"machine": machine_info(), "run_config_json_bytes": len(text), "messages": {}}
    print(f"run config JSON: {len(text)} bytes; {len(grid.sent)} messages")
    print(f"{'type':<22}{'n':>4}{'sent':>12}{'every_time':>12}{'config sent':>13}{'config every':>14}")
    for kind, rows in sorted(by_type.items()):
        means = [sum(r[i] for r in rows) / len(rows) for i in range(4)]
        summary["messages"][kind] = {"count": len(rows), "mean_bytes_sent": means[0], "mean_bytes_every_time": means[2],
                                     "mean_config_bytes_sent": means[1], "mean_config_bytes_every_time": means[3]}
        print(f"{kind:<22}{len(rows):>4}{means[0]:>12.0f}{means[2]:>12.0f}{means[1]:>13.0f}{means[3]:>14.0f}")
    write_result(args.out, summary)
    return summary


if __name__ == "__main__":
    main()
