"""server/methods: every registry entry names a coordinator builder there, and build_coordinator uses it."""

import pytest

from server.methods import build_coordinator, coordinator_builder
from server.strategy import LoraDeltaStrategy
from strategies.registry import STRATEGIES


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_entry_names_a_builder_in_server_methods(name):
    builder = coordinator_builder(name)
    assert callable(builder) and builder.__module__.startswith("server.methods.")


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "median", "scaffold", "fedsa_lora", "flora", "flexlora",
                                  "fedex_lora"])
def test_the_built_coordinator_is_the_one_the_entry_names(make_cfg, monkeypatch, name):
    cfg = make_cfg(f"strategy={name}")
    spec = STRATEGIES[name]
    built = build_coordinator(cfg)
    assert isinstance(built, LoraDeltaStrategy)
    assert (built.client_train_action, built.client_evaluate_action) == (spec.client_train_action,
                                                                         spec.client_evaluate_action)
    module, _, function = spec.coordinator.partition(":")
    calls = []
    monkeypatch.setattr(__import__(module, fromlist=[function]), function, lambda cfg: calls.append(cfg) or built)
    assert build_coordinator(cfg) is built and calls == [cfg]
