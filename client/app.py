"""The site's one Flower ClientApp (Message API): every message a coordinator sends, and the handler that answers it.

Flower routes a message of type ``<category>.<action>`` to the handler registered as ``@app.<category>("<action>")``
and a bare ``<category>`` to the default one (flwr/clientapp/client_app.py). The strategy registry
(strategies/registry.py, ``client_train_action`` / ``client_evaluate_action``) names the action a strategy's sites run:

| message type          | handler                          | strategies                                     |
|-----------------------|----------------------------------|------------------------------------------------|
| ``train``             | ``train`` (below)                | fedavg, fedprox, server optimizers, robust, ffa_lora; SecAgg+ stages |
| ``train.scaffold``    | client/scaffold.py ``train``     | scaffold                                       |
| ``train.fedsa_lora``  | client/fedsa.py ``train``        | fedsa_lora                                     |
| ``train.flora``       | client/flora.py ``train``        | flora, flexlora (own LoRA rank per site)       |
| ``train.fedex_lora``  | client/fedex.py ``train``        | fedex_lora                                     |
| ``evaluate``          | ``evaluate`` (below)             | every strategy without its own                 |
| ``evaluate.<action>`` | that file's ``evaluate``         | fedsa_lora, flora/flexlora, fedex_lora         |
| ``query``             | client/flora.py ``site_profile`` | the coordinator's check of each site's rank    |
| ``<category>.virtual_clients`` | ``virtual_clients`` (below) | a simulation's group of virtual clients (federation/virtual_clients.py) |

The base model is loaded once per process and stays resident (client/task.py); every round only the LoRA
tensors are copied in. The run config travels from the coordinator inside the message (in full until the site has
answered one, then by its sha256: the mod ``run_config_from_context`` of client/run_config_cache.py puts it back
before every handler), so every site trains the model and adapter shape the coordinator chose; the site-local
inputs are where the data is (``data-path`` in the node config, or the simulation's partition id) and, at a
deployed site, its policy (the mod ``site_policy_mod`` of client/site_policy.py: which models from which local
paths, limits per message, a lifetime privacy budget). pyproject's ``clientapp``, the site's resident worker
(client/worker.py) and the simulations all run this ``app``.
"""

from __future__ import annotations

# First, before the imports that warn: in a Ray actor of `fedtune simulate`, this process's output goes to the
# run's log file (federation/run_log.py), not through Ray to the console.
from federation.run_log import redirect_output_if_asked

redirect_output_if_asked()

import json  # noqa: E402

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from client import fedex, fedsa, flora, scaffold, task  # noqa: E402
from client.multi_adapter import answer_together  # noqa: E402
from client.run_config_cache import run_config_from_context  # noqa: E402
from client.secagg import secagg_fit, secaggplus_when_requested  # noqa: E402
from client.site_policy import site_policy_mod  # noqa: E402
from federation.protocol import EVALUATE, LEGACY_FIT_PARAMETERS, QUERY, RUN_CONFIG_KEY, TRAIN  # noqa: E402
from federation.virtual_clients import GROUP_ACTION, pack_replies, unpack_group  # noqa: E402
from strategies.registry import strategy_spec  # noqa: E402

# The mods run before every handler (and before SecAgg+'s mod), in this order: a message may carry only the run
# config's sha256, so it is restored first; then a deployed site's policy refuses what it does not serve and gives
# the handlers the site's own model path and cache (client/site_policy.py).
app = ClientApp(mods=[run_config_from_context, site_policy_mod])

# The method handlers, by action; registered below as "train.<action>" / "evaluate.<action>".
TRAIN_HANDLERS = {"scaffold": scaffold.train, "fedsa_lora": fedsa.train, "flora": flora.train,
                  "fedex_lora": fedex.train}
EVALUATE_HANDLERS = {"fedsa_lora": fedsa.evaluate, "flora": flora.evaluate, "fedex_lora": fedex.evaluate}


def run_strategy_action(msg: Message, category: str) -> str | None:
    """The action the run config's strategy needs for a bare ``train`` / ``evaluate`` message (None: the default).

    fedtune's coordinator names the action in the message type; a coordinator that sends bare types (fedtune
    before the message-type routing, hand-built messages) still reaches the right handler this way.
    """
    if RUN_CONFIG_KEY not in msg.content.config_records.get("config", {}):
        return None
    spec = strategy_spec(json.loads(str(msg.content["config"][RUN_CONFIG_KEY]))["strategy"]["name"])
    return spec.client_train_action if category == TRAIN else spec.client_evaluate_action


@app.train(mods=[secaggplus_when_requested])
def train(msg: Message, context: Context) -> Message:
    """Train on local data from the global adapter; reply with the LoRA delta (SecAgg+: mask the raw delta)."""
    if LEGACY_FIT_PARAMETERS in msg.content.array_records:  # a SecAgg+ stage, in Flower's legacy FitIns layout
        return secagg_fit(msg, context)
    if action := run_strategy_action(msg, TRAIN):
        return TRAIN_HANDLERS[action](msg, context)
    return task.train_reply(task.for_this_site(msg, context, site_steps=False), context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this site's held-out data."""
    if action := run_strategy_action(msg, EVALUATE):
        return EVALUATE_HANDLERS[action](msg, context)
    return task.evaluate_reply(task.for_this_site(msg, context, site_steps=False), context)


def virtual_clients(msg: Message, context: Context) -> Message:
    """A simulation worker node's group of virtual clients: each member answered as its own site would be, the
    batchable train messages trained together (client/multi_adapter.py); one reply carrying all the answers."""
    members = unpack_group(msg, context)
    contexts = [member_context for _, member_context in members]
    replies = answer_together(app, [member for member, _ in members], contexts)
    return Message(pack_replies(replies, contexts), reply_to=msg)


for _category in (TRAIN, EVALUATE, QUERY):
    getattr(app, _category)(GROUP_ACTION)(virtual_clients)
for _action, _handler in TRAIN_HANDLERS.items():
    app.train(_action)(_handler)
for _action, _handler in EVALUATE_HANDLERS.items():
    app.evaluate(_action)(_handler)
app.query()(flora.site_profile)
