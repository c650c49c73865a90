"""The plain strategies (fedavg, fedprox, server optimizers, robust methods, ffa_lora): one coordinator, their math
differs only in the aggregator (strategies/aggregators.py), so they share this file rather than eleven copies of it.

Adding a plain strategy: its aggregator class (``AGGREGATORS``) with its params dataclass (strategies/params.py), a
registry entry (strategies/registry.py, ``_plain``) and its YAML; nothing here changes.
"""

from __future__ import annotations

from federation.config import RunConfig, sites_per_round
from server.privacy import CentralDP
from server.strategy import LoraDeltaStrategy, aggregator_params, sampling_kwargs
from strategies.aggregators import build_aggregator
from strategies.registry import aggregator_of


def build(cfg: RunConfig) -> LoraDeltaStrategy:
    """LoraDeltaStrategy with the strategy's aggregator (+ central DP when cfg.privacy.central.enabled)."""
    central_dp = None
    if cfg.privacy.central.enabled:
        central_dp = CentralDP(cfg.privacy.central, cfg.federation.num_clients, sites_per_round(cfg),
                               cfg.federation.rounds)
    aggregator = aggregator_of(cfg.strategy.name, cfg.strategy.aggregator)
    return LoraDeltaStrategy(build_aggregator(aggregator, aggregator_params(cfg.strategy)), central_dp=central_dp,
                             **sampling_kwargs(cfg))
