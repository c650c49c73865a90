"""The site's lifetime privacy ledger (client/privacy_ledger.py): Opacus' RDP accounting over every DP-SGD round the
site ran, whatever run id or round the coordinator sends; a replayed round is charged again, and fails closed."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from opacus.accountants import RDPAccountant

import client.worker as worker
from client.privacy_ledger import SitePrivacyLedger
from client.site_policy import PrivacyBudget, SitePolicy, SiteRefusal
from federation.adapter import to_array_record
from federation.config import run_config_to_json
from federation.demo_task import generate_demo_task
from federation.model import initial_adapter
from federation.protocol import FEDERATION_RUN_ID_KEY, RUN_CONFIG_KEY, SITE_POLICY_REFUSED_ERROR
from tests.flower_messages import instruction

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ROUND = (1.1, 0.05, 10)  # noise multiplier, sample rate, steps


def _opacus_epsilon(rounds, delta: float) -> float:
    """Opacus' own RDP accountant, stepped as its optimizer hook steps it."""
    accountant = RDPAccountant()
    for sigma, q, steps in rounds:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def test_rounds_are_charged_until_the_next_would_pass_the_budget(tmp_path):
    budget = PrivacyBudget(epsilon=3.0, delta=1e-5)
    fits = next(n for n in range(1, 100) if _opacus_epsilon([ROUND] * (n + 1), budget.delta) > budget.epsilon)
    assert fits >= 2  # the test means something only if several rounds fit
    ledger = SitePrivacyLedger(tmp_path / "ledger.json", budget)
    for n in range(fits):
        charge = ledger.charge(*ROUND, run="run-1", server_round=1)  # the same round, re-sent: charged every time
        assert charge.epsilon == pytest.approx(_opacus_epsilon([ROUND] * (n + 1), budget.delta), rel=1e-9)
    before = (tmp_path / "ledger.json").read_bytes()
    with pytest.raises(SiteRefusal, match=r"past its budget of 3 \(policy.privacy_budget\)"):
        SitePrivacyLedger(tmp_path / "ledger.json", budget).charge(*ROUND, run="run-2", server_round=1)
    assert (tmp_path / "ledger.json").read_bytes() == before  # a refused round is not charged
    assert ledger.epsilon() <= budget.epsilon


def test_an_unreadable_ledger_refuses_every_round_and_is_left_as_found(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text('{"version": 1, "accountant": "rdp", "releases": [{"noise_multiplier": 1.0')  # torn
    with pytest.raises(SiteRefusal, match="privacy ledger is unreadable"):
        SitePrivacyLedger(path, PrivacyBudget(100.0, 1e-5)).charge(*ROUND, run="r", server_round=1)
    assert path.read_text().endswith("1.0")


def test_a_round_without_noise_is_never_within_a_budget(tmp_path):
    with pytest.raises(SiteRefusal, match="to inf"):
        SitePrivacyLedger(tmp_path / "l.json", PrivacyBudget(1e6, 1e-5)).charge(0.0, 0.1, 1, run="r", server_round=1)


# ------------------------------------------------------------------------------------------ through the ClientApp


def _site(tmp_path, budget: PrivacyBudget) -> tuple[Context, SitePolicy]:
    train, _ = generate_demo_task_small()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    policy = SitePolicy(privacy_budget=budget, privacy_ledger=str(tmp_path / "privacy-ledger.json"),
                        model_cache_dir="", train_examples=len(train))
    node_config = {"data-path": str(data), "round-state-dir": str(tmp_path / "round-state")}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={}), policy


def generate_demo_task_small():
    from federation.config import DemoTaskConfig

    return generate_demo_task(DemoTaskConfig(skills=["reverse"], examples_per_skill=40, eval_examples_per_skill=8))


def _dp_train(cfg, context, policy: SitePolicy, federation_run: str):
    """Round 1 of a DP-SGD run, answered as the site's resident worker answers it."""
    from tests.client.test_worker import _fab

    content = RecordDict({"arrays": to_array_record(initial_adapter(cfg.model, cfg.lora)),
                          "config": ConfigRecord({RUN_CONFIG_KEY: run_config_to_json(cfg), "server-round": 1,
                                                  FEDERATION_RUN_ID_KEY: federation_run})})
    return worker.handle_message(instruction(content, dst_node_id=7), context, _fab(modified=False), (),
                                 policy=policy)[0]


def test_a_coordinator_replaying_a_dp_round_under_new_run_ids_is_stopped_by_the_ledger(make_cfg, tmp_path):
    cfg = make_cfg("privacy=dp_sgd", "privacy.local_dp_sgd.noise_multiplier=1.0", "train.local_steps=3")
    budget = PrivacyBudget(epsilon=4.0, delta=1e-5)  # 3 such rounds fit (epsilon 3.92), a 4th would not (4.28)
    context, policy = _site(tmp_path, budget)
    run_epsilons, accepted = [], 0
    for attempt in range(6):
        answer = _dp_train(cfg, context, policy, federation_run=f"fresh-run-{attempt}")
        if answer.has_error():
            break
        accepted += 1
        # What the run's own accountant reports: the same every time, as if nothing had been released before.
        run_epsilons.append(answer.content["metrics"]["dp-sgd-epsilon"])
    assert answer.has_error() and answer.error.code == SITE_POLICY_REFUSED_ERROR
    assert "past its budget of 4" in answer.error.reason
    assert accepted == 3 and len(set(run_epsilons)) == 1
    # The ledger charged each accepted round exactly as Opacus' accountant recorded it: (sigma, 1/len(loader), steps).
    releases = json.loads((tmp_path / "privacy-ledger.json").read_text())["releases"]
    assert len(releases) == accepted
    history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in releases]
    state_dir = tmp_path / "round-state" / "fresh-run-0" / "fedtune.dp-sgd"
    recorded = json.loads(next(state_dir.glob("round-0002.json")).read_text())["history"]
    assert [tuple(entry) for entry in recorded] == [history[0]]
    assert _opacus_epsilon(history, budget.delta) <= budget.epsilon < _opacus_epsilon([*history, history[0]], budget.delta)
    assert run_epsilons[0] == pytest.approx(_opacus_epsilon(history[:1], cfg.privacy.local_dp_sgd.delta), rel=1e-6)


def _charge_in_a_process(args):
    path, budget = args
    try:
        SitePrivacyLedger(path, budget).charge(*ROUND, run="parallel", server_round=1)
        return True
    except SiteRefusal:
        return False


def test_processes_charging_one_ledger_at_once_never_overrun_it(tmp_path):
    """Two daemons started on one state_dir by mistake: the lock keeps read-check-write whole."""
    import multiprocessing

    budget = PrivacyBudget(epsilon=3.0, delta=1e-5)
    fits = next(n for n in range(1, 100) if _opacus_epsilon([ROUND] * (n + 1), budget.delta) > budget.epsilon)
    path = tmp_path / "ledger.json"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        accepted = pool.map(_charge_in_a_process, [(path, budget)] * (fits + 4))
    assert sum(accepted) == fits
    assert len(json.loads(path.read_text())["releases"]) == fits
