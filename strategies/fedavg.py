"""FedAvg over LoRA deltas, and the checks an update must pass before it is aggregated.

Adapter state everywhere in strategies/ is ``dict[str, np.ndarray]`` keyed by PEFT parameter
names (``...q_proj.lora_A.weight`` is (r, in), ``...lora_B.weight`` is (out, r)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

AdapterArrays = dict[str, np.ndarray]


class UpdateRejected(ValueError):
    """An update that must never be aggregated; the message says why."""


def validate_update(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Raise UpdateRejected unless `update` has exactly `reference`'s keys, shapes and finite values."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateRejected(
            f"wrong keys: {len(missing)} missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}"
        )
    for key, ref in reference.items():
        value = np.asarray(update[key])
        if value.shape != ref.shape:
            raise UpdateRejected(f"wrong shape for {key}: got {value.shape}, expected {ref.shape}")
        if not np.issubdtype(value.dtype, np.floating):
            raise UpdateRejected(f"non-float dtype {value.dtype} for {key}")
        if not np.all(np.isfinite(value)):
            raise UpdateRejected(f"non-finite values (NaN/Inf) in {key}")


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> AdapterArrays:
    """Sum_i w_i * u_i / Sum_i w_i, key by key, accumulated in float64; shapes as in the inputs."""
    if not updates:
        raise ValueError("nothing to aggregate")
    if len(updates) != len(weights):
        raise ValueError("one weight per update")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    out: AdapterArrays = {}
    for key in updates[0]:
        acc = np.zeros(np.shape(updates[0][key]), dtype=np.float64)
        for wi, update in zip(w, updates):
            acc += wi * np.asarray(update[key], dtype=np.float64)
        out[key] = acc
    return out


def aggregate_lora_deltas(
    deltas: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int]
) -> AdapterArrays:
    """FedAvg: example-weighted mean of the sites' LoRA deltas (float64)."""
    return weighted_mean(deltas, [float(n) for n in num_examples])


def apply_delta(
    global_adapter: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], server_lr: float = 1.0
) -> AdapterArrays:
    """global + server_lr * delta, keeping the global adapter's dtypes."""
    return {
        key: (np.asarray(value, dtype=np.float64) + server_lr * np.asarray(delta[key], dtype=np.float64)).astype(
            np.asarray(value).dtype
        )
        for key, value in global_adapter.items()
    }
