"""Every strategy a run can name (``strategy=<name>``) and what it supports: the one registry both sides read.

The coordinator builds a strategy's Flower object from its entry (server/app.py), the config checks read the
capability flags (federation/validation.py), and a site routes a message to the handler named by the entry's
client action (client/app.py). Adding a strategy: one entry here, its coordinator class (server/), its site
handler if it needs one (client/, registered in client/app.py), and its YAML (conf/strategy/<name>.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy needs from the sites and which run settings it can serve."""

    name: str
    # The site's ClientApp handler (message type "train.<action>" / "evaluate.<action>"); None: the default one.
    client_train_action: str | None = None
    client_evaluate_action: str | None = None
    mixed_ranks: bool = False  # sites may train different LoRA ranks
    secagg: bool = True  # aggregates only the sum of the deltas, so SecAgg+ can hide the individual ones
    central_dp: bool = True  # the coordinator can clip and noise each site's delta (site-level DP-FedAvg)
    dp_sgd: bool = True  # sites may train with Opacus DP-SGD
    batched_training: bool = True  # the simulation may train a round's virtual clients together (multi-adapter)


def _plain(name: str) -> StrategySpec:
    return StrategySpec(name)


def _lora_method(name: str, action: str, evaluate_action: str | None, **flags) -> StrategySpec:
    # Per-site records (frozen factors, delta_c, B-free uploads) that a secure sum or DP noise would hide or
    # not cover, and per-site state that batched training does not keep.
    return StrategySpec(name, action, evaluate_action, secagg=False, central_dp=False, batched_training=False,
                        **flags)


STRATEGIES: dict[str, StrategySpec] = {spec.name: spec for spec in [
    *(_plain(name) for name in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "ffa_lora",
                                "median", "trimmed_mean", "multi_krum", "norm_bound")),
    # the gradient correction runs before every optimizer step, which Opacus's DP-SGD step skips
    _lora_method("scaffold", "scaffold", None, dp_sgd=False),
    _lora_method("fedsa_lora", "fedsa_lora", "fedsa_lora"),
    _lora_method("flora", "flora", "flora", mixed_ranks=True),
    _lora_method("flexlora", "flora", "flora", mixed_ranks=True),
    _lora_method("fedex_lora", "fedex_lora", "fedex_lora"),
]}


def strategy_spec(name: str) -> StrategySpec:
    """The registry entry of `name` (ValueError listing the valid names otherwise)."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r} unknown; valid: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]
