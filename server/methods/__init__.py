"""The coordinator of every strategy, one file each (the plain ones share ``aggregated.py``): ``build_coordinator``.

Which file builds a strategy is its registry entry's ``coordinator`` (strategies/registry.py); every coordinator is
a server.strategy.LoraDeltaStrategy, which holds the shared sampling, reply validation and bookkeeping.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from strategies.registry import strategy_spec


def coordinator_builder(name: str) -> Callable[[Any], Any]:
    """The function that builds strategy `name`'s coordinator from a RunConfig (its registry entry names it)."""
    module, _, function = strategy_spec(name).coordinator.partition(":")
    return getattr(importlib.import_module(module), function)


def build_coordinator(cfg: Any):
    """cfg.strategy's coordinator, with its registry entry's site handlers set (cfg validated when composed)."""
    spec = strategy_spec(cfg.strategy.name)
    strategy = coordinator_builder(spec.name)(cfg)
    strategy.client_train_action, strategy.client_evaluate_action = spec.client_train_action, spec.client_evaluate_action
    return strategy
