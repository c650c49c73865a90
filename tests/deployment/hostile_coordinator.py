"""A coordinator turned hostile, for tests/deployment/test_hostile_coordinator.py: its own ServerApp, its own rules.

A site checks the code a run would have it run (client/approval.py), not the coordinator's: the ServerApp never
reaches a site. So this run's bundle is fedtune's own code (the site approves it), and its ServerApp,
``tests.deployment.hostile_coordinator:app``, sends every site the messages a hostile coordinator would craft,
one attack at a time, instead of running federated rounds. It writes what came back to
``<output_dir>/hostile-coordinator.json``: per attack, per site, the reply's error (code, reason) or the names,
metrics and config entries of its content, and the repr of every record, for the test to search for site data.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from federation.adapter import to_array_record
from federation.compose import compose_config
from federation.config import overrides_from_flat, run_config_to_json
from federation.model import initial_adapter
from federation.protocol import FEDERATION_RUN_ID_KEY, RUN_CONFIG_KEY
from federation.virtual_clients import GROUP_ACTION, Member, pack_group
from server.reply_stream import replies_as_they_arrive

log = logging.getLogger("fedtune.hostile-coordinator")

app = ServerApp()

RESULTS_FILE = "hostile-coordinator.json"
# In output_dir, written by the test before the launch: {"canary_file": a JSONL file on the site's disk that is not
# its federation data, "site_data": the site's own data directory}, what the attacks aim at.
TARGETS_FILE = "hostile-targets.json"
DP_REPLAYS = 4  # one more than the site's privacy budget allows (the test sets the budget)
REPLY_TIMEOUT_S = 120.0
PLANTED_CACHE = "planted-cache"  # under output_dir: where the coordinator asks the site to build its model


def run_config_with(cfg, **changes) -> str:
    """The run config's JSON with `changes` ('model.name' -> value) applied."""
    tree = json.loads(run_config_to_json(cfg))
    for path, value in changes.items():
        node = tree
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return json.dumps(tree)


def _train(cfg, node: int, message_type: str = "train", federation_run: str = "hostile-run", server_round: int = 1,
           arrays=None, **changes) -> Message:
    config = ConfigRecord({RUN_CONFIG_KEY: run_config_with(cfg, **changes), "server-round": server_round,
                           FEDERATION_RUN_ID_KEY: federation_run})
    arrays = to_array_record(initial_adapter(cfg.model, cfg.lora)) if arrays is None else arrays
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type=message_type)


def _group(cfg, node: int, canary_file: str) -> Message:
    """One virtual client whose partition is cut from a file the coordinator names."""
    member = _train(cfg, node, **{"data.source": canary_file, "data.partitioner": "iid"})
    content = pack_group([Member(member, partition_id=0, num_partitions=1, state=RecordDict())])
    return Message(content, dst_node_id=node, message_type=f"train.{GROUP_ACTION}")


def _summary(reply: Message) -> dict:
    if reply.has_error():
        return {"error": [int(reply.error.code), str(reply.error.reason)]}
    content = reply.content
    return {"metrics": {name: dict(record) for name, record in content.metric_records.items()},
            "configs": {name: dict(record) for name, record in content.config_records.items()},
            "arrays": sorted(content.array_records), "repr": repr(dict(content.items()))[:200_000]}


def _ask(grid: Grid, messages: list[Message]) -> dict[str, dict]:
    replies = replies_as_they_arrive(grid, messages, REPLY_TIMEOUT_S)  # Flower's send_and_receive polls every 3 s
    return {str(reply.metadata.src_node_id): _summary(reply) for reply in replies}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Every attack against every connected site, one after another; what came back goes to RESULTS_FILE."""
    cfg = compose_config(overrides_from_flat(dict(context.run_config)))
    out = Path(cfg.output_dir)
    targets = json.loads((out / TARGETS_FILE).read_text())
    canary_file, site_data = targets["canary_file"], targets["site_data"]
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while not grid.get_node_ids() and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    results: dict[str, object] = {"nodes": nodes}
    attacks = {
        "group-names-the-data-file": lambda n: _group(cfg, n, canary_file),
        "model-path-on-the-site": lambda n: _train(cfg, n, **{"model.name": site_data}),
        "gpu-time": lambda n: _train(cfg, n, **{"train.local_steps": 10**9}),
        "model-cache-outside-the-site": lambda n: _train(cfg, n, message_type="evaluate",
                                                         **{"model.cache_dir": str(out / PLANTED_CACHE)}),
        "broken-adapter": lambda n: _train(cfg, n, arrays=to_array_record({"not.a.lora.tensor": _zeros()})),
    }
    for name, build in attacks.items():
        log.info("hostile coordinator: %s", name)
        results[name] = _ask(grid, [build(node) for node in nodes])
    # The same DP-SGD round again and again, each time under a new federation run id: the run's own accountant
    # restarts every time; only the site's ledger counts them all.
    results["dp-replays"] = [
        _ask(grid, [_train(cfg, node, federation_run=f"replay-{attempt}") for node in nodes])
        for attempt in range(DP_REPLAYS)]
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1, default=str))
    log.info("hostile coordinator: done")


def _zeros():
    import numpy as np

    return np.zeros((2, 2), np.float32)
