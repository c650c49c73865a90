"""Byzantine-robust aggregation of adapter updates (lists of ``dict[str, np.ndarray]`` deltas).

Where a method needs one vector per site, the adapter is flattened over its keys in sorted order.
Median and trimmed mean are unweighted, as in Flower's FedMedian / FedTrimmedAvg: weighting by
self-reported example counts would hand an attacker the lever the statistic is meant to remove.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from strategies.fedavg import AdapterArrays, weighted_mean


def _check_same_shapes(updates: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    if not updates:
        raise ValueError("nothing to aggregate")
    keys = sorted(updates[0])
    for index, update in enumerate(updates[1:], start=1):
        if sorted(update) != keys:
            raise ValueError(f"update {index} has different keys than update 0")
        for key in keys:
            if np.shape(update[key]) != np.shape(updates[0][key]):
                raise ValueError(
                    f"update {index} has shape {np.shape(update[key])} for {key}, "
                    f"update 0 has {np.shape(updates[0][key])}"
                )
    return keys


def flatten_adapter(adapter: Mapping[str, np.ndarray]) -> np.ndarray:
    """All values concatenated in sorted key order, float64, shape (total_params,)."""
    return np.concatenate([np.asarray(adapter[key], dtype=np.float64).ravel() for key in sorted(adapter)])


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm of the whole update (all keys as one vector)."""
    return float(np.linalg.norm(flatten_adapter(update)))


def norm_bound(updates: Sequence[Mapping[str, np.ndarray]], max_norm: float) -> list[AdapterArrays]:
    """Scale each update by min(1, max_norm / ||u||) so its global L2 norm is <= max_norm (float64 copies)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    bounded = []
    for update in updates:
        norm = update_norm(update)
        factor = 1.0 if norm <= max_norm else max_norm / norm
        bounded.append({key: factor * np.asarray(value, dtype=np.float64) for key, value in update.items()})
    return bounded


def coordinate_trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], trim_fraction: float) -> AdapterArrays:
    """Per coordinate, drop the int(trim_fraction * n) lowest and highest values and average the rest."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    keys = _check_same_shapes(updates)
    cut = int(trim_fraction * len(updates))
    out = {}
    for key in keys:
        stacked = np.sort(np.stack([np.asarray(u[key], dtype=np.float64) for u in updates]), axis=0)
        out[key] = stacked[cut : len(updates) - cut].mean(axis=0)
    return out


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> AdapterArrays:
    """Per-coordinate median over sites (mean of the two middle values for an even count)."""
    keys = _check_same_shapes(updates)
    return {key: np.median(np.stack([np.asarray(u[key], dtype=np.float64) for u in updates]), axis=0) for key in keys}


def krum_scores(updates: Sequence[Mapping[str, np.ndarray]], num_malicious: int) -> np.ndarray:
    """Krum score per site (n,): sum of squared distances to its n - f - 2 nearest other sites.

    As in Flower, at least one neighbour is used when n - f - 2 < 1; Krum's guarantee needs n >= 2f + 3.
    """
    _check_same_shapes(updates)
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
    vectors = np.stack([flatten_adapter(u) for u in updates])
    count = len(updates)
    # Pairwise loop rather than broadcasting: an (n, n, params) temporary would not fit for real adapters.
    squared = np.zeros((count, count))
    for i in range(count):
        for j in range(i + 1, count):
            squared[i, j] = squared[j, i] = float(np.sum((vectors[i] - vectors[j]) ** 2))
    num_closest = max(1, count - num_malicious - 2)
    scores = np.zeros(count)
    for i in range(count):
        others = np.delete(squared[i], i)
        scores[i] = np.sort(others)[:num_closest].sum()
    return scores


def krum(
    updates: Sequence[Mapping[str, np.ndarray]],
    num_malicious: int,
    multi_k: int = 1,
    weights: Sequence[float] | None = None,
) -> tuple[list[int], AdapterArrays]:
    """(Multi-)Krum (Blanchard et al. 2017): indices of the multi_k lowest-score sites (best first) and their mean.

    With multi_k=1 the mean is the selected update itself; `weights` (default equal) weight the mean.
    """
    if len(updates) < 2:
        raise ValueError(f"Krum needs at least 2 updates, got {len(updates)}")
    if not 1 <= multi_k <= len(updates):
        raise ValueError(f"multi_k must be in [1, {len(updates)}], got {multi_k}")
    scores = krum_scores(updates, num_malicious)
    # Stable sort: ties go to the lower site index, so the selection is deterministic.
    selected = [int(i) for i in np.argsort(scores, kind="stable")[:multi_k]]
    site_weights = [1.0] * len(updates) if weights is None else list(weights)
    if len(site_weights) != len(updates):
        raise ValueError("one weight per update")
    mean = weighted_mean([updates[i] for i in selected], [site_weights[i] for i in selected])
    return selected, mean
