"""Coordinator side of FlexLoRA (Bai et al. 2024): the exact mean update, truncated by SVD to each site's own rank.

Every round the global is sum_i w_i s_i B_i A_i of the sites' full local factors (it replaces the previous one:
``HeteroLoraState`` with accumulates=False); site j then trains from the best rank-r_j factors of global / s_j
(SVD, Eckart-Young). Components with zero singular value (a global of rank < r_j) get a fresh A row and a zero
B column, so they can train. Sites evaluate the exact global as a transient frozen part with a zero LoRA.
Messages, profiles, validation and the merge are FLoRA's (server/methods/flora.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from federation.adapter import to_array_record
from federation.protocol import FROZEN_MODE_KEY, FROZEN_RECORD, FROZEN_TRANSIENT
from server.methods.flora import HeteroLoraStrategy, hetero_kwargs


class FlexLoraStrategy(HeteroLoraStrategy):
    """HeteroLoraStrategy whose global is replaced every round and whose sites start from its SVD truncation."""

    accumulates = False

    def _start_factors(self, prefix: str, rank: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The best rank-`rank` factors of the global / scaling; numerically zero components keep the fresh LoRA."""
        if prefix not in self.aggregator.factors:
            return a, b
        b_site, a_site, values = self.aggregator.site_factors(prefix, rank, self.scaling(rank))
        # numpy.linalg.matrix_rank's tolerance: below it a component is numerically zero and
        # would never train (zero A row and B column have zero gradients); it restarts fresh.
        alive = values > values.max(initial=0.0) * max(a.shape[1], b.shape[0]) * np.finfo(np.float64).eps
        a[alive], b[:, alive] = a_site[alive], b_site[:, alive]
        return a, b

    def _frozen(self, node: int, evaluate: bool) -> tuple[dict[str, Any], dict[str, ArrayRecord]]:
        """Evaluation only: the whole global as a transient frozen part (training starts from its truncation)."""
        state = self.aggregator
        if not evaluate or not state.factors:
            return {}, {}
        return {FROZEN_MODE_KEY: FROZEN_TRANSIENT}, {FROZEN_RECORD: to_array_record(state.factors_since(0))}


def build(cfg: Any) -> FlexLoraStrategy:
    """FlexLoRA's coordinator (cfg validated: federation.validation)."""
    return FlexLoraStrategy("flexlora", query_timeout=cfg.federation.query_timeout(), **hetero_kwargs(cfg))
