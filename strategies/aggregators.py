"""One interface for every per-round aggregation rule the server can pick by name.

The server calls ``aggregate(global_adapter, updates, weights, site_ids)`` once per round with the
sites' DELTAS (local minus global) and gets the NEW global adapter back, in the global adapter's
dtypes. ``state_dict()`` / ``load_state_dict()`` carry whatever must survive a restart (server
optimizer moments); the dict is flat with numpy-array or python-scalar values (np.savez-able).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from strategies.fedavg import AdapterArrays, UpdateRejected, apply_delta, validate_update, weighted_mean
from strategies.lora_exact import LORA_A_SUFFIX, fedex_residual, ffa_lora, lora_ranks
from strategies.robust import coordinate_median, coordinate_trimmed_mean, krum, norm_bound
from strategies.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi


@runtime_checkable
class AdapterAggregator(Protocol):
    """What the server needs from an aggregation rule."""

    name: str
    supports_mixed_ranks: bool

    def aggregate(
        self,
        global_adapter: Mapping[str, np.ndarray],
        updates: Sequence[Mapping[str, np.ndarray]],
        weights: Sequence[float],
        site_ids: Sequence[str],
    ) -> AdapterArrays: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class MixedRanksError(ValueError):
    """Sites sent LoRA factors of different ranks to an aggregator that needs one rank per layer."""


def check_uniform_ranks(
    updates: Sequence[Mapping[str, np.ndarray]],
    site_ids: Sequence[str] | None = None,
    aggregator_name: str = "this aggregator",
) -> None:
    """Raise MixedRanksError naming the layer, sites and ranks if any LoRA layer's rank differs across sites."""
    names = list(site_ids) if site_ids is not None else [f"#{i}" for i in range(len(updates))]
    ranks_by_layer: dict[str, dict[str, int]] = {}
    for site, update in zip(names, updates):
        for prefix, rank in lora_ranks(update).items():
            ranks_by_layer.setdefault(prefix, {})[site] = rank
    for prefix, by_site in ranks_by_layer.items():
        if len(set(by_site.values())) > 1:
            listing = ", ".join(f"site {site!r} r={rank}" for site, rank in by_site.items())
            raise MixedRanksError(
                f"mixed LoRA ranks for layer {prefix}: {listing}; aggregator {aggregator_name!r} needs the same "
                "rank at every site (strategies.lora_exact.stack_lora_updates / flexlora_aggregate handle mixed ranks)"
            )


def _checked(
    aggregator: AdapterAggregator,
    global_adapter: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    site_ids: Sequence[str],
) -> None:
    if not updates:
        raise ValueError("nothing to aggregate")
    if not len(updates) == len(weights) == len(site_ids):
        raise ValueError(f"got {len(updates)} updates, {len(weights)} weights and {len(site_ids)} site ids")
    if not aggregator.supports_mixed_ranks:
        check_uniform_ranks(updates, site_ids, aggregator.name)
    for site, update in zip(site_ids, updates):
        try:
            validate_update(update, global_adapter)
        except UpdateRejected as error:
            raise UpdateRejected(f"site {site!r}: {error}") from error


def _local_adapters(
    global_adapter: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]]
) -> list[AdapterArrays]:
    # LoRA-exact methods need each site's full factors, not its delta: local = global + delta.
    return [
        {key: np.asarray(value, dtype=np.float64) + np.asarray(update[key], dtype=np.float64)
         for key, value in global_adapter.items()}
        for update in updates
    ]


def _in_dtypes_of(global_adapter: Mapping[str, np.ndarray], new_values: Mapping[str, np.ndarray]) -> AdapterArrays:
    return {key: np.asarray(new_values[key]).astype(np.asarray(value).dtype) for key, value in global_adapter.items()}


class FedAvgAggregator:
    """global + weighted mean of the deltas (FedAvg)."""

    name = "fedavg"
    supports_mixed_ranks = False
    needs_only_the_sum = True  # a weighted mean: SecAgg+ can hide the individual deltas

    def aggregate(self, global_adapter, updates, weights, site_ids) -> AdapterArrays:
        """New global adapter = global + sum_i w_i delta_i / sum_i w_i."""
        _checked(self, global_adapter, updates, weights, site_ids)
        return self.aggregate_mean(global_adapter, weighted_mean(updates, weights))

    def aggregate_mean(self, global_adapter, mean_delta) -> AdapterArrays:
        """New global adapter from the sites' weighted mean delta (computed by the caller, e.g. streaming)."""
        return apply_delta(global_adapter, mean_delta)

    def state_dict(self) -> dict[str, Any]:
        """Stateless: {}."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless: nothing to restore."""


class _ServerOptAggregator:
    """Weighted mean of the deltas, then a server optimizer step (state = the optimizer's)."""

    name = ""
    supports_mixed_ranks = False
    needs_only_the_sum = True  # a step on the weighted mean

    def __init__(self, optimizer: FedAvgM | FedAdam | FedYogi | FedAdagrad) -> None:
        self.optimizer = optimizer

    def aggregate(self, global_adapter, updates, weights, site_ids) -> AdapterArrays:
        """New global adapter = optimizer.step(global, weighted mean of deltas)."""
        _checked(self, global_adapter, updates, weights, site_ids)
        return self.aggregate_mean(global_adapter, weighted_mean(updates, weights))

    def aggregate_mean(self, global_adapter, mean_delta) -> AdapterArrays:
        """New global adapter = optimizer.step(global, the sites' weighted mean delta computed by the caller)."""
        return self.optimizer.step(global_adapter, mean_delta)

    def state_dict(self) -> dict[str, Any]:
        """The server optimizer's flat state (step, moments)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the server optimizer's state."""
        self.optimizer.load_state_dict(state)


class FedAvgMAggregator(_ServerOptAggregator):
    """FedAvg with server learning rate and momentum (Hsu et al. 2019)."""

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.0) -> None:
        super().__init__(FedAvgM(server_lr=server_lr, momentum=momentum))


class FedAdamAggregator(_ServerOptAggregator):
    """FedAdam (Reddi et al. 2021); defaults as Flower's."""

    name = "fedadam"

    def __init__(self, eta: float = 1e-1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
                 variant: str = "flower") -> None:
        super().__init__(FedAdam(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, variant=variant))


class FedYogiAggregator(_ServerOptAggregator):
    """FedYogi (Reddi et al. 2021); defaults as Flower's."""

    name = "fedyogi"

    def __init__(self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
                 variant: str = "flower") -> None:
        super().__init__(FedYogi(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, variant=variant))


class FedAdagradAggregator(_ServerOptAggregator):
    """FedAdagrad (Reddi et al. 2021); defaults as Flower's."""

    name = "fedadagrad"

    def __init__(self, eta: float = 1e-1, tau: float = 1e-3, variant: str = "flower") -> None:
        super().__init__(FedAdagrad(eta=eta, tau=tau, variant=variant))


class FFALoRAAggregator:
    """FFA-LoRA: lora_A frozen and identical at every site, B averaged; exact. Rejects sites whose A moved."""

    needs_only_the_sum = True  # B is a weighted mean; each site's A is checked on its own upload

    name = "ffa_lora"
    supports_mixed_ranks = False

    def __init__(self, a_atol: float = 0.0) -> None:
        self.a_atol = a_atol

    def check_update(self, global_adapter, update) -> None:
        """Raise UpdateRejected if one site's lora_A moved by more than a_atol / 2 (then no two accepted sites
        differ by more than a_atol, and aggregate() cannot fail on the others' account)."""
        for a_key in [key for key in global_adapter if key.endswith(LORA_A_SUFFIX)]:
            moved = float(np.max(np.abs(np.asarray(update[a_key], dtype=np.float64)), initial=0.0))
            if moved > self.a_atol / 2:
                raise UpdateRejected(f"FFA-LoRA keeps lora_A frozen, but {a_key} moved by {moved:.3g} "
                                     f"(> a_atol/2 = {self.a_atol / 2:g})")

    def aggregate(self, global_adapter, updates, weights, site_ids) -> AdapterArrays:
        """New global = FFA-LoRA mean of the sites' adapters (global + delta_i); raises if the A factors differ."""
        _checked(self, global_adapter, updates, weights, site_ids)
        merged = ffa_lora(_local_adapters(global_adapter, updates), weights, a_atol=self.a_atol, site_ids=site_ids)
        return _in_dtypes_of(global_adapter, merged)

    def state_dict(self) -> dict[str, Any]:
        """Stateless: {}."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless: nothing to restore."""


class FedExLoRAAggregator:
    """FedEx-LoRA: factors averaged as FedAvg, plus the exact residual (out, in) per layer in `last_residual`.

    The caller must add ``last_residual[prefix]`` to the frozen base weight of layer ``prefix`` after
    every round; otherwise this is plain FedAvg. Residuals include `scaling` (peft lora_alpha / r).
    """

    name = "fedex_lora"
    supports_mixed_ranks = False
    needs_only_the_sum = False  # the residual needs every site's own factors

    def __init__(self, scaling: float = 1.0) -> None:
        self.scaling = scaling
        self.last_residual: dict[str, np.ndarray] | None = None

    def aggregate(self, global_adapter, updates, weights, site_ids) -> AdapterArrays:
        """New global = mean of the sites' factors; sets last_residual = scaling * (mean(B_i A_i) - mean(B) mean(A))."""
        _checked(self, global_adapter, updates, weights, site_ids)
        averaged, self.last_residual = fedex_residual(
            _local_adapters(global_adapter, updates), weights, scaling=self.scaling
        )
        return _in_dtypes_of(global_adapter, averaged)

    def state_dict(self) -> dict[str, Any]:
        """Stateless across rounds (the residual is consumed by the caller each round): {}."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless: nothing to restore."""


ROBUST_METHOD_PARAMS: dict[str, dict[str, Any]] = {
    # method -> its parameters and their defaults (None: required)
    "norm_bound": {"max_norm": None},
    "trimmed_mean": {"trim_fraction": 0.2},
    "median": {},
    "krum": {"num_malicious": None},
    "multi_krum": {"num_malicious": None, "multi_k": None},
}


class RobustAggregator:
    """Filter or transform the deltas with a robust method, then hand them to `inner`.

    Needs every site's own delta (needs_only_the_sum = False), so not under SecAgg+.

    norm_bound: clip every delta, inner aggregates the clipped deltas.
    krum / multi_krum: inner aggregates only the selected sites (with their weights).
    trimmed_mean / median: the robust statistic replaces the weighted mean; inner receives it as one
    pseudo-update of weight 1 (so a server optimizer still steps on it).
    """

    supports_mixed_ranks = False

    def __init__(self, inner: AdapterAggregator, method: str, params: Mapping[str, Any] | None = None) -> None:
        if method not in ROBUST_METHOD_PARAMS:
            raise ValueError(f"unknown robust method {method!r}; valid: {sorted(ROBUST_METHOD_PARAMS)}")
        accepted = ROBUST_METHOD_PARAMS[method]
        given = dict(params or {})
        unknown = sorted(set(given) - set(accepted))
        missing = sorted(key for key, default in accepted.items() if default is None and key not in given)
        if unknown or missing:
            raise ValueError(
                f"robust method {method!r} takes {sorted(accepted) or 'no params'}; "
                f"unknown {unknown}, missing {missing}"
            )
        if method in ("trimmed_mean", "median") and isinstance(inner, FedExLoRAAggregator):
            # FedEx's residual needs every site's own factors; one pseudo-update would make it silently zero.
            raise ValueError(f"robust method {method!r} cannot feed {inner.name!r}; use krum, multi_krum or norm_bound")
        self.inner = inner
        self.method = method
        self.params = {**{k: v for k, v in accepted.items() if v is not None}, **given}
        self.name = f"{method}+{inner.name}"
        self.last_selected_sites: list[str] = []

    @property
    def last_residual(self) -> dict[str, np.ndarray] | None:
        """The inner aggregator's FedEx residual, if it has one."""
        return getattr(self.inner, "last_residual", None)

    def check_update(self, global_adapter, update) -> None:
        """The inner aggregator's check of one site's update, if it has one (UpdateRejected)."""
        check = getattr(self.inner, "check_update", None)
        if check is not None:
            check(global_adapter, update)

    def aggregate(self, global_adapter, updates, weights, site_ids) -> AdapterArrays:
        """Apply the robust method, then the inner aggregator; last_selected_sites lists the sites that counted."""
        _checked(self, global_adapter, updates, weights, site_ids)
        updates, weights, site_ids = list(updates), list(weights), list(site_ids)
        self.last_selected_sites = list(site_ids)
        if self.method == "norm_bound":
            return self.inner.aggregate(global_adapter, norm_bound(updates, self.params["max_norm"]), weights, site_ids)
        if self.method in ("krum", "multi_krum"):
            multi_k = 1 if self.method == "krum" else int(self.params["multi_k"])
            selected, _ = krum(updates, int(self.params["num_malicious"]), multi_k=multi_k, weights=weights)
            self.last_selected_sites = [site_ids[i] for i in selected]
            return self.inner.aggregate(
                global_adapter, [updates[i] for i in selected], [weights[i] for i in selected], self.last_selected_sites
            )
        if self.method == "trimmed_mean":
            statistic = coordinate_trimmed_mean(updates, float(self.params["trim_fraction"]))
        else:
            statistic = coordinate_median(updates)
        return self.inner.aggregate(global_adapter, [statistic], [1.0], [f"{self.method}({','.join(site_ids)})"])

    def state_dict(self) -> dict[str, Any]:
        """The inner aggregator's state (robust methods keep none)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the inner aggregator's state."""
        self.inner.load_state_dict(state)


AGGREGATORS: dict[str, type] = {
    "fedavg": FedAvgAggregator,
    "fedavgm": FedAvgMAggregator,
    "fedadam": FedAdamAggregator,
    "fedyogi": FedYogiAggregator,
    "fedadagrad": FedAdagradAggregator,
    "ffa_lora": FFALoRAAggregator,
    "fedex_lora": FedExLoRAAggregator,
}


def sum_only_aggregator_names() -> list[str]:
    """Aggregators that need only the weighted sum of the deltas (what SecAgg+ reveals), in registry order."""
    return [name for name, cls in AGGREGATORS.items() if getattr(cls, "needs_only_the_sum", False)]


def valid_aggregator_names() -> list[str]:
    """Every name build_aggregator accepts."""
    return sorted(AGGREGATORS) + sorted(ROBUST_METHOD_PARAMS)


def build_aggregator(name: str, params: Mapping[str, Any] | None = None) -> AdapterAggregator:
    """Aggregator by name; a robust method name wraps `params["inner"]` (default "fedavg") built from `params["inner_params"]`."""
    params = dict(params or {})
    if name in ROBUST_METHOD_PARAMS:
        inner = build_aggregator(str(params.pop("inner", "fedavg")), params.pop("inner_params", None))
        return RobustAggregator(inner, name, params)
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; valid names: {valid_aggregator_names()}")
    cls = AGGREGATORS[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"aggregator {name!r} takes {accepted or 'no params'}; unknown {unknown}")
    return cls(**params)
