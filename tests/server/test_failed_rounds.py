"""federation.max_failed_rounds: rounds that aggregate nothing stop the run with a summary naming the first cause."""

import json
import re

import pytest
from flwr.app import MessageType

from client.app import app as client_app
from federation.data import DataFormatError
from server.app import FederationFailed, _reason_line, run_federation
from simulations.cli import run_reporting_errors
from simulations.inprocess import InProcessGrid


def failing_in_rounds(rounds: set[int]):
    """The real ClientApp, except that training raises a data error in the given rounds."""

    def app(msg, context):
        if msg.metadata.message_type == MessageType.TRAIN and int(msg.content["config"]["server-round"]) in rounds:
            raise DataFormatError(f"/sites/{context.node_id}/train.jsonl:17: invalid JSON (Expecting value, column 1)")
        return client_app(msg, context)

    return app


def test_every_site_failing_stops_the_run_naming_file_and_line(make_cfg):
    cfg = make_cfg("federation.num_clients=2", "federation.rounds=3", "federation.evaluate_before_training=false")
    with pytest.raises(FederationFailed) as caught:
        run_federation(InProcessGrid(failing_in_rounds({1, 2, 3}), 2), cfg)
    summary = str(caught.value)
    assert re.match(r"the federation stopped after round 1: round 1 aggregated nothing \(federation.max_failed_rounds"
                    r"=1\)\. First cause, round 1: node (\d) failed: DataFormatError: /sites/\1/train.jsonl:17: "
                    "invalid JSON", summary), summary
    assert "(2 failed, 0 rejected and 0 silent of 2 sampled sites)" in summary
    assert "\n" not in summary
    rows = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    assert [r["round"] for r in rows] == [1] and rows[0]["aggregated"] is False
    assert "train.jsonl:17" in rows[0]["failed"]["1"]
    again = make_cfg("federation.num_clients=2", "federation.rounds=3", f"output_dir={cfg.output_dir}-again")
    assert run_reporting_errors(lambda: run_federation(InProcessGrid(failing_in_rounds({1}), 2), again)) == 1


def test_max_failed_rounds_counts_consecutive_rounds_only(make_cfg):
    cfg = make_cfg("federation.num_clients=2", "federation.rounds=3", "federation.evaluate_before_training=false",
                   "federation.max_failed_rounds=2")
    rows = run_federation(InProcessGrid(failing_in_rounds({1, 3}), 2), cfg)  # never two in a row
    assert [r["aggregated"] for r in rows] == [False, True, False]

    cfg = make_cfg("federation.num_clients=2", "federation.rounds=3", "federation.evaluate_before_training=false",
                   "federation.max_failed_rounds=2", f"output_dir={cfg.output_dir}-2")
    with pytest.raises(FederationFailed, match=r"stopped after round 3: rounds 2-3 aggregated nothing .*"
                                               r"First cause, round 2: node \d failed: DataFormatError"):
        run_federation(InProcessGrid(failing_in_rounds({2, 3}), 2), cfg)


def test_reason_line_unwraps_flower_and_ray_errors():
    ray_reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()"
                  "\x1b[39m (pid=1)\n  File \"x.py\", line 1, in f\n    raise X\n"
                  "federation.data.DataFormatError: /d/site.jsonl:3: invalid JSON\n\nThe above exception was the "
                  "direct cause of the following exception:\n\nflwr.clientapp.client_app.ClientAppException: \n"
                  "Exception ClientAppException occurred. Message: /d/site.jsonl:3: invalid JSON'>")
    assert _reason_line(ray_reason) == "DataFormatError: /d/site.jsonl:3: invalid JSON"
    flower_reason = ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException "
                     "occurred. Message: out of memory'>")
    assert _reason_line(flower_reason) == "out of memory"
    deployment_reason = "<class 'federation.data.DataFormatError'>:<'site.jsonl:3: invalid JSON'>"
    assert _reason_line(deployment_reason) == "DataFormatError: site.jsonl:3: invalid JSON"
    assert _reason_line("RuntimeError: boom\nTraceback (most recent call last):\nRuntimeError: boom") == \
        "RuntimeError: boom"


def test_a_new_global_adapter_that_is_not_finite_is_never_adopted(make_cfg):
    """Two of three sites send finite deltas at float32's maximum; the coordinate median takes them (a hostile
    majority is beyond its guarantee), and round 2's global + delta overflows float32 (each update was finite, and
    so was the median). The coordinator refuses that adapter (it used to checkpoint and send inf), says why, and
    stops with the last finite one kept."""
    import numpy as np
    from flwr.app import Message, MetricRecord, RecordDict

    from federation.adapter import from_array_record, to_array_record
    from federation.store import read_peft_adapter

    def app(msg, context):
        if msg.metadata.message_type != MessageType.TRAIN or context.node_id == 3:
            return client_app(msg, context)
        sent = from_array_record(msg.content["arrays"])
        huge = {key: np.full(value.shape, np.finfo(np.float32).max, np.float32) for key, value in sent.items()}
        return Message(RecordDict({"arrays": to_array_record(huge), "metrics": MetricRecord(
            {"num-examples": 5, "train-loss": 1.0})}), reply_to=msg)

    cfg = make_cfg("federation.num_clients=3", "federation.rounds=3", "federation.evaluate_before_training=false",
                   "strategy=median")
    with pytest.raises(FederationFailed) as caught:
        run_federation(InProcessGrid(app, 3), cfg)
    rows = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    assert [(r["round"], r["aggregated"], r["clients_ok"]) for r in rows] == [(1, True, 3), (2, False, 2)]
    # (the honest site trained from round 1's wrecked adapter: its NaN loss is rejected on its own)
    assert "got nan" in rows[1]["rejected"]["3"]
    assert rows[1]["aggregation_error"].startswith("NonFiniteAggregate: the new global adapter is not finite in ")
    assert "First cause, round 2: the 2 accepted updates could not be aggregated: NonFiniteAggregate" in \
        str(caught.value)
    saved = read_peft_adapter(f"{cfg.output_dir}/global_adapter")
    assert all(np.all(np.isfinite(v)) for v in saved.values())
    assert rows[1]["adapter_digest"] == rows[0]["adapter_digest"]  # round 2 kept round 1's adapter
