"""SCAFFOLD control variates (Karimireddy et al. 2020), option II, on adapter dicts.

Control variates have the adapter's keys and shapes; as ``dict[str, np.ndarray]`` (float64) they
are checkpointable as they are (np.savez / safetensors). The server keeps c_global, each site its c_local.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from strategies.fedavg import AdapterArrays


def zero_control(adapter: Mapping[str, np.ndarray]) -> AdapterArrays:
    """Initial control variate: zeros with the adapter's keys and shapes (float64)."""
    return {key: np.zeros(np.shape(value), dtype=np.float64) for key, value in adapter.items()}


def client_control_update(
    c_local: Mapping[str, np.ndarray],
    c_global: Mapping[str, np.ndarray],
    global_adapter: Mapping[str, np.ndarray],
    local_adapter: Mapping[str, np.ndarray],
    local_steps: int,
    lr: float,
) -> tuple[AdapterArrays, AdapterArrays]:
    """Option II: c_i+ = c_i - c + (x - y_i) / (K * lr); returns (c_i+, delta_c = c_i+ - c_i)."""
    if local_steps < 1 or lr <= 0:
        raise ValueError(f"need local_steps >= 1 and lr > 0, got {local_steps} and {lr}")
    new_c_local: AdapterArrays = {}
    delta_c: AdapterArrays = {}
    for key, c_i in c_local.items():
        c_i = np.asarray(c_i, dtype=np.float64)
        drift = np.asarray(global_adapter[key], dtype=np.float64) - np.asarray(local_adapter[key], dtype=np.float64)
        new_c_local[key] = c_i - np.asarray(c_global[key], dtype=np.float64) + drift / (local_steps * lr)
        delta_c[key] = new_c_local[key] - c_i
    return new_c_local, delta_c


def server_control_update(
    c_global: Mapping[str, np.ndarray], delta_cs: Sequence[Mapping[str, np.ndarray]], num_sites_total: int
) -> AdapterArrays:
    """c <- c + (1 / N) * sum over this round's sites of delta_c_i, N = all sites (sampled or not)."""
    if num_sites_total < len(delta_cs) or num_sites_total < 1:
        raise ValueError(f"num_sites_total={num_sites_total} must be >= the {len(delta_cs)} sites that reported")
    new_c = {key: np.array(value, dtype=np.float64) for key, value in c_global.items()}
    for delta_c in delta_cs:
        for key in new_c:
            new_c[key] += np.asarray(delta_c[key], dtype=np.float64) / num_sites_total
    return new_c


def correct_gradient(grad, c_local, c_global):
    """grad - c_local + c_global, elementwise; a torch grad keeps its dtype/device, numpy controls are converted."""
    if isinstance(grad, np.ndarray) or np.isscalar(grad):
        return np.asarray(grad) - np.asarray(c_local) + np.asarray(c_global)
    # A torch tensor, duck-typed (this module imports no torch): the controls in the gradient's dtype and device.
    return grad - _like(c_local, grad) + _like(c_global, grad)


def _like(value, grad):
    if hasattr(value, "to"):
        return value.to(dtype=grad.dtype, device=grad.device)
    return grad.new_tensor(np.asarray(value))
