"""The coordinator names the site handler in the message type (train.<action>), as the strategy registry says."""

import pytest
from flwr.app import MessageType

import server.app
from client.app import app as client_app
from strategies.registry import STRATEGIES, strategy_spec
from tests.server.test_hetero import RecordingGrid


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_gets_its_registry_actions(make_cfg, name):
    overrides = ["strategy.freeze_lora_a=true"] if name == "ffa_lora" else []
    strategy = server.app.build_strategy(make_cfg(f"strategy={name}", *overrides))
    spec = strategy_spec(name)
    assert (strategy.client_train_action, strategy.client_evaluate_action) == (spec.client_train_action,
                                                                                spec.client_evaluate_action)


@pytest.mark.parametrize("name, train_type, evaluate_type", [
    ("fedavg", "train", "evaluate"),
    ("scaffold", "train.scaffold", "evaluate"),
    ("fedsa_lora", "train.fedsa_lora", "evaluate.fedsa_lora"),
])
def test_sent_message_types(make_cfg, name, train_type, evaluate_type):
    cfg = make_cfg(f"strategy={name}", "federation.num_clients=2", "federation.rounds=1")
    grid = RecordingGrid(client_app, 2)
    rows = server.app.run_federation(grid, cfg)
    assert rows[-1]["clients_ok"] == 2
    sent = {m.metadata.message_type for m, _ in grid.exchanges}
    assert sent == {"query", train_type, evaluate_type}  # query: the site-rank check before round 1
    assert all(t.split(".")[0] in (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY) for t in sent)


def test_every_registry_action_has_a_site_handler():
    from client.app import EVALUATE_HANDLERS, TRAIN_HANDLERS

    assert {s.client_train_action for s in STRATEGIES.values()} - {None} == set(TRAIN_HANDLERS)
    assert {s.client_evaluate_action for s in STRATEGIES.values()} - {None} == set(EVALUATE_HANDLERS)
