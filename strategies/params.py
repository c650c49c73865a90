"""Typed ``strategy.params``: one dataclass per strategy's own settings and per aggregator, with help text.

A run's ``strategy.params`` (YAML / ``strategy.params.<key>=...``) is checked against the union of two schemas
(federation/validation.py): the strategy's own (``StrategySpec.params``: what its sites read, e.g. SCAFFOLD's
control variate) and its aggregator's (``AGGREGATOR_PARAMS``: what strategies/aggregators.py builds it with).
Hydra cannot type a field whose schema depends on another field's value (``strategy.name``), so the config tree
carries a plain mapping and this module is its schema. Keyword-only dataclasses (a required field may follow a default one); a field without a default is required; ``help`` says what it
does, ``choices`` (when given) are its valid values. The aggregators' constructor defaults are the same numbers
(tests/strategies/test_registry.py checks that they agree).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _param(default: Any = dataclasses.MISSING, help: str = "", choices: tuple[str, ...] = ()) -> Any:  # noqa: A002
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------------- a strategy's own (site-side) settings


@dataclass(kw_only=True)
class NoParams:
    """No settings of its own."""


@dataclass(kw_only=True)
class SiteStepsParams:
    """Sites may run different local step counts (simulation: per partition)."""

    site_local_steps: list[int] = _param([], "local steps per simulation partition (partition-id % len); "
                                             "empty: train.local_steps or the node config's local-steps")


@dataclass(kw_only=True)
class MixedRankParams(SiteStepsParams):
    """Sites may train different LoRA ranks (FLoRA, FlexLoRA)."""

    site_ranks: list[int] = _param([], "LoRA rank per simulation partition (partition-id % len); empty: lora.r "
                                       "or the node config's lora-r")


CONTROL_VARIATES = ("gradient", "displacement")


@dataclass(kw_only=True)
class ScaffoldParams(SiteStepsParams):
    """SCAFFOLD's site side (client/scaffold.py)."""

    control_variate: str = _param("gradient", "how a site computes c_i: gradient (mean local gradient, option II "
                                              "under plain SGD) or displacement (option II from the trained adapter)",
                                  CONTROL_VARIATES)


# ------------------------------------------------------------------------------ the aggregators' settings


@dataclass(kw_only=True)
class FedAvgMParams:
    """strategies.aggregators.FedAvgMAggregator."""

    server_lr: float = _param(1.0, "server learning rate on the averaged delta")
    momentum: float = _param(0.0, "server momentum in [0, 1)")


@dataclass(kw_only=True)
class FedAdamParams:
    """strategies.aggregators.FedAdamAggregator (defaults as Flower's)."""

    eta: float = _param(1e-1, "server learning rate")
    beta_1: float = _param(0.9, "first-moment decay")
    beta_2: float = _param(0.99, "second-moment decay")
    tau: float = _param(1e-3, "adaptivity (added to sqrt(v))")
    variant: str = _param("flower", "flower: Flower 1.41's formulas (v0 = 0, FedAdam bias-corrected); paper: Reddi "
                                    "et al.'s Algorithm 2 (v = tau^2 at the start, no bias correction)")


@dataclass(kw_only=True)
class FedYogiParams(FedAdamParams):
    """strategies.aggregators.FedYogiAggregator (defaults as Flower's)."""

    eta: float = _param(1e-2, "server learning rate")


@dataclass(kw_only=True)
class FedAdagradParams:
    """strategies.aggregators.FedAdagradAggregator (defaults as Flower's)."""

    eta: float = _param(1e-1, "server learning rate")
    tau: float = _param(1e-3, "adaptivity (added to sqrt(v))")
    variant: str = _param("flower", FedAdamParams.__dataclass_fields__["variant"].metadata["help"])


@dataclass(kw_only=True)
class FFALoRAParams:
    """strategies.aggregators.FFALoRAAggregator."""

    a_atol: float = _param(0.0, "how far the sites' lora_A may differ (a site whose A moved by more than half is "
                                "rejected)")


@dataclass(kw_only=True)
class FedExLoRAParams:
    """strategies.aggregators.FedExLoRAAggregator (as strategy=fedex_lora builds it, not from params)."""

    scaling: float = _param(1.0, "PEFT scaling alpha / r of the residual")


@dataclass(kw_only=True)
class RobustParams:
    """strategies.aggregators.RobustAggregator: a robust method in front of an inner aggregator."""

    inner: str = _param("fedavg", "the aggregator that receives the filtered deltas (or the robust statistic)")
    inner_params: dict[str, Any] = _param({}, "the inner aggregator's params")


@dataclass(kw_only=True)
class TrimmedMeanParams(RobustParams):
    """Coordinate-wise trimmed mean."""

    trim_fraction: float = _param(0.2, "share of largest and of smallest values dropped per coordinate, in [0, 0.5)")


@dataclass(kw_only=True)
class NormBoundParams(RobustParams):
    """Per-update L2 norm bound."""

    max_norm: float = _param(help="L2 bound every delta is clipped to")


@dataclass(kw_only=True)
class KrumParams(RobustParams):
    """Krum: the delta closest to its neighbours."""

    num_malicious: int = _param(help="faulty sites tolerated")


@dataclass(kw_only=True)
class MultiKrumParams(KrumParams):
    """Multi-Krum: the mean of the multi_k deltas closest to their neighbours."""

    multi_k: int = _param(help="deltas averaged (<= the sites sampled per round)")


# aggregator name (strategies.aggregators.build_aggregator) -> its params
AGGREGATOR_PARAMS: dict[str, type] = {
    "fedavg": NoParams, "fedavgm": FedAvgMParams, "fedadam": FedAdamParams, "fedyogi": FedYogiParams,
    "fedadagrad": FedAdagradParams, "ffa_lora": FFALoRAParams, "fedex_lora": FedExLoRAParams,
    "median": RobustParams, "trimmed_mean": TrimmedMeanParams, "norm_bound": NormBoundParams, "krum": KrumParams,
    "multi_krum": MultiKrumParams,
}


def param_fields(*schemas: type) -> dict[str, dataclasses.Field]:
    """{name: field} of the schemas' fields, in declaration order (a later schema's field wins on a clash)."""
    out: dict[str, dataclasses.Field] = {}
    for schema in schemas:
        out.update({f.name: f for f in dataclasses.fields(schema)})
    return out


def is_required(f: dataclasses.Field) -> bool:
    """True when the field has no default (the run must give it)."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
