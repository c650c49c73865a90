"""A site that sends a malformed reply every round cannot stop the run, nor change what the others aggregate."""

import json
from pathlib import Path

from client.app import app as honest_app
from server.app import run_federation
from simulations.attacks import MALFORMED_TRAIN_REPLIES, make_malformed_client_app
from simulations.inprocess import InProcessGrid

SITES = 3
HOSTILE_NODE = 1  # partition 0


def test_hostile_site_is_rejected_every_round_and_the_run_matches_the_run_without_it(make_cfg, tmp_path):
    rounds = len(MALFORMED_TRAIN_REPLIES)
    cfg = make_cfg(f"federation.num_clients={SITES}", f"federation.rounds={rounds}", "strategy=fedavg")
    rows = run_federation(InProcessGrid(make_malformed_client_app({HOSTILE_NODE - 1}), SITES), cfg)

    assert [row["round"] for row in rows] == list(range(rounds + 1))
    written = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [row["eval_rejected"] for row in written] == [row["eval_rejected"] for row in rows]
    hostile = str(HOSTILE_NODE)
    for row in written:
        assert row["eval_rejected"][hostile]  # a reason, every round, round 0 included
    for row in written[1:]:
        assert row["aggregated"] and row["clients_ok"] == SITES - 1 and row["missing"] == [HOSTILE_NODE]
        assert set(row["rejected"]) == {hostile} and row["rejected"][hostile] and not row["failed"]
    reasons = [row["rejected"][hostile] for row in written[1:]]
    assert reasons[0] == "metric 'train-loss' is missing"  # the outside review's case
    assert "wrong shape" in reasons[1] and "exactly one ArrayRecord and one MetricRecord" in reasons[2]
    assert "num-examples" in reasons[3]

    # The same federation with the hostile site switched off: the same global adapter every round.
    cfg.output_dir = str(tmp_path / "without-the-hostile-site")
    grid = InProcessGrid(honest_app, SITES)
    grid.down_nodes.add(HOSTILE_NODE)
    without = run_federation(grid, cfg)
    assert [row["adapter_digest"] for row in without] == [row["adapter_digest"] for row in rows]
    assert [row["eval_loss"] for row in without] == [row["eval_loss"] for row in rows]
