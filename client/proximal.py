"""FedProx proximal term (Li et al. 2020) added to a site's local loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


def proximal_term(
    local_params: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    global_params: Mapping[str, torch.Tensor | np.ndarray] | Sequence[torch.Tensor | np.ndarray],
    mu: float,
) -> torch.Tensor:
    """mu / 2 * sum_k ||w_k - w_g,k||^2 as a 0-dim tensor; gradients flow to the local params only.

    Dicts are matched by key (the global dict must hold every local key); sequences by position.
    """
    if mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    if isinstance(local_params, Mapping):
        if not isinstance(global_params, Mapping):
            raise TypeError("local_params is a dict, so global_params must be a dict too")
        missing = sorted(set(local_params) - set(global_params))
        if missing:
            raise KeyError(f"global_params lacks {len(missing)} local keys, e.g. {missing[:3]}")
        pairs = [(local_params[key], global_params[key]) for key in local_params]
    else:
        local_list, global_list = list(local_params), list(global_params)
        if len(local_list) != len(global_list):
            raise ValueError(f"{len(local_list)} local tensors but {len(global_list)} global ones")
        pairs = list(zip(local_list, global_list))
    if not pairs:
        raise ValueError("no parameters to regularize")
    total = None
    for local, global_value in pairs:
        # The global weights are a constant anchor: detach so no gradient reaches them.
        anchor = torch.as_tensor(global_value, dtype=local.dtype, device=local.device).detach()
        if anchor.shape != local.shape:
            raise ValueError(f"shape mismatch: local {tuple(local.shape)} vs global {tuple(anchor.shape)}")
        squared = (local - anchor).pow(2).sum()
        total = squared if total is None else total + squared
    return 0.5 * mu * total
