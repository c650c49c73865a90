"""LoRA-aware aggregation: methods whose merged update is the exact mean of the sites' B @ A.

Averaging the factors separately is not averaging the updates: mean(B_i) @ mean(A_i) differs from
mean(B_i @ A_i) as soon as the sites' A (or B) differ. Each method here removes that error a different way.

Conventions (as in HF peft):
- A LoRA layer is named by its prefix; its keys are ``f"{prefix}.lora_A.weight"`` of shape (r, in)
  and ``f"{prefix}.lora_B.weight"`` of shape (out, r).
- The dense update a layer adds to its base weight W0 (out, in) is ``scaling * B @ A`` with
  peft's ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). Functions that produce
  or consume dense updates take ``scaling`` as a parameter; 1.0 means "B @ A as is".
- Keys that are not LoRA factors (e.g. ``modules_to_save`` copies, trained biases) enter the
  products linearly, so every method here takes their plain weighted mean.
- ``weights`` are normalized to sum to 1 (example counts can be passed as they are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from strategies.fedavg import AdapterArrays, weighted_mean

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


def lora_pairs(adapter: Mapping[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """{prefix: (A key, B key)} for every LoRA layer; raises ValueError on an A without B or vice versa."""
    a_prefixes = {key[: -len(LORA_A_SUFFIX)] for key in adapter if key.endswith(LORA_A_SUFFIX)}
    b_prefixes = {key[: -len(LORA_B_SUFFIX)] for key in adapter if key.endswith(LORA_B_SUFFIX)}
    unpaired = sorted(a_prefixes ^ b_prefixes)
    if unpaired:
        details = [
            f"{prefix} has only {'lora_A' if prefix in a_prefixes else 'lora_B'}" for prefix in unpaired[:3]
        ]
        raise ValueError(f"{len(unpaired)} unpaired LoRA layer(s): {details}")
    pairs = {}
    for prefix in sorted(a_prefixes):
        a_key, b_key = prefix + LORA_A_SUFFIX, prefix + LORA_B_SUFFIX
        a_shape, b_shape = np.shape(adapter[a_key]), np.shape(adapter[b_key])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ValueError(
                f"LoRA layer {prefix}: lora_A {a_shape} (r, in) and lora_B {b_shape} (out, r) do not pair"
            )
        pairs[prefix] = (a_key, b_key)
    return pairs


def non_lora_keys(adapter: Mapping[str, np.ndarray]) -> list[str]:
    """Keys that are not LoRA A/B factors (they are aggregated by plain weighted mean)."""
    return [key for key in adapter if not key.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))]


def lora_ranks(adapter: Mapping[str, np.ndarray]) -> dict[str, int]:
    """{prefix: r} for every LoRA layer."""
    return {prefix: int(np.shape(adapter[a_key])[0]) for prefix, (a_key, _) in lora_pairs(adapter).items()}


def dense_updates(adapter: Mapping[str, np.ndarray], scaling: float = 1.0) -> dict[str, np.ndarray]:
    """{prefix: scaling * B @ A} of shape (out, in), in float64."""
    return {
        prefix: scaling * (np.asarray(adapter[b_key], dtype=np.float64) @ np.asarray(adapter[a_key], dtype=np.float64))
        for prefix, (a_key, b_key) in lora_pairs(adapter).items()
    }


def _normalized(weights: Sequence[float], count: int) -> np.ndarray:
    if len(weights) != count:
        raise ValueError(f"one weight per adapter: got {len(weights)} weights for {count} adapters")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return w / w.sum()


def _same_layers(
    adapters: Sequence[Mapping[str, np.ndarray]], same_shapes: bool = True
) -> dict[str, tuple[str, str]]:
    # Keys must agree; shapes too unless sites may differ in rank (then only the LoRA ranks may differ).
    if not adapters:
        raise ValueError("nothing to aggregate")
    pairs = lora_pairs(adapters[0])
    lora_keys = {key for pair in pairs.values() for key in pair}
    for index, adapter in enumerate(adapters[1:], start=1):
        if set(adapter) != set(adapters[0]):
            raise ValueError(f"adapter {index} has different keys than adapter 0")
        lora_pairs(adapter)
        for key, reference in adapters[0].items():
            got, expected = np.shape(adapter[key]), np.shape(reference)
            if same_shapes or key not in lora_keys:
                mismatch = got != expected
            else:
                # lora_A (r, in) must keep `in`, lora_B (out, r) must keep `out`.
                axis = 1 if key.endswith(LORA_A_SUFFIX) else 0
                mismatch = got[axis] != expected[axis]
            if mismatch:
                raise ValueError(f"adapter {index} has shape {got} for {key}, adapter 0 has {expected}")
    return pairs


def _mean_of_keys(
    adapters: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], keys: Sequence[str]
) -> AdapterArrays:
    if not keys:
        return {}
    return weighted_mean([{key: adapter[key] for key in keys} for adapter in adapters], weights)


def weighted_dense_mean(
    adapters: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    scalings: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """{prefix: sum_i w_i * s_i * B_i @ A_i} (out, in): the exact mean update; ranks may differ."""
    w = _normalized(weights, len(adapters))
    s = np.ones(len(adapters)) if scalings is None else np.asarray(scalings, dtype=np.float64)
    if len(s) != len(adapters):
        raise ValueError(f"one scaling per adapter: got {len(s)} for {len(adapters)} adapters")
    _same_layers(adapters, same_shapes=False)
    out: dict[str, np.ndarray] = {}
    for wi, si, adapter in zip(w, s, adapters):
        for prefix, update in dense_updates(adapter, si).items():
            out[prefix] = out.get(prefix, 0.0) + wi * update
    return out


def ffa_lora(
    adapters: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    a_atol: float = 0.0,
    site_ids: Sequence[str] | None = None,
) -> AdapterArrays:
    """FFA-LoRA (Sun et al. 2024): A is frozen, so FedAvg of B alone is exact: mean(B_i) @ A == mean(B_i @ A).

    Raises ValueError if any site's A differs from site 0's by more than `a_atol` (default: exactly equal);
    `site_ids` only name the sites in that message.
    """
    names = list(site_ids) if site_ids is not None else [f"adapter {i}" for i in range(len(adapters))]
    pairs = _same_layers(adapters)
    out = weighted_mean(adapters, weights)
    for prefix, (a_key, _) in pairs.items():
        reference = np.asarray(adapters[0][a_key], dtype=np.float64)
        for index, adapter in enumerate(adapters[1:], start=1):
            gap = float(np.max(np.abs(np.asarray(adapter[a_key], dtype=np.float64) - reference)))
            if gap > a_atol:
                raise ValueError(
                    f"FFA-LoRA needs lora_A frozen and identical across sites, but {names[index]!r} "
                    f"differs from {names[0]!r} in {a_key} by {gap:.3g} (> a_atol={a_atol})"
                )
        out[a_key] = reference.copy()
    return out


def fedsa_lora(
    adapters: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> tuple[AdapterArrays, list[AdapterArrays]]:
    """FedSA-LoRA (Guo et al. 2025): share A (weighted mean), keep B local.

    Returns (global part: every A key and non-LoRA key, averaged; per-site B dicts, untouched copies).
    """
    _same_layers(adapters)
    global_part = _mean_of_keys(adapters, weights, list(fedsa_split(adapters[0])[0]))
    local_parts = [{key: np.array(value, copy=True) for key, value in fedsa_split(adapter)[1].items()}
                   for adapter in adapters]
    return global_part, local_parts


def fedsa_keeps_local(key: str) -> bool:
    """FedSA-LoRA's split of the keys: lora_B stays at the site; lora_A and non-LoRA keys are shared."""
    return key.endswith(LORA_B_SUFFIX)


def fedsa_split(adapter: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(shared part, site-local part) of one adapter or delta under FedSA-LoRA (fedsa_keeps_local)."""
    shared = {key: value for key, value in adapter.items() if not fedsa_keeps_local(key)}
    local = {key: value for key, value in adapter.items() if fedsa_keeps_local(key)}
    return shared, local


def stack_lora_updates(
    adapters: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    scalings: Sequence[float] | None = None,
    stacked_scaling: float = 1.0,
) -> AdapterArrays:
    """FLoRA (Wang et al. 2024): stack factors so stacked_scaling * B_s @ A_s == sum_i w_i s_i B_i @ A_i exactly.

    B_s = [c_1 B_1 | ... | c_k B_k] (out, sum r_i) with c_i = w_i s_i / stacked_scaling, and
    A_s = [A_1; ...; A_k] (sum r_i, in). Sites may have different ranks. `scalings` are the sites'
    peft scalings (default 1.0 each); `stacked_scaling` the one the stacked adapter will be used with.
    """
    w = _normalized(weights, len(adapters))
    s = np.ones(len(adapters)) if scalings is None else np.asarray(scalings, dtype=np.float64)
    if len(s) != len(adapters):
        raise ValueError(f"one scaling per adapter: got {len(s)} for {len(adapters)} adapters")
    pairs = _same_layers(adapters, same_shapes=False)
    coefficients = w * s / stacked_scaling
    out = _mean_of_keys(adapters, weights, non_lora_keys(adapters[0]))
    for a_key, b_key in pairs.values():
        out[a_key] = np.concatenate([np.asarray(adapter[a_key], dtype=np.float64) for adapter in adapters], axis=0)
        out[b_key] = np.concatenate(
            [c * np.asarray(adapter[b_key], dtype=np.float64) for c, adapter in zip(coefficients, adapters)], axis=1
        )
    return out


def svd_redistribute(dense_update: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-`rank` factors of `dense_update` (out, in): B (out, rank) = U sqrt(S), A (rank, in) = sqrt(S) V^T.

    FlexLoRA (Bai et al. 2024). If `rank` exceeds min(out, in), the extra rows of A / columns of B are zero.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    b, a, _ = _truncated_svd(np.asarray(dense_update, dtype=np.float64), rank)
    return b, a


def _truncated_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U_r sqrt(S_r) (out, rank), sqrt(S_r) V_r^T (rank, in), S_r (rank,)); components beyond the matrix's are zero."""
    # numpy's LAPACK SVD (gesdd) is the well-kept tool here; Eckart-Young makes its truncation optimal.
    u, singular_values, vt = np.linalg.svd(matrix, full_matrices=False)
    kept = min(rank, singular_values.size)
    root = np.sqrt(singular_values[:kept])
    b = np.zeros((matrix.shape[0], rank))
    a = np.zeros((rank, matrix.shape[1]))
    values = np.zeros(rank)
    b[:, :kept] = u[:, :kept] * root
    a[:kept, :] = root[:, None] * vt[:kept, :]
    values[:kept] = singular_values[:kept]
    return b, a, values


def truncate_factors(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best rank-`rank` factors of B @ A without forming it: (B_r (out, rank), A_r (rank, in), singular values (rank,)).

    svd_redistribute(B @ A, rank) up to rounding (B_r = U sqrt(S), A_r = sqrt(S) V^T): the SVD of the small (R, R)
    core of the QR factors of B and A^T, O((out + in) R^2) instead of O(out in min(out, in)). Missing components
    (rank > rank of B @ A) are zero. FlexLoRA's coordinator (server/methods/flexlora.py) truncates the exact global with it.
    """
    b, a = np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64)
    if b.shape[1] == 0:
        return np.zeros((b.shape[0], rank)), np.zeros((rank, a.shape[1])), np.zeros(rank)
    q_b, r_b = np.linalg.qr(b)
    q_a, r_a = np.linalg.qr(a.T)
    core_b, core_a, values = _truncated_svd(r_b @ r_a.T, rank)
    return q_b @ core_b, core_a @ q_a.T, values


def flexlora_aggregate(
    adapters: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    site_ranks: Sequence[int],
    scalings: Sequence[float] | None = None,
    site_scalings: Sequence[float] | None = None,
) -> list[AdapterArrays]:
    """FlexLoRA: SVD-truncate the exact mean dense update to each site's rank; one adapter per `site_ranks` entry.

    The mean is sum_i w_i s_i B_i @ A_i (s_i from `scalings`, default 1); site j's factors satisfy
    site_scalings[j] * B_j @ A_j ~= that mean (best rank-site_ranks[j] approximation).
    """
    s_out = np.ones(len(site_ranks)) if site_scalings is None else np.asarray(site_scalings, dtype=np.float64)
    if len(s_out) != len(site_ranks):
        raise ValueError(f"one site scaling per site rank: got {len(s_out)} for {len(site_ranks)} sites")
    pairs = _same_layers(adapters, same_shapes=False)
    mean_dense = weighted_dense_mean(adapters, weights, scalings)
    shared = _mean_of_keys(adapters, weights, non_lora_keys(adapters[0]))
    out = []
    for rank, site_scaling in zip(site_ranks, s_out):
        site_adapter = {key: value.copy() for key, value in shared.items()}
        for prefix, (a_key, b_key) in pairs.items():
            site_adapter[b_key], site_adapter[a_key] = svd_redistribute(mean_dense[prefix] / site_scaling, rank)
        out.append(site_adapter)
    return out


def fedex_residual(
    adapters: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], scaling: float = 1.0
) -> tuple[AdapterArrays, dict[str, np.ndarray]]:
    """FedEx-LoRA (Singhal et al. 2024): (FedAvg adapter, {prefix: residual (out, in)}).

    residual = scaling * (mean(B_i @ A_i) - mean(B_i) @ mean(A_i)), so
    W0 + residual + scaling * mean(B) @ mean(A) == W0 + scaling * mean(B_i @ A_i) exactly;
    the caller folds the residual into the frozen base weight.
    """
    averaged, factors = fedex_residual_factors(adapters, weights, scaling)
    residual = {prefix: factors[b_key] @ factors[a_key] for prefix, (a_key, b_key) in lora_pairs(factors).items()}
    return averaged, residual


def fedex_residual_factors(adapters: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
                           scaling: float = 1.0) -> tuple[AdapterArrays, AdapterArrays]:
    """(FedAvg adapter, residual as stacked factors with scaling 1: A (k r + r, in), B (out, k r + r)).

    B_res @ A_res == scaling * (sum_i w_i B_i A_i - mean(B) @ mean(A)) exactly (weights normalised): the residual
    of a round is [w_1 s B_1 | ... | w_k s B_k | -s mean(B)] @ [A_1; ...; A_k; mean(A)], kept low rank so the
    coordinator (server/methods/fedex_lora.py) can send it to the sites as a frozen update.
    """
    _same_layers(adapters)  # one rank at every site
    averaged = weighted_mean(adapters, weights)
    stacked = stack_lora_updates(adapters, weights, [scaling] * len(adapters), stacked_scaling=1.0)
    residual: AdapterArrays = {}
    for a_key, b_key in lora_pairs(averaged).values():
        residual[a_key] = np.concatenate([stacked[a_key], np.asarray(averaged[a_key], np.float64)], axis=0)
        residual[b_key] = np.concatenate([stacked[b_key], -scaling * np.asarray(averaged[b_key], np.float64)],
                                         axis=1)
    return averaged, residual
