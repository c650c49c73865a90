"""Every strategy a run can name (``strategy=<name>``) and what it supports: the one registry both sides read.

Each entry names its coordinator builder (``coordinator``, a ``module:function`` under server/methods/ that
server/methods/__init__.py:build_coordinator imports; named, not imported, because strategies/ is below
server/ and client/), its default aggregator and its typed params (strategies/params.py). The config checks read
the capability flags (federation/validation.py), and a site routes a message to the handler named by the entry's
client action (client/app.py). README's strategy table is generated from here:
``python -m strategies.registry --markdown`` (tests/strategies/test_registry.py keeps README equal to it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from strategies.aggregators import sum_only_aggregator_names
from typing import Any

from strategies.params import (AGGREGATOR_PARAMS, MixedRankParams, NoParams, ScaffoldParams, SiteStepsParams,
                               param_fields)

# A plain strategy: server/strategy.py's LoraDeltaStrategy with its aggregator from strategies/aggregators.py.
AGGREGATED = "server.methods.aggregated:build"


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy is (coordinator, aggregator, params), what it needs from the sites, which settings it serves."""

    name: str
    summary: str  # what the coordinator does, one line (README's table)
    coordinator: str = AGGREGATED  # "module:function" returning its server.strategy.LoraDeltaStrategy
    # The aggregator from strategies/aggregators.py that updates the adapter unless strategy.aggregator names
    # another; None: the coordinator aggregates by itself (strategy.aggregator must then be empty or the name).
    aggregator: str | None = None
    params: type = NoParams  # its own strategy.params (strategies/params.py); the aggregator's are added
    # The site's ClientApp handler (message type "train.<action>" / "evaluate.<action>"); None: the default one.
    client_train_action: str | None = None
    client_evaluate_action: str | None = None
    mixed_ranks: bool = False  # sites may train different LoRA ranks
    secagg: bool = True  # aggregates only the sum of the deltas, so SecAgg+ can hide the individual ones
    central_dp: bool = True  # the coordinator can clip and noise each site's delta (site-level DP-FedAvg)
    dp_sgd: bool = True  # sites may train with Opacus DP-SGD
    batched_training: bool = True  # the simulation may train a round's virtual clients together (multi-adapter)


def _plain(name: str, summary: str, aggregator: str | None = None) -> StrategySpec:
    return StrategySpec(name, summary, aggregator=aggregator or name)


def _lora_method(name: str, summary: str, coordinator: str, action: str, evaluate_action: str | None,
                 **fields) -> StrategySpec:
    # Per-site records (frozen factors, delta_c, B-free uploads) that a secure sum or DP noise would hide or
    # not cover, and per-site state that batched training does not keep.
    return StrategySpec(name, summary, coordinator, client_train_action=action, client_evaluate_action=evaluate_action,
                        secagg=False, central_dp=False, batched_training=False, **fields)


_SERVER_OPT = "server optimizer on the averaged delta (Reddi et al. 2021); moments checkpointed"
STRATEGIES: dict[str, StrategySpec] = {spec.name: spec for spec in [
    _plain("fedavg", "example-weighted mean of the sites' deltas"),
    _plain("fedprox", "FedAvg; sites add μ/2‖w − w_global‖² to their loss (`strategy.proximal_mu`)", "fedavg"),
    _plain("fedavgm", "FedAvg with server learning rate and momentum (Hsu et al. 2019)"),
    _plain("fedadam", f"FedAdam: {_SERVER_OPT}"),
    _plain("fedyogi", f"FedYogi: {_SERVER_OPT}"),
    _plain("fedadagrad", f"FedAdagrad: {_SERVER_OPT}"),
    _plain("ffa_lora", "A frozen at the shared seeded init, only B trained and averaged: mean(B_i)·A = mean(B_i·A) "
                       "exactly (`strategy.freeze_lora_a=true`)"),
    _plain("median", "coordinate-wise median of the deltas, then the inner aggregator (`strategy.params.inner`)"),
    _plain("trimmed_mean", "coordinate-wise trimmed mean (`trim_fraction`), then the inner aggregator"),
    _plain("multi_krum", "Multi-Krum: the inner aggregator over the `multi_k` most central deltas"),
    _plain("norm_bound", "every delta clipped to L2 norm `max_norm`, then the inner aggregator"),
    # the gradient correction runs before every optimizer step, which Opacus's DP-SGD step skips
    _lora_method("scaffold", "SCAFFOLD: the server's c travels with the adapter, each site's c_i stays in its node "
                             "state; `strategy.aggregator` (fedavg) updates the adapter",
                 "server.methods.scaffold:build", "scaffold", None, aggregator="fedavg", params=ScaffoldParams,
                 dp_sgd=False),
    _lora_method("fedsa_lora", "FedSA-LoRA: A shared and averaged by `strategy.aggregator` (fedavg), B kept at every "
                               "site (personalised)",
                 "server.methods.fedsa_lora:build", "fedsa_lora", "fedsa_lora", aggregator="fedavg",
                 params=SiteStepsParams),
    _lora_method("flora", "FLoRA stacking: the global update is the exact sum of the sites' weighted B_i·A_i, merged "
                          "at the sites as a frozen part; sites restart their LoRA every round",
                 "server.methods.flora:build", "flora", "flora", mixed_ranks=True, params=MixedRankParams),
    _lora_method("flexlora", "FlexLoRA: the exact mean update, truncated by SVD to each site's own rank",
                 "server.methods.flexlora:build", "flora", "flora", mixed_ranks=True, params=MixedRankParams),
    _lora_method("fedex_lora", "FedEx-LoRA: FedAvg of A and B plus the residual mean(B_i·A_i) − mean(B)·mean(A), "
                               "merged at the sites as a frozen part (the exact mean update)",
                 "server.methods.fedex_lora:build", "fedex_lora", "fedex_lora", params=SiteStepsParams),
]}


def strategy_spec(name: str) -> StrategySpec:
    """The registry entry of `name` (ValueError listing the valid names otherwise)."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r} unknown; valid: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def aggregator_of(name: str, chosen: str = "") -> str | None:
    """The aggregator strategy `name` runs: `chosen` (strategy.aggregator) when set to another name, else its default;
    None for a strategy that aggregates by itself (whatever `chosen` says: federation.validation refuses another)."""
    spec = strategy_spec(name)
    if spec.aggregator is None:
        return None
    return chosen if chosen and chosen != name else spec.aggregator


def params_schema(name: str, chosen_aggregator: str = "") -> dict[str, Any]:
    """{key: dataclasses.Field} a run of strategy `name` may give in strategy.params: its own and its aggregator's."""
    aggregator = aggregator_of(name, chosen_aggregator)
    return param_fields(strategy_spec(name).params, AGGREGATOR_PARAMS.get(aggregator or "", NoParams))


def strategy_params(strategy_cfg: Any) -> Any:
    """The strategy's own params (its spec's dataclass, defaults filled) from a validated cfg.strategy."""
    spec = strategy_spec(strategy_cfg.name)
    own = param_fields(spec.params)
    return spec.params(**{key: value for key, value in (strategy_cfg.params or {}).items() if key in own})


def supports_secagg(spec: StrategySpec) -> bool:
    """SecAgg+ can serve it: the flag, and a default aggregator that needs only the weighted sum (not a robust one)."""
    return spec.secagg and (spec.aggregator is None or spec.aggregator in sum_only_aggregator_names())


def markdown_table() -> str:
    """README's strategy table: one row per registry entry, its summary and capability flags."""
    def mark(flag: bool) -> str:
        return "✓" if flag else "—"

    rows = ["| `strategy=` | what the coordinator does | mixed ranks | SecAgg+ | central DP | DP-SGD | batched | "
            "site handler |", "|---|---|:-:|:-:|:-:|:-:|:-:|---|"]
    for spec in STRATEGIES.values():
        handler = f"`train.{spec.client_train_action}`" if spec.client_train_action else "default"
        rows.append(f"| `{spec.name}` | {spec.summary} | {mark(spec.mixed_ranks)} | {mark(supports_secagg(spec))} | "
                    f"{mark(spec.central_dp)} | {mark(spec.dp_sgd)} | {mark(spec.batched_training)} | {handler} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """`python -m strategies.registry --markdown`: print README's strategy table."""
    parser = argparse.ArgumentParser(prog="python -m strategies.registry", description=main.__doc__)
    parser.add_argument("--markdown", action="store_true", help="print the strategy table as Markdown")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table())
    else:
        for spec in STRATEGIES.values():
            print(f"{spec.name}: {spec.summary}")


if __name__ == "__main__":
    main()
