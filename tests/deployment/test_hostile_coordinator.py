"""A hostile coordinator against a real site (`fedtune site`, its own SuperNode and resident worker) on loopback.

The coordinator runs its own ServerApp (tests/deployment/hostile_coordinator.py) under a bundle of fedtune's own
code, which the site approves, and sends crafted messages: a group of virtual clients whose data is a file it
names, a model path on the site's disk, a billion local steps, a model cache outside the site, a broken adapter,
and the same DP-SGD round again and again under new run ids. The site's policy (client/site_policy.py), its
privacy ledger (client/privacy_ledger.py) and its worker's error replies must stop each; nothing of the site's
data, nor of the other file, may reach the coordinator.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets

import pytest

from client.daemon import load_site_config
from federation.privacy import epsilon_of_history
from federation.protocol import SITE_POLICY_REFUSED_ERROR
from tests.deployment.conftest import REPO, running_deployment
from tests.deployment.hostile_coordinator import PLANTED_CACHE, RESULTS_FILE, TARGETS_FILE
from tests.deployment.procs import tail

SITE = "site-p"
BATCH_SIZE = 4  # train.batch_size of the deployment's runs (conftest FAST_OVERRIDES)
LOCAL_STEPS = 2  # train.local_steps, idem
BUDGET = {"epsilon": 4.0, "delta": 1e-5}
POLICY = {"max_local_steps": 5, "privacy_budget": BUDGET}
CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode
RUN_TIMEOUT_S = 300


def _hostile_app(root):
    """fedtune's app, its ServerApp swapped for the hostile one (which stays on the coordinator's host)."""
    from server.coordinator import copy_app

    app = copy_app(root / "hostile-app", REPO)
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('serverapp = "server.app:app"',
                                                       'serverapp = "tests.deployment.hostile_coordinator:app"'))
    return app


def _launch_hostile(dep, overrides, app_dir) -> int:
    """`fedtune launch` of the hostile app: `flwr run` imports its ServerApp (tests.deployment...), so the repo must
    be on the launch's PYTHONPATH as it is on the coordinator's (pytest puts it on sys.path only)."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), before) if p)
    try:
        return dep.launch("launch-hostile", overrides, app_dir=app_dir, timeout_s=RUN_TIMEOUT_S)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """(deployment, results the hostile ServerApp wrote, the other file's secret) after one hostile run."""
    root = tmp_path_factory.mktemp("hostile-coordinator")
    with running_deployment(root, {SITE: "reverse"}, site_settings={SITE: {"policy": POLICY}}) as dep:
        secret = f"OTHER-STUDY-{secrets.token_hex(8)}"
        other = root / "other-study" / "records.jsonl"  # on the site's disk, not its federation data
        other.parent.mkdir()
        other.write_text("".join(json.dumps({"instruction": f"record {i}", "input": "", "output": secret}) + "\n"
                                 for i in range(40)))
        run_dir = root / "run"
        run_dir.mkdir()
        site_data = str(load_site_config(dep.site_configs[SITE]).data_path)
        (run_dir / TARGETS_FILE).write_text(json.dumps({"canary_file": str(other), "site_data": site_data}))
        code = _launch_hostile(dep, dep.fast_overrides("privacy=dp_sgd", f"output_dir={run_dir}"), _hostile_app(root))
        assert code == 0, tail(dep.procs.log("launch-hostile"), 80) + tail(dep.coordinator_logs(), 40)
        assert dep.procs.procs[SITE].poll() is None, tail(dep.site_log(SITE))  # the site is still serving
        yield dep, json.loads((run_dir / RESULTS_FILE).read_text()), secret, run_dir


def _answer(results, attack, dep) -> dict:
    return results[attack][str(dep.node_ids[SITE])]


@pytest.mark.parametrize("attack, reason", [
    ("group-names-the-data-file", "a group of virtual clients is a simulation's message"),
    ("model-path-on-the-site", "is not one this site loads"),
    ("gpu-time", "local steps per round 1000000000 exceeds this site's policy.max_local_steps = 5"),
])
def test_each_crafted_message_is_refused_with_its_reason(attacked, attack, reason):
    dep, results, _, _ = attacked
    code, said = _answer(results, attack, dep)["error"]
    assert code == SITE_POLICY_REFUSED_ERROR and reason in said, said
    assert reason in dep.site_log(SITE)


def test_the_site_builds_its_model_in_its_own_cache_not_where_the_coordinator_says(attacked):
    dep, results, _, run_dir = attacked
    assert "error" not in _answer(results, "model-cache-outside-the-site", dep)  # evaluation is served ...
    assert not (run_dir / PLANTED_CACHE).exists()  # ... from the site's cache
    assert any((dep.root / f"home-{SITE}" / "model-cache").iterdir())
    assert dep.site_log(SITE).count("base model loaded") == 1


def test_an_unexpected_error_reaches_the_coordinator_as_a_type_and_an_incident_only(attacked):
    dep, results, _, _ = attacked
    code, said = _answer(results, "broken-adapter", dep)["error"]
    match = re.fullmatch(r"(\w+) at the site \(incident ([0-9a-f]{8}): .*\)", said)
    assert code == CLIENT_APP_RAISED_EXCEPTION and match, said
    assert f"(incident {match.group(2)})" in dep.site_log(SITE)  # the site's operator has the details


def test_replayed_dp_rounds_stop_at_the_sites_lifetime_budget(attacked):
    dep, results, _, _ = attacked
    answers = [replay[str(dep.node_ids[SITE])] for replay in results["dp-replays"]]
    served = [a for a in answers if "error" not in a]
    refused = [a["error"] for a in answers if "error" in a]
    # Each replay's own accountant starts afresh, so the run reports the same epsilon every time ...
    assert len({a["metrics"]["metrics"]["dp-sgd-epsilon"] for a in served}) == 1
    # ... while the site's ledger counts every release: as many fit as Opacus' RDP accounting allows.
    sample_rate = 1 / math.ceil(dep.train_examples[SITE] / BATCH_SIZE)
    fits = max(k for k in range(len(answers) + 1)
               if epsilon_of_history([(1.0, sample_rate, LOCAL_STEPS * k)], BUDGET["delta"]) <= BUDGET["epsilon"])
    assert 2 <= fits < len(answers)
    assert answers[:fits] == served and len(refused) == len(answers) - fits
    assert all(code == SITE_POLICY_REFUSED_ERROR and f"past its budget of {BUDGET['epsilon']:g}" in said
               for code, said in refused)
    ledger = json.loads((dep.root / f"home-{SITE}" / "privacy-ledger.json").read_text())
    assert [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in ledger["releases"]] \
        == [(1.0, sample_rate, LOCAL_STEPS)] * fits


def test_nothing_of_the_sites_data_or_its_other_files_reaches_the_coordinator(attacked):
    dep, results, secret, run_dir = attacked
    received = (run_dir / RESULTS_FILE).read_text()
    assert secret not in received and dep.canaries[SITE] not in received
    assert secret not in dep.coordinator_logs() and dep.canaries[SITE] not in dep.coordinator_logs()


def test_an_honest_run_outside_the_policy_fails_naming_the_sites_reason(attacked):
    """What the coordinator's operator sees when every site refuses: launch exits 1 and says why."""
    dep, _, _, _ = attacked
    overrides = dep.fast_overrides("train.local_steps=50", "federation.rounds=1", "strategy.min_available_clients=1",
                                   "strategy.min_train_clients=1", f"output_dir={dep.root / 'honest-run'}")
    code = dep.launch("launch-too-long", overrides, timeout_s=RUN_TIMEOUT_S)
    output = dep.procs.log("launch-too-long")
    assert code == 1 and "policy.max_local_steps = 5" in output, tail(output, 40)
