"""What a partner site agrees to do for any coordinator: its policy (site.yaml ``policy:``), checked on every message.

A site trusts no one, its coordinator included. The coordinator chooses the whole run config that travels with
every message (client/app.py), so without limits it could make a site
- load any model path on the site's disks (``model.name``) or download any hub repository,
- write built models wherever it names (``model.cache_dir``),
- train on any file it names: a *group* message (a simulation's virtual clients, federation/virtual_clients.py)
  gives its members a partition id instead of the site's ``data-path``, and partitions are cut from the run
  config's ``data.source``,
- burn the site's GPU (``train.local_steps=10**9``) or memory,
- and spend the site's record-level privacy without end: DP-SGD's accountant is round state keyed by the
  coordinator's federation run id and round (client/site_state.py), so a new run id, or a re-sent round, starts
  from a fresh or earlier accountant, while every reply is one more noisy release of the same data.

``site_policy_mod`` (a ClientApp mod, after the run config is restored) refuses such messages before any work,
with a one-line reason in the site log and in the error reply; it also rewrites the run config so the site loads
the model from its own path and builds presets in its own cache. The lifetime privacy budget is kept by
client/privacy_ledger.py, charged before every DP-SGD round. The resident worker (client/worker.py) puts the
policy into the Context's node config; a simulation has none, and its messages pass unchanged.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from client.site_settings import site_settings_of
from federation.protocol import RUN_CONFIG_KEY, SITE_POLICY_REFUSED_ERROR
from federation.virtual_clients import GROUP_ACTION

log = logging.getLogger("fedtune.site.policy")

# Context.node_config key holding the policy as JSON (set in-process by the resident worker, never by a message).
NODE_POLICY_KEY = "fedtune.site-policy"
# model.name of the built-in random-init presets: built from a seed, no file read, nothing downloaded.
PRESET_MODEL = "preset"


class SiteRefusal(Exception):
    """A message this site will not serve; the message (one line, no site data) goes to the coordinator as is."""


class PolicyError(ValueError):
    """site.yaml's ``policy`` is unusable: `key` names the setting, the message says why (one line)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class PrivacyBudget:
    """Record-level (epsilon, delta) this site's data may lose over its lifetime, all runs and retries together."""

    epsilon: float
    delta: float


@dataclass
class SitePolicy:
    """Limits on what any coordinator can make this site do (see conf/site/example.yaml for each setting)."""

    # model.name as the coordinator names it (hub id) -> the local directory this site loads it from, or None to
    # load the name as given (a hub download where the site has network). Presets are always allowed.
    models: dict[str, str | None] = field(default_factory=dict)
    # Optimizer steps of one train message (local_steps, or local_epochs over this site's examples).
    max_local_steps: int = 2000
    # Examples in one optimizer step (train.batch_size x train.grad_accum).
    max_examples_per_step: int = 256
    # Tokens per training / evaluation row (data.max_seq_len).
    max_seq_len: int = 16384
    # New tokens per generated evaluation answer (eval.max_new_tokens).
    max_new_tokens: int = 1024
    # None: DP-SGD is the coordinator's choice. Set: every train message must use local DP-SGD, and the site's
    # ledger refuses a round that would take its lifetime epsilon (at this delta) past the budget.
    privacy_budget: PrivacyBudget | None = None
    # True: refuse to upload a plain delta; train only inside SecAgg+, where the coordinator sees only the sum.
    require_secagg: bool = False
    # False: an unexpected error reaches the coordinator as its exception type and an incident id only (its
    # message could quote site data); the site log has the details. Refusals always say why.
    error_details: bool = False
    # Set by the daemon from state_dir, not in site.yaml:
    model_cache_dir: str = ""  # where presets are built (the coordinator's model.cache_dir is ignored)
    privacy_ledger: str = ""  # the ledger file of the site's DP-SGD releases (client/privacy_ledger.py)
    train_examples: int = 0  # this site's training examples (turns local_epochs into steps)

    def to_json(self) -> str:
        """The policy as the JSON the worker puts in the node config."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SitePolicy:
        """Inverse of to_json."""
        raw = json.loads(text)
        budget = raw.pop("privacy_budget", None)
        return cls(**raw, privacy_budget=None if budget is None else PrivacyBudget(**budget))


# What site.yaml's `policy:` may set (the rest comes from the daemon).
POLICY_KEYS = ("models", "max_local_steps", "max_examples_per_step", "max_seq_len", "max_new_tokens",
               "privacy_budget", "require_secagg", "error_details")


def parse_policy(raw: Any) -> SitePolicy:
    """site.yaml's ``policy:`` mapping (None: the defaults) -> SitePolicy; PolicyError names the bad key."""
    if raw is None:
        return SitePolicy()
    if not isinstance(raw, dict):
        raise PolicyError("policy", f"policy must be a mapping of settings, got {raw!r}")
    unknown = sorted(set(raw) - set(POLICY_KEYS))
    if unknown:
        raise PolicyError(f"policy.{unknown[0]}", f"unknown policy settings {unknown}; known: {list(POLICY_KEYS)}")
    defaults = SitePolicy()
    values: dict[str, Any] = {}
    for key in ("max_local_steps", "max_examples_per_step", "max_seq_len", "max_new_tokens"):
        value = raw.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PolicyError(f"policy.{key}", f"policy.{key} must be an integer >= 1, got {value!r}")
        values[key] = value
    models = raw.get("models") or {}
    if not isinstance(models, dict) or not all(
            isinstance(name, str) and name and (path is None or (isinstance(path, str) and path))
            for name, path in models.items()):
        raise PolicyError("policy.models", "policy.models must map model names (as the coordinator gives "
                          f"model.name) to a local directory or null, got {models!r}")
    if PRESET_MODEL in models:
        raise PolicyError("policy.models", f"policy.models: {PRESET_MODEL!r} names the built-in presets, which "
                          "are always allowed; list real models only")
    for key in ("require_secagg", "error_details"):
        value = raw.get(key, getattr(defaults, key))
        if not isinstance(value, bool):
            raise PolicyError(f"policy.{key}", f"policy.{key} must be true or false, got {value!r}")
        values[key] = value
    return SitePolicy(models=dict(models), privacy_budget=_parse_budget(raw.get("privacy_budget")), **values)


def _parse_budget(raw: Any) -> PrivacyBudget | None:
    if raw is None:
        return None
    where = "policy.privacy_budget"
    if not isinstance(raw, dict) or set(raw) != {"epsilon", "delta"}:
        raise PolicyError(where, f"{where} must be {{epsilon: <number > 0>, delta: <number in (0, 1)>}} or null, "
                          f"got {raw!r}")
    epsilon, delta = (_yaml_number(raw[key]) for key in ("epsilon", "delta"))
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < math.inf:
        raise PolicyError(f"{where}.epsilon", f"{where}.epsilon must be a finite number > 0, got {epsilon!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise PolicyError(f"{where}.delta", f"{where}.delta must be a number in (0, 1), got {delta!r}")
    return PrivacyBudget(float(epsilon), float(delta))


def _yaml_number(value: Any) -> Any:
    """A float written as `1e-5` (PyYAML reads exponents without a dot as text), else the value as is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def policy_of(context: Context) -> SitePolicy | None:
    """This site's policy, or None where there is none (a simulation: the researcher runs every side)."""
    text = context.node_config.get(NODE_POLICY_KEY)
    return None if text is None else _parsed(str(text))


_PARSED: dict[str, SitePolicy] = {}


def _parsed(text: str) -> SitePolicy:
    if text not in _PARSED:
        _PARSED.clear()  # one policy per worker process
        _PARSED[text] = SitePolicy.from_json(text)
    return _PARSED[text]


# ------------------------------------------------------------------------------------------------ the checks


def _value(run_config: dict, path: str, kind: type):
    node: Any = run_config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SiteRefusal(f"the run config has no {path}")
        node = node[part]
    if kind is bool:
        if not isinstance(node, bool):
            raise SiteRefusal(f"the run config's {path} is not true or false: {node!r}")
        return node
    if kind is str:
        if not isinstance(node, str):
            raise SiteRefusal(f"the run config's {path} is not a string: {node!r}")
        return node
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        raise SiteRefusal(f"the run config's {path} is not a number: {node!r}")
    return node


def planned_local_steps(run_config: dict, node_config, train_examples: int) -> int:
    """Optimizer steps one train message of this run config asks of this site (as client/trainer.py plans them)."""
    epochs = _value(run_config, "train.local_epochs", float)
    if epochs > 0:
        if train_examples < 1:  # fail closed: the daemon always counts them
            raise SiteRefusal("train.local_epochs cannot be checked against this site's policy.max_local_steps: "
                              "its example count is unknown")
        per_step = _value(run_config, "train.batch_size", int) * _value(run_config, "train.grad_accum", int)
        return max(1, math.ceil(epochs * train_examples / max(per_step, 1)))
    try:
        return site_settings_of(run_config, node_config).local_steps
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SiteRefusal(f"the run config's local steps or LoRA rank are malformed ({type(exc).__name__})") from None


def check_run_config(run_config: dict, category: str, policy: SitePolicy, node_config) -> None:
    """Raise SiteRefusal if serving a `category` message of this run config would break the site's policy."""
    name = _value(run_config, "model.name", str)
    if name != PRESET_MODEL and name not in policy.models:
        allowed = sorted(policy.models)
        raise SiteRefusal(f"model {name!r} is not one this site loads (its policy.models: {allowed or 'none'}; "
                          f"built-in presets are always allowed)")
    limits = [
        ("local steps per round", planned_local_steps(run_config, node_config, policy.train_examples),
         policy.max_local_steps, "max_local_steps"),
        ("examples per step (train.batch_size x train.grad_accum)",
         _value(run_config, "train.batch_size", int) * _value(run_config, "train.grad_accum", int),
         policy.max_examples_per_step, "max_examples_per_step"),
        ("data.max_seq_len", _value(run_config, "data.max_seq_len", int), policy.max_seq_len, "max_seq_len"),
        ("eval.max_new_tokens", _value(run_config, "eval.max_new_tokens", int), policy.max_new_tokens,
         "max_new_tokens"),
    ]
    for what, asked, limit, key in limits:
        if asked > limit:
            raise SiteRefusal(f"{what} {asked} exceeds this site's policy.{key} = {limit}")
    if policy.privacy_budget is not None and category == "train" \
            and not _value(run_config, "privacy.local_dp_sgd.enabled", bool):
        raise SiteRefusal("this site trains only with local DP-SGD (its policy.privacy_budget); the run has "
                          "privacy.local_dp_sgd.enabled = false")


def site_run_config(run_config: dict, policy: SitePolicy) -> dict:
    """The run config as this site serves it: the model from the site's own path, presets built in its own cache."""
    out = json.loads(json.dumps(run_config))
    name = out["model"]["name"]
    if name != PRESET_MODEL and policy.models.get(name):
        out["model"]["name"] = policy.models[name]
    if policy.model_cache_dir:
        out["model"]["cache_dir"] = policy.model_cache_dir
    return out


def refuse(msg: Message, reason: str) -> Message:
    """The error reply that refuses `msg`, logged on the site."""
    config = msg.content.config_records.get("config")
    server_round = config.get("server-round", "?") if config is not None else "?"
    log.error("REFUSED %s message of run %s (round %s): %s", msg.metadata.message_type, msg.metadata.run_id,
              server_round, reason)
    return Message(Error(code=SITE_POLICY_REFUSED_ERROR, reason=f"REFUSED by the site's policy: {reason}"),
                   reply_to=msg)


def site_policy_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: a message the site's policy refuses gets an error reply before any work; the others go on
    with the site's run config (site_run_config). No policy in the node config (a simulation): unchanged."""
    policy = policy_of(context)
    if policy is None:
        return call_next(msg, context)
    category, _, action = msg.metadata.message_type.partition(".")
    if action == GROUP_ACTION:
        return refuse(msg, "a group of virtual clients is a simulation's message; a deployed site answers only "
                      "messages addressed to itself, with its own data")
    # Every record that carries a run config: a plain message's "config", and SecAgg+'s training stage carries it in
    # the legacy FitIns record ("fitins.config", client/secagg.py), which would otherwise train unchecked.
    carriers = {name: record for name, record in msg.content.config_records.items() if RUN_CONFIG_KEY in record}
    if not carriers:
        return call_next(msg, context)  # e.g. a SecAgg+ key-exchange stage: nothing is loaded or trained
    content = RecordDict(dict(msg.content.items()))
    for name, record in carriers.items():
        try:
            run_config = json.loads(str(record[RUN_CONFIG_KEY]))
            if not isinstance(run_config, dict):
                raise SiteRefusal("the run config is not a JSON object")
            check_run_config(run_config, category, policy, context.node_config)
        except json.JSONDecodeError:
            return refuse(msg, "the run config is not valid JSON")
        except SiteRefusal as refusal:
            return refuse(msg, str(refusal))
        served = json.dumps(site_run_config(run_config, policy), sort_keys=True)
        content[name] = ConfigRecord({**dict(record), RUN_CONFIG_KEY: served})
    return call_next(Message(metadata=msg.metadata, content=content), context)


def policy_summary(policy: SitePolicy) -> str:
    """One line for the site log: what this site agrees to."""
    budget = policy.privacy_budget
    parts = [f"models: presets + {sorted(policy.models) or 'none'}", f"max_local_steps {policy.max_local_steps}",
             f"max_examples_per_step {policy.max_examples_per_step}", f"max_seq_len {policy.max_seq_len}",
             f"max_new_tokens {policy.max_new_tokens}",
             "privacy budget: none (DP-SGD is the coordinator's choice)" if budget is None
             else f"privacy budget: epsilon {budget.epsilon:g} at delta {budget.delta:g} (DP-SGD required)",
             "SecAgg+ required" if policy.require_secagg else "plain uploads allowed"]
    return "; ".join(parts)

