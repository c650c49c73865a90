"""A hostile coordinator against a site's policy (client/site_policy.py), in process: each message the coordinator
can craft is refused before any work, or served with the site's own model path and cache."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode

import client.app as client_app
import client.worker as worker
from client.daemon import SiteConfigError, load_site_config
from client.site_policy import (NODE_POLICY_KEY, PolicyError, PrivacyBudget, SitePolicy, SiteRefusal, parse_policy,
                                site_policy_mod)
from federation.protocol import RUN_CONFIG_KEY, SITE_POLICY_REFUSED_ERROR
from federation.virtual_clients import GROUP_ACTION
from tests.deployment.hostile_coordinator import run_config_with
from tests.flower_messages import instruction, reply

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# ------------------------------------------------------------------------------------------ site.yaml


@pytest.mark.parametrize("raw, key", [
    ("not a mapping", "policy"),
    ({"max_local_stepz": 3}, "policy.max_local_stepz"),
    ({"max_local_steps": 0}, "policy.max_local_steps"),
    ({"max_seq_len": "4096"}, "policy.max_seq_len"),
    ({"max_examples_per_step": True}, "policy.max_examples_per_step"),
    ({"models": ["meta-llama/Llama-3.1-8B"]}, "policy.models"),
    ({"models": {"preset": None}}, "policy.models"),
    ({"privacy_budget": {"epsilon": 8}}, "policy.privacy_budget"),
    ({"privacy_budget": {"epsilon": -1, "delta": 1e-5}}, "policy.privacy_budget.epsilon"),
    ({"privacy_budget": {"epsilon": 8, "delta": 1}}, "policy.privacy_budget.delta"),
    ({"error_details": "yes"}, "policy.error_details"),
    ({"require_secagg": 1}, "policy.require_secagg"),
])
def test_a_bad_policy_setting_is_named(raw, key):
    with pytest.raises(PolicyError) as refused:
        parse_policy(raw)
    assert refused.value.key == key and "\n" not in str(refused.value)


def test_site_yaml_policy_mistakes_are_one_line_naming_the_key(tmp_path):
    base = {"name": "a", "coordinator": "h:1", "data_path": "d", "insecure": True}
    path = tmp_path / "site.yaml"
    path.write_text(json.dumps({**base, "policy": {"max_new_tokens": -3}}))
    with pytest.raises(SiteConfigError) as refused:
        load_site_config(path)
    assert refused.value.key == "policy.max_new_tokens" and "\n" not in str(refused.value)
    path.write_text(json.dumps({**base, "policy": {"privacy_budget": {"epsilon": 4, "delta": 1e-5}}}))
    with pytest.raises(SiteConfigError, match="needs state_dir"):
        load_site_config(path)


def test_the_daemon_sets_the_cache_and_ledger_under_state_dir(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(json.dumps({"name": "a", "coordinator": "h:1", "data_path": "d", "insecure": True,
                                "state_dir": "state", "policy": {"privacy_budget": {"epsilon": 4, "delta": 1e-5}}}))
    policy = load_site_config(path).policy
    assert policy.model_cache_dir == str(tmp_path / "state" / "model-cache")
    assert policy.privacy_ledger == str(tmp_path / "state" / "privacy-ledger.json")
    assert policy.privacy_budget == PrivacyBudget(4.0, 1e-5)
    assert SitePolicy.from_json(policy.to_json()) == policy
    path.write_text(json.dumps({"name": "a", "coordinator": "h:1", "data_path": "d", "insecure": True,
                                "state_dir": "state", "model_cache_dir": "/big-disk/models"}))
    assert load_site_config(path).policy.model_cache_dir == "/big-disk/models"


# ------------------------------------------------------------------------------------------ the mod


def _message(cfg, message_type="train", **config_changes) -> Message:
    """A message of `cfg`'s run config with `config_changes` applied ('model__name' sets model.name)."""
    changes = {path.replace("__", "."): value for path, value in config_changes.items()}
    content = RecordDict({"config": ConfigRecord({RUN_CONFIG_KEY: run_config_with(cfg, **changes), "server-round": 1})})
    return instruction(content, dst_node_id=7, message_type=message_type)


def _context(policy: SitePolicy | None, tmp_path) -> Context:
    node_config = {"data-path": str(tmp_path / "data.jsonl")}
    if policy is not None:
        node_config[NODE_POLICY_KEY] = policy.to_json()
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


class _Next:
    """call_next that records what reached the handlers."""

    def __init__(self):
        self.seen: list[Message] = []

    def __call__(self, msg: Message, context: Context) -> Message:
        self.seen.append(msg)
        return reply(msg, RecordDict())

    def run_config(self) -> dict:
        return json.loads(str(self.seen[-1].content["config"][RUN_CONFIG_KEY]))


@pytest.mark.parametrize("changes, message_type, reason", [
    ({"model__name": "/srv/hospital/patients"}, "train", "model '/srv/hospital/patients' is not one this site loads"),
    ({"model__name": "meta-llama/Llama-3.1-70B"}, "evaluate", "is not one this site loads"),
    ({"train__local_steps": 10**9}, "train", "local steps per round 1000000000 exceeds this site's "
                                             "policy.max_local_steps = 50"),
    ({"train__local_epochs": 3.0, "train__batch_size": 4}, "train", "local steps per round 75 exceeds"),
    ({"train__grad_accum": 8, "train__batch_size": 4}, "train", "examples per step (train.batch_size x "
                                                                "train.grad_accum) 32 exceeds"),
    ({"data__max_seq_len": 100_000}, "train", "data.max_seq_len 100000 exceeds"),
    ({"eval__max_new_tokens": 10**6}, "evaluate", "eval.max_new_tokens 1000000 exceeds"),
    ({"train__local_steps": "many"}, "train", "local steps or LoRA rank are malformed"),
    ({"data__max_seq_len": None}, "train", "the run config's data.max_seq_len is not a number"),
    ({"model__name": 3}, "train", "the run config's model.name is not a string"),
])
def test_a_message_outside_the_policy_is_refused_before_any_work(make_cfg, tmp_path, changes, message_type, reason,
                                                                  caplog):
    policy = SitePolicy(max_local_steps=50, max_examples_per_step=16, max_seq_len=4096, max_new_tokens=64,
                        train_examples=100)
    handlers = _Next()
    msg = _message(make_cfg(), message_type, **changes)
    with caplog.at_level("ERROR", logger="fedtune.site.policy"):
        answer = site_policy_mod(msg, _context(policy, tmp_path), handlers)
    assert handlers.seen == []
    assert answer.has_error() and answer.error.code == SITE_POLICY_REFUSED_ERROR, answer.error
    assert reason in answer.error.reason and answer.metadata.reply_to_message_id == msg.metadata.message_id
    assert f"REFUSED {message_type} message of run" in caplog.text and reason in caplog.text


def test_epochs_are_refused_where_the_sites_example_count_is_unknown(make_cfg, tmp_path):
    handlers = _Next()
    answer = site_policy_mod(_message(make_cfg(), train__local_epochs=1.0), _context(SitePolicy(), tmp_path), handlers)
    assert handlers.seen == [] and "its example count is unknown" in answer.error.reason


def test_a_secagg_training_stage_carrying_the_run_config_in_the_legacy_record_is_checked_too(make_cfg, tmp_path):
    """SecAgg+'s training stage carries the run config in Flower's legacy FitIns record (client/secagg.py)."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    plain = _message(make_cfg(), model__name="/srv/hospital/patients")
    config = {RUN_CONFIG_KEY: str(plain.content["config"][RUN_CONFIG_KEY]), "server-round": 1}
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([]), config), keep_input=True)
    handlers = _Next()
    answer = site_policy_mod(instruction(content, dst_node_id=7), _context(SitePolicy(), tmp_path), handlers)
    assert handlers.seen == [] and "is not one this site loads" in answer.error.reason
    budget = SitePolicy(privacy_budget=PrivacyBudget(4.0, 1e-5))
    config[RUN_CONFIG_KEY] = str(_message(make_cfg()).content["config"][RUN_CONFIG_KEY])
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([]), config), keep_input=True)
    answer = site_policy_mod(instruction(content, dst_node_id=7), _context(budget, tmp_path), handlers)
    assert handlers.seen == [] and "trains only with local DP-SGD" in answer.error.reason


def test_a_group_of_virtual_clients_is_refused_at_a_deployed_site(make_cfg, tmp_path):
    # A group's members get a partition id instead of the site's data-path, and partitions are cut from the run
    # config's data.source: the coordinator would name the file the site trains on.
    msg = _message(make_cfg(), f"train.{GROUP_ACTION}", data__source="/etc/passwd")
    handlers = _Next()
    answer = site_policy_mod(msg, _context(SitePolicy(), tmp_path), handlers)
    assert handlers.seen == [] and answer.error.code == SITE_POLICY_REFUSED_ERROR
    assert "a group of virtual clients is a simulation's message" in answer.error.reason


def test_a_privacy_budget_refuses_training_without_dp_sgd_but_not_evaluation(make_cfg, tmp_path):
    policy = SitePolicy(privacy_budget=PrivacyBudget(4.0, 1e-5))
    handlers = _Next()
    refused = site_policy_mod(_message(make_cfg()), _context(policy, tmp_path), handlers)
    assert "trains only with local DP-SGD" in refused.error.reason and handlers.seen == []
    assert not site_policy_mod(_message(make_cfg(), "evaluate"), _context(policy, tmp_path), handlers).has_error()
    assert not site_policy_mod(_message(make_cfg("privacy=dp_sgd")), _context(policy, tmp_path), handlers).has_error()
    assert len(handlers.seen) == 2


def test_the_site_loads_models_from_its_own_paths_and_builds_presets_in_its_own_cache(make_cfg, tmp_path):
    policy = SitePolicy(models={"meta-llama/Llama-3.1-8B": "/models/llama-3.1-8b", "org/open-model": None},
                        model_cache_dir=str(tmp_path / "site-cache"))
    handlers = _Next()
    context = _context(policy, tmp_path)
    site_policy_mod(_message(make_cfg(), model__name="meta-llama/Llama-3.1-8B", model__cache_dir="/etc"), context,
                    handlers)
    assert handlers.run_config()["model"]["name"] == "/models/llama-3.1-8b"
    assert handlers.run_config()["model"]["cache_dir"] == str(tmp_path / "site-cache")
    site_policy_mod(_message(make_cfg(), model__name="org/open-model"), context, handlers)
    assert handlers.run_config()["model"]["name"] == "org/open-model"
    site_policy_mod(_message(make_cfg(), model__cache_dir="/home/site/.ssh"), context, handlers)
    assert handlers.run_config()["model"]["name"] == "preset"
    assert handlers.run_config()["model"]["cache_dir"] == str(tmp_path / "site-cache")


def test_without_a_policy_a_simulation_message_passes_unchanged(make_cfg, tmp_path):
    handlers = _Next()
    msg = _message(make_cfg(), f"train.{GROUP_ACTION}", train__local_steps=10**9)
    site_policy_mod(msg, _context(None, tmp_path), handlers)
    assert handlers.seen == [msg]


def test_the_clientapp_runs_the_policy_on_every_message(make_cfg, tmp_path, monkeypatch):
    import client.task as task

    def no_load(*args, **kwargs):
        raise AssertionError("the base model must not load for a refused message")

    monkeypatch.setattr(task, "get_runtime", no_load)
    answer = client_app.app(_message(make_cfg(), model__name=str(tmp_path)), _context(SitePolicy(), tmp_path))
    assert answer.error.code == SITE_POLICY_REFUSED_ERROR and "is not one this site loads" in answer.error.reason


# ------------------------------------------------------------------------------------------ what an error says


def _worker_answer(monkeypatch, raised: Exception, policy: SitePolicy | None, caplog):
    from tests.client.test_worker import _fab

    def broken(message: Message, context: Context) -> Message:
        assert context.node_config.get(NODE_POLICY_KEY) == (None if policy is None else policy.to_json())
        raise raised

    monkeypatch.setattr(worker, "client_app", broken)
    context = Context(run_id=1, node_id=7, node_config={"data-path": "x"}, state=RecordDict(), run_config={})
    with caplog.at_level("ERROR", logger="fedtune.site.worker"):
        answer, _, details = worker.handle_message(instruction(RecordDict(), dst_node_id=7), context,
                                                   _fab(modified=False), (), policy=policy)
    assert context.node_config == {"data-path": "x"}  # the SuperNode gets its Context back as it sent it
    assert details == answer.error.reason
    return answer


def test_an_unexpected_error_leaves_the_site_as_its_type_and_an_incident_id_only(monkeypatch, caplog):
    secret = "Patient Jane Roe, MRN 0042, diagnosed with"
    answer = _worker_answer(monkeypatch, ValueError(f"cannot tokenize {secret!r}"), SitePolicy(), caplog)
    assert answer.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert secret not in answer.error.reason and answer.error.reason.startswith("ValueError at the site (incident ")
    incident = answer.error.reason.split("incident ")[1].split(":")[0]
    assert f"(incident {incident})" in caplog.text and secret in caplog.text  # the site's operator sees it all


def test_error_details_are_sent_when_the_site_allows_it(monkeypatch, caplog):
    answer = _worker_answer(monkeypatch, ValueError("bad batch"), SitePolicy(error_details=True), caplog)
    assert "bad batch" in answer.error.reason


def test_a_refusal_raised_during_training_says_why(monkeypatch, caplog):
    answer = _worker_answer(monkeypatch, SiteRefusal("past its budget"), SitePolicy(), caplog)
    assert answer.error.code == SITE_POLICY_REFUSED_ERROR
    assert answer.error.reason == "REFUSED by the site's policy: past its budget"


def test_site_check_prints_what_the_site_agrees_to(tmp_path, capsys):
    from simulations.cli import main

    (tmp_path / "data.jsonl").write_text(json.dumps({"instruction": "q", "input": "", "output": "a"}) + "\n")
    (tmp_path / "site.yaml").write_text(json.dumps({
        "name": "a", "coordinator": "h:1", "data_path": "data.jsonl", "insecure": True, "state_dir": "state",
        "policy": {"models": {"org/model": "/models/m"}, "max_local_steps": 7,
                   "privacy_budget": {"epsilon": 2, "delta": "1e-6"}}}))
    assert main(["site", "--config", str(tmp_path / "site.yaml"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "policy: models: presets + ['org/model']; max_local_steps 7" in out
    assert "privacy budget: epsilon 2 at delta 1e-06 (DP-SGD required)" in out
