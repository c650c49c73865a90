"""Server optimizers applied to the aggregated adapter delta (Reddi et al. 2021, Hsu et al. 2019).

FedAdam / FedYogi / FedAdagrad come in two variants (``variant``):

- ``"flower"`` (default): Flower 1.41's ``flwr.serverapp.strategy`` formulas: v starts at 0, and FedAdam's step
  size is bias-corrected, eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) in server step t (Flower's exponent; FedYogi /
  FedAdagrad: none);
- ``"paper"``: Reddi et al. 2021, Algorithm 2: v_{-1} = tau^2 and no bias correction (step size eta).

Both then take x + step_size * m_t / (sqrt(v_t) + tau). The math is written against an explicit
``mean_delta`` (the weighted mean of local-minus-global deltas, which equals Flower's ``aggregated - current``)
so the math is usable without a Flower Strategy object. The moments are kept in float64; the returned adapter keeps the global adapter's dtypes.

``state_dict()`` is flat: ``"step"`` (int) plus one float64 array per adapter key under
``"momentum/<key>"``, ``"m/<key>"`` or ``"v/<key>"``; it round-trips through ``np.savez``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.fedavg import AdapterArrays

StateDict = dict[str, np.ndarray | float | int]
VARIANTS = ("flower", "paper")


def _as_float64(arrays: Mapping[str, np.ndarray]) -> AdapterArrays:
    return {key: np.asarray(value, dtype=np.float64) for key, value in arrays.items()}


def _check_keys(global_adapter: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> None:
    if set(global_adapter) != set(mean_delta):
        missing = sorted(set(global_adapter) - set(mean_delta))
        extra = sorted(set(mean_delta) - set(global_adapter))
        raise ValueError(f"delta keys differ from the global adapter's: missing {missing[:3]}, extra {extra[:3]}")
    for key, value in global_adapter.items():
        if np.shape(mean_delta[key]) != np.shape(value):
            raise ValueError(f"delta shape {np.shape(mean_delta[key])} != global shape {np.shape(value)} for {key}")


def _in_dtypes_of(global_adapter: Mapping[str, np.ndarray], new_values: Mapping[str, np.ndarray]) -> AdapterArrays:
    return {key: np.asarray(new_values[key]).astype(np.asarray(value).dtype) for key, value in global_adapter.items()}


def _flatten(prefix: str, arrays: Mapping[str, np.ndarray] | None) -> StateDict:
    return {} if arrays is None else {f"{prefix}/{key}": np.array(value, copy=True) for key, value in arrays.items()}


def _unflatten(prefix: str, state: Mapping[str, object]) -> AdapterArrays | None:
    start = prefix + "/"
    found = {key[len(start) :]: np.array(value, dtype=np.float64) for key, value in state.items() if key.startswith(start)}
    return found or None


class FedAvgM:
    """Server SGD with heavy-ball momentum on the pseudo-gradient -mean_delta (torch.optim.SGD convention)."""

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.0) -> None:
        self.server_lr = server_lr
        self.momentum = momentum
        self.momentum_vector: AdapterArrays | None = None
        self.step_count = 0

    def step(self, global_adapter: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> AdapterArrays:
        """new = global - server_lr * buf, buf = momentum * buf + (global - aggregated); buf starts as the first pseudo-gradient."""
        _check_keys(global_adapter, mean_delta)
        current = _as_float64(global_adapter)
        # Updates are the opposite of gradients.
        pseudo_gradient = {key: -value for key, value in _as_float64(mean_delta).items()}
        if self.momentum > 0.0:
            if self.momentum_vector is None:
                self.momentum_vector = pseudo_gradient
            else:
                self.momentum_vector = {
                    key: self.momentum * self.momentum_vector[key] + pseudo_gradient[key] for key in pseudo_gradient
                }
            pseudo_gradient = self.momentum_vector
        self.step_count += 1
        return _in_dtypes_of(global_adapter, {key: current[key] - self.server_lr * pseudo_gradient[key] for key in current})

    def state_dict(self) -> StateDict:
        """Flat, checkpointable state: step and the momentum buffer (absent before the first momentum step)."""
        return {"step": self.step_count, **_flatten("momentum", self.momentum_vector)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore what state_dict() returned (also after np.savez/np.load)."""
        self.step_count = int(np.asarray(state["step"]))
        self.momentum_vector = _unflatten("momentum", state)


class _FedOpt:
    """Shared m_t (first moment) and v_t (second moment) bookkeeping of FedAdam/FedYogi/FedAdagrad."""

    def __init__(self, eta: float, beta_1: float, beta_2: float, tau: float, variant: str = "flower") -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        self.variant = variant
        self.eta = eta
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.tau = tau
        self.m_t: AdapterArrays | None = None
        self.v_t: AdapterArrays | None = None
        self.step_count = 0

    def _update_v(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _step_size(self) -> float:
        return self.eta

    def step(self, global_adapter: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> AdapterArrays:
        """new = global + step_size * m_t / (sqrt(v_t) + tau), elementwise."""
        _check_keys(global_adapter, mean_delta)
        current = _as_float64(global_adapter)
        delta = _as_float64(mean_delta)
        if self.m_t is None:
            self.m_t = {key: np.zeros_like(value) for key, value in delta.items()}
        if self.v_t is None:  # Flower: v_0 = 0; Reddi et al. (Algorithm 2): v_{-1} = tau^2
            v_start = 0.0 if self.variant == "flower" else self.tau**2
            self.v_t = {key: np.full_like(value, v_start) for key, value in delta.items()}
        self.m_t = {key: self.beta_1 * self.m_t[key] + (1.0 - self.beta_1) * delta[key] for key in delta}
        self.v_t = {key: self._update_v(self.v_t[key], delta[key]) for key in delta}
        self.step_count += 1
        step_size = self._step_size() if self.variant == "flower" else self.eta
        new = {key: current[key] + step_size * self.m_t[key] / (np.sqrt(self.v_t[key]) + self.tau) for key in current}
        return _in_dtypes_of(global_adapter, new)

    def state_dict(self) -> StateDict:
        """Flat, checkpointable state: step, m_t and v_t (moments absent before the first step)."""
        return {"step": self.step_count, **_flatten("m", self.m_t), **_flatten("v", self.v_t)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore what state_dict() returned (also after np.savez/np.load)."""
        self.step_count = int(np.asarray(state["step"]))
        self.m_t = _unflatten("m", state)
        self.v_t = _unflatten("v", state)


class FedAdam(_FedOpt):
    """FedAdam: v_t = b2 v + (1-b2) d^2; variant "flower" bias-corrects the step size, "paper" does not."""

    def __init__(self, eta: float = 1e-1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
                 variant: str = "flower") -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, variant=variant)

    def _update_v(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta**2

    def _step_size(self) -> float:
        # Flower computes eta * sqrt(1 - b2^(r+1)) / (1 - b1^(r+1)) with the 1-based server round r;
        # step_count is that r when one step is taken per round. Kept identical to Flower on purpose.
        exponent = self.step_count + 1.0
        return self.eta * np.sqrt(1.0 - self.beta_2**exponent) / (1.0 - self.beta_1**exponent)


class FedYogi(_FedOpt):
    """FedYogi: v_t = v - (1-b2) d^2 sign(v - d^2); no bias correction (as in Flower)."""

    def __init__(self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
                 variant: str = "flower") -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, variant=variant)

    def _update_v(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta_2) * delta**2 * np.sign(v - delta**2)


class FedAdagrad(_FedOpt):
    """FedAdagrad: m_t = d (beta_1 = 0), v_t = v + d^2."""

    def __init__(self, eta: float = 1e-1, tau: float = 1e-3, variant: str = "flower") -> None:
        super().__init__(eta=eta, beta_1=0.0, beta_2=0.0, tau=tau, variant=variant)

    def _update_v(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + delta**2
