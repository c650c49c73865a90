"""The coordinator's strategies that need more than a plain aggregator, one file each; ``build_lora_method_strategy``.

Plain strategies (fedavg, fedprox, server optimizers, robust methods, ffa_lora) are server/strategy.py's
LoraDeltaStrategy with an aggregator from strategies/aggregators.py; what each strategy supports is declared in
strategies/registry.py.
"""

from __future__ import annotations

from typing import Any

from federation.config import FEDEX_STRATEGY, HETERO_STRATEGIES, LORA_METHOD_STRATEGIES, SITE_PARAMS
from server.strategies.fedex_lora import build_fedex_strategy
from server.strategies.fedsa_lora import FedSALoraStrategy
from server.strategies.flora import build_hetero_strategy
from server.strategies.scaffold import ScaffoldAggregator, ScaffoldStrategy, _strategy_kwargs
from server.strategy import LoraDeltaStrategy
from strategies.aggregators import build_aggregator


def build_lora_method_strategy(cfg: Any) -> LoraDeltaStrategy:
    """The strategy for cfg.strategy.name in LORA_METHOD_STRATEGIES (flora, flexlora, fedex_lora, scaffold, fedsa_lora).

    cfg was validated when it was composed (federation.validation: privacy combinations, params, ranks).
    """
    s = cfg.strategy
    if s.name not in LORA_METHOD_STRATEGIES:
        raise ValueError(f"{s.name!r} is not one of {list(LORA_METHOD_STRATEGIES)}")
    if s.name in HETERO_STRATEGIES:
        return build_hetero_strategy(cfg)
    if s.name == FEDEX_STRATEGY:
        return build_fedex_strategy(cfg)
    inner_name = s.aggregator if s.aggregator and s.aggregator != s.name else "fedavg"
    inner = build_aggregator(inner_name, {k: v for k, v in (s.params or {}).items() if k not in SITE_PARAMS})
    if s.name == "scaffold":
        return ScaffoldStrategy(ScaffoldAggregator(inner), num_sites_total=cfg.federation.num_clients,
                                min_completed_clients=cfg.federation.min_completed_clients, **_strategy_kwargs(cfg))
    return FedSALoraStrategy(inner, **_strategy_kwargs(cfg))
