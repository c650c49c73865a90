"""A registered partner site turned hostile, in a real deployment on 127.0.0.1 (TLS + SuperNode authentication).

Issue 12: any reply from a site is aggregated or rejected with a reason, never a crash. Its own coordinator and
three `fedtune site` daemons (tests/deployment/conftest.py running_deployment): site-a and site-b are honest,
site-h runs tests/deployment/hostile_site.py, the stock daemon whose resident worker answers every train
message with round r's malformed reply (hostile_site.KINDS: broken packed layouts, a wrong dtype, a tensor that
is no part of the adapter, NaN/inf, an update scaled 1e6, no arrays) and every evaluate message with round r's
malformed metrics (hostile_site.EVAL_KINDS: NaN, a negative count, a missing one, text, arrays, thousands of
metrics, claims whose product overflows). One run of one round per kind, under strategy=norm_bound (so the scaled
update has a bound to meet), tracked with MLflow; then a SecAgg+ run in which the hostile site rewrites one
protocol stage's reply per round (hostile_site.SECAGG_KINDS: an unreadable public key, wrong key shares, a masked
vector of the wrong dtype). Everything is checked from outside: exit codes, the
coordinator's streamed log, metrics.jsonl and the saved adapters.

The fast tests first check, in process, the reason the coordinator gives each kind (and that the hostile replies
really are what their names say), so the slow ones can ask for those reasons on the wire.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.deployment.conftest import FAST_OVERRIDES, Deployment, running_deployment
from tests.deployment.hostile_site import (EVAL_KINDS, KINDS, SECAGG_KINDS, eval_kind_of_round, hostile_eval_reply,
                                           hostile_secagg_reply, hostile_train_reply, kind_of_round,
                                           secagg_kind_of_round, secagg_stage_of)
from tests.deployment.procs import tail

HONEST = ("site-a", "site-b")
HOSTILE = "site-h"
SKILLS = {"site-a": "reverse", "site-b": "uppercase", HOSTILE: "add"}
ROUNDS = len(KINDS)
MAX_NORM = 1.0  # strategy=norm_bound's strategy.params.max_norm (conf/strategy/norm_bound.yaml)
RUN_TIMEOUT_S = 240
# What the coordinator's ledger says about each kind: a substring of the rejection reason, or None: accepted
# (the scaled update is within the rules; norm_bound clips it to MAX_NORM before it is averaged).
EXPECTED_REASON = {
    "overlapping offsets": "malformed packed arrays: m.l0.lora_B.weight: offset 0 is not the canonical",
    "huge declared size": "malformed packed arrays: layout declares",
    "wrong dtype": "undecodable upload: ValueError: m.l0.lora_A.weight: dtype int32, expected a float",
    "tensor not in the adapter": "packed entry 'base_model.model.lm_head.weight' is no part of the expected adapter",
    "NaN and inf values": "non-finite values (NaN/Inf) in m.l0.lora_A.weight",
    "update scaled 1e6": None,
    "no arrays": "reply must carry exactly one ArrayRecord and one MetricRecord, got 0 and 1",
}
# In the deployment the keys are the tiny model's PEFT names; only their generic part is asserted there.
WIRE_REASON = {kind: None if reason is None else reason.split("m.l0.")[0] for kind, reason in EXPECTED_REASON.items()}
# Why the coordinator leaves each evaluate reply out of the union loss; None: counted (every claim within the rules,
# the union stays finite).
EXPECTED_EVAL_REASON = {
    "NaN loss": "metric 'eval-loss' must be a finite number >= 0, got nan",
    "negative examples": "metric 'num-examples' must be a whole number >= 1, got -3",
    "no token count": "metric 'eval-tokens' is missing",
    "metrics as text": "evaluate reply must carry exactly one MetricRecord and no ArrayRecord, got 0 and 0",
    "arrays besides the metrics": "evaluate reply must carry exactly one MetricRecord and no ArrayRecord, got 1 and 1",
    "thousands of metrics": "5003 metrics, more than the 64 a reply may carry",
    "claims near the float maximum": None,
}
# What a SecAgg+ round does with each rewritten reply: the hostile site dropped out at that stage with the reason
# (the others' sum aggregated exactly), or the round failed with the reason (nothing aggregated).
EXPECTED_SECAGG = {
    "unreadable public key": ("dropped", "setup: public key 'pk2' unreadable"),
    "wrong key shares": ("failed", "the unmasked sum is no sum of the sites' masked vectors"),
    "masked vector of int64": ("dropped", "collect_masked_vectors: masked vector part 0 is int64"),
}
SECAGG_ROUNDS = len(SECAGG_KINDS)


def test_every_hostile_kind_is_decoded_to_its_rejection_or_accepted_in_process():
    from flwr.app import ConfigRecord, RecordDict

    from federation.adapter import to_array_record
    from server.strategy import LoraDeltaStrategy
    from strategies.aggregators import build_aggregator
    from strategies.fedavg import UpdateRejected
    from tests.flower_messages import instruction

    assert list(EXPECTED_REASON) == list(KINDS)
    adapter = {"m.l0.lora_A.weight": np.ones((2, 5), np.float32), "m.l0.lora_B.weight": np.zeros((4, 2), np.float32)}
    strategy = LoraDeltaStrategy(build_aggregator("norm_bound", {"max_norm": MAX_NORM}), min_train_nodes=1,
                                 min_available_nodes=1)
    for server_round, (kind, reason) in enumerate(EXPECTED_REASON.items(), start=1):
        assert kind_of_round(server_round) == kind and kind_of_round(server_round + len(KINDS)) == kind
        sent = instruction(RecordDict({"arrays": to_array_record(adapter),
                                       "config": ConfigRecord({"server-round": server_round})}), dst_node_id=7)
        reply, sent_kind, _ = hostile_train_reply(sent, server_round)
        assert sent_kind == kind
        if reason is None:
            delta, _, _ = strategy.decode_reply(7, reply, lambda node: adapter)
            norm = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in delta.values())))
            assert norm > 1e3 * MAX_NORM, norm  # really scaled: far beyond the bound it must be clipped to
        else:
            with pytest.raises(UpdateRejected) as rejected:
                strategy.decode_reply(7, reply, lambda node: adapter)
            assert reason in str(rejected.value), (kind, str(rejected.value))


def test_every_hostile_evaluate_kind_is_left_out_with_its_reason_or_counted_finitely_in_process():
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from server.strategy import LoraDeltaStrategy
    from strategies.aggregators import build_aggregator
    from tests.flower_messages import instruction, reply

    assert list(EXPECTED_EVAL_REASON) == list(EVAL_KINDS)
    for server_round, (kind, reason) in enumerate(EXPECTED_EVAL_REASON.items(), start=1):
        assert eval_kind_of_round(server_round) == kind
        strategy = LoraDeltaStrategy(build_aggregator("fedavg", {}), min_train_nodes=1, min_available_nodes=1)
        sent = [instruction(RecordDict({"config": ConfigRecord({"server-round": server_round})}), dst_node_id=node,
                            message_type="evaluate") for node in (1, 7)]
        honest = reply(sent[0], RecordDict({"metrics": MetricRecord({"num-examples": 8, "eval-loss": 3.0,
                                                                     "eval-tokens": 40})}))
        hostile, sent_kind = hostile_eval_reply(sent[1], server_round)
        assert sent_kind == kind
        union = strategy.aggregate_evaluate(server_round, [honest, hostile])
        ledger = strategy.ledger(server_round)
        assert np.isfinite(union["eval-loss"]) and np.isfinite(union["eval-perplexity"]), kind
        if reason is None:
            assert ledger.eval_ok == [1, 7] and union["eval-loss"] > 1e300, (kind, union)
        else:
            assert ledger.eval_ok == [1] and union["eval-loss"] == 3.0, kind
            assert reason in ledger.eval_rejected[7], (kind, ledger.eval_rejected)


def test_every_hostile_secagg_kind_drops_the_site_or_fails_the_round_in_process():
    from flwr.app import Message, MetricRecord, RecordDict

    from client.secagg import make_secagg_app
    from federation.adapter import to_array_record
    from federation.compose import compose_config
    from server.secagg import SecAggParams, secagg_error_bound, secagg_train_round
    from simulations.inprocess import InProcessGrid
    from strategies.fedavg import weighted_mean

    adapter = {"m.l0.lora_A.weight": np.zeros((2, 5), np.float32), "m.l0.lora_B.weight": np.zeros((4, 2), np.float32)}
    deltas = {node: {k: np.full(v.shape, 0.01 * node, np.float32) for k, v in adapter.items()} for node in (1, 2, 3)}

    def train(msg, context):
        return Message(RecordDict({"arrays": to_array_record(deltas[context.node_id]), "metrics": MetricRecord(
            {"num-examples": 8 * context.node_id, "train-loss": 1.0})}), reply_to=msg)

    honest_app = make_secagg_app(train)

    def app(msg, context):  # node 3 is hostile_site.hostile_app's SecAgg+ part around the same training
        stage = secagg_stage_of(msg)
        answer = honest_app(msg, context)
        if context.node_id == 3:
            hostile_secagg_reply(stage, answer, int(msg.metadata.group_id))
        return answer

    params = SecAggParams.from_config(compose_config(["privacy=secagg"]).privacy.secagg)  # what the run uses
    assert list(EXPECTED_SECAGG) == list(SECAGG_KINDS)
    for server_round, (kind, (outcome, reason)) in enumerate(EXPECTED_SECAGG.items(), start=1):
        assert secagg_kind_of_round(server_round) == kind
        result = secagg_train_round(InProcessGrid(app, 3), server_round, adapter, "{}", params, timeout=30)
        if outcome == "failed":
            assert result.mean_delta is None and reason in result.error, (kind, result.error)
            continue
        assert result.error is None and reason in result.rejected_nodes[3], (kind, result.rejected_nodes)
        nodes = [1, 2, 3] if SECAGG_KINDS[kind][0] == "unmask" else [1, 2]
        assert result.aggregated_nodes == nodes, kind
        expected = weighted_mean([deltas[n] for n in nodes], [8 * n for n in nodes])
        bound = secagg_error_bound([8 * n for n in nodes], params.clipping_range, params.quantization_range,
                                   params.max_weight)
        assert max(float(np.abs(result.mean_delta[k] - expected[k]).max()) for k in adapter) <= bound, kind


# ------------------------------------------------------------------------------------ real processes


def _hostile_argv(deployment: Deployment, site: str) -> list[str]:
    if site != HOSTILE:
        return deployment.site_argv(site)
    return [sys.executable, "-m", "tests.deployment.hostile_site", "--config", str(deployment.site_configs[site])]


@pytest.fixture(scope="module")
def hostile_deployment(tmp_path_factory):
    """Its own coordinator, two honest sites and the hostile one (registered like the others)."""
    with running_deployment(tmp_path_factory.mktemp("hostile"), SKILLS, _hostile_argv) as dep:
        yield dep


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _read_adapter(directory: Path) -> dict[str, np.ndarray]:
    from federation.store import read_peft_adapter

    return read_peft_adapter(directory)


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in arrays.values())))


def _run_to_completion(dep, name: str, *overrides: str) -> str:
    """Launch a run (output in log `name`) and wait for it; it must exit 0 (launch --stream exits 0 only on
    finished:completed) with every daemon, the coordinator's included, still up. Returns the launch's output."""
    code = dep.launch(name, dep.fast_overrides(*overrides), timeout_s=RUN_TIMEOUT_S)
    output = dep.procs.log(name)
    assert code == 0, tail(output, 80)
    for process in ("coordinator", *SKILLS):
        assert dep.procs.procs[process].poll() is None, (process, tail(dep.procs.log(process)))
    return output


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_hostile_site_is_rejected_with_a_reason_each_round_and_the_honest_sites_carry_on(hostile_deployment):
    dep = hostile_deployment
    hostile, honest = dep.node_ids[HOSTILE], sorted(dep.node_ids[s] for s in HONEST)
    run_dir = dep.root / "run"
    # Nothing crashed: the run completed and every daemon is still up, with no traceback or ERROR anywhere.
    output = _run_to_completion(
        dep, "launch", f"federation.rounds={ROUNDS}", f"output_dir={run_dir}", "strategy=norm_bound",
        f"strategy.params.max_norm={MAX_NORM}", f"strategy.min_available_clients={len(SKILLS)}",
        "strategy.fraction_evaluate=1.0", "eval.generate=false", "tracking=mlflow")
    hostile_log = dep.site_log(HOSTILE)
    for text in (output, dep.procs.log("coordinator")):  # the ServerApp's log (streamed) and the SuperLink's
        assert "Traceback" not in text and "ERROR" not in text, tail(text, 80)
    rows = _metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), tail(output, 80)

    for row in rows:
        kind, reason = kind_of_round(row["round"]), WIRE_REASON[kind_of_round(row["round"])]
        where = (kind, row)
        # The hostile site really sent this round's kind (its own log), and the honest sites trained.
        assert f"HOSTILE round {row['round']}: {kind} (" in hostile_log, tail(hostile_log)
        assert row["aggregated"] and row["failed"] == {} and row["aggregation_error"] is None, where
        assert all(str(node) in row["per_site"] for node in honest), where
        if reason is None:  # accepted and clipped: the round's step is within the norm bound
            assert row["clients_ok"] == 3 and row["rejected"] == {} and str(hostile) in row["per_site"], where
        else:
            assert row["clients_ok"] == 2 and row["missing"] == [hostile], where
            assert list(row["rejected"]) == [str(hostile)] and reason in row["rejected"][str(hostile)], where
            logged = [line for line in output.splitlines()
                      if f"round {row['round']}: REJECTED update from node {hostile}, not aggregated: " in line]
            assert len(logged) == 1 and reason in logged[0], (kind, tail(output, 80))
    for site in HONEST:
        assert dep.site_log(site).count("Receiving: train message") >= ROUNDS

    # Every round's hostile evaluation is left out of the union loss with its reason, or counted (claims within
    # the rules); the union stays finite, metrics.jsonl strict JSON, and MLflow took every round.
    def no_constant(name: str):
        raise AssertionError(f"metrics.jsonl holds {name}, which is no JSON")

    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=no_constant)
    for row in rows:
        kind, reason = eval_kind_of_round(row["round"]), EXPECTED_EVAL_REASON[eval_kind_of_round(row["round"])]
        where = (kind, row["round"], row["eval_rejected"], row["eval_loss"])
        assert f"HOSTILE evaluate round {row['round']}: {kind}" in hostile_log, tail(hostile_log)
        assert row["eval_failed"] == {} and all(str(node) in row["eval_per_site"] for node in honest), where
        assert np.isfinite(row["eval_loss"]) and np.isfinite(row["eval_perplexity"]), where
        if reason is None:
            assert row["eval_rejected"] == {} and str(hostile) in row["eval_per_site"], where
            assert row["eval_loss"] > 1e300, where
            continue
        assert list(row["eval_rejected"]) == [str(hostile)] and reason in row["eval_rejected"][str(hostile)], where
        assert str(hostile) not in row["eval_per_site"], where
        sites = [row["eval_per_site"][str(node)] for node in honest]
        union = sum(s["eval-loss"] * s["eval-tokens"] for s in sites) / sum(s["eval-tokens"] for s in sites)
        assert row["eval_loss"] == pytest.approx(union, rel=1e-12), where
        logged = [line for line in output.splitlines()
                  if f"round {row['round']}: REJECTED evaluation from node {hostile}, not counted: " in line]
        assert len(logged) == 1 and reason in logged[0], (kind, tail(output, 80))
    tracked = [line.split() for line in next((run_dir / "mlruns").glob("*/*/metrics/eval_loss")).read_text()
               .splitlines()]
    assert sorted(int(step) for _, _, step in tracked) == list(range(1, ROUNDS + 1))
    assert all(np.isfinite(float(value)) for _, value, _ in tracked)

    # Every saved global adapter is finite, and each round moved it by no more than the norm bound (the scaled
    # update's norm, as the hostile site logged it, is far beyond it).
    previous = _read_adapter(run_dir / "checkpoints" / "round-0000")
    for server_round in range(1, ROUNDS + 1):
        current = _read_adapter(run_dir / "checkpoints" / f"round-{server_round:04d}")
        assert sorted(current) == sorted(previous)
        assert all(np.all(np.isfinite(v)) for v in current.values()), server_round
        step = _norm({k: current[k].astype(np.float64) - previous[k] for k in current})
        assert 0 < step <= MAX_NORM * (1 + 1e-5), (server_round, step)
        previous = current
    scaled_round = list(KINDS).index("update scaled 1e6") + 1
    scaled_line = next(line for line in hostile_log.splitlines()
                       if f"HOSTILE round {scaled_round}: update scaled 1e6" in line)
    assert float(scaled_line.rsplit("L2 norm ", 1)[1].rstrip(")")) > 1e3 * MAX_NORM, scaled_line

    # The final adapter loads with stock PEFT onto the run's base model, with the saved (finite) values.
    from peft import PeftModel

    from federation.adapter import get_adapter_arrays
    from federation.compose import compose_config
    from federation.model import load_base_model

    cfg = compose_config(["model=tiny", f"model.cache_dir={dep.model_cache}"])
    base, _, _ = load_base_model(cfg.model)
    loaded = get_adapter_arrays(PeftModel.from_pretrained(base, str(run_dir / "global_adapter")))
    assert sorted(loaded) == sorted(previous)
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, previous[key])


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_hostile_site_in_a_secagg_run_drops_out_or_fails_that_round_and_the_honest_sum_goes_on(hostile_deployment):
    dep = hostile_deployment
    hostile, honest = dep.node_ids[HOSTILE], sorted(dep.node_ids[s] for s in HONEST)
    run_dir = dep.root / "secagg-run"
    # The wrong-shares round aggregates nothing by design: one such round must not stop the run.
    output = _run_to_completion(
        dep, "launch-secagg", f"federation.rounds={SECAGG_ROUNDS}", f"output_dir={run_dir}", "privacy=secagg",
        f"strategy.min_available_clients={len(SKILLS)}", "federation.max_failed_rounds=2")
    hostile_log = dep.site_log(HOSTILE)
    assert "Traceback" not in output and "Traceback" not in dep.procs.log("coordinator"), tail(output, 80)
    rows = _metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(1, SECAGG_ROUNDS + 1)), tail(output, 80)

    previous = _read_adapter(run_dir / "checkpoints" / "round-0000")
    for row in rows:
        kind = secagg_kind_of_round(row["round"])
        outcome, reason = EXPECTED_SECAGG[kind]
        where = (kind, {k: row[k] for k in ("aggregated", "clients_ok", "rejected", "failed", "missing")})
        assert f"HOSTILE secagg round {row['round']}: {kind} ({SECAGG_KINDS[kind][0]} reply)" in hostile_log, \
            tail(hostile_log)
        current = _read_adapter(run_dir / "checkpoints" / f"round-{row['round']:04d}")
        assert all(np.all(np.isfinite(v)) for v in current.values()), where
        if outcome == "failed":  # nothing aggregated; the global adapter is the previous round's, bit for bit
            assert not row["aggregated"] and row["clients_ok"] == 0, where
            assert row["adapter_digest"] == row["start_adapter_digest"], where
            assert all(reason in row["failed"][str(node)] for node in honest), where
            assert all(np.array_equal(current[k], previous[k]) for k in current), where
            assert f"round {row['round']}: SecAgg+ round {row['round']}: the unmasked sum is no sum" in output
        else:  # the hostile site dropped out at its stage, the honest sites' sum moved the adapter
            assert row["aggregated"] and row["clients_ok"] == len(honest), where
            assert sorted(int(node) for node in row["per_site"]) == honest, where
            assert list(row["rejected"]) == [str(hostile)] and reason in row["rejected"][str(hostile)], where
            assert f"SecAgg+: REJECTED {SECAGG_KINDS[kind][0]} reply of node {hostile}" in output, tail(output, 80)
            assert any(not np.array_equal(current[k], previous[k]) for k in current), where
        previous = current
