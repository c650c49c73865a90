"""Coordinator side of FedEx-LoRA (Singhal et al. 2024): FedAvg of the factors plus the exact residual, every round.

Every site trains the same rank r (scaling s = lora.alpha / r) from the global adapter (B̄, Ā). FedAvg
of the factors alone gives s B̄' Ā', which is not the mean update s sum_i w_i B_i A_i; FedEx-LoRA adds
the difference (the residual) to the frozen weight. The residual of a round is itself low rank:

    residual = s sum_i w_i B_i A_i - s B̄' Ā' = [w_1 s B_1 | ... | w_k s B_k | -s B̄'] @ [A_1; ...; A_k; Ā']

so the coordinator keeps the accumulated residuals as stacked factors (scaling 1) in the same
``HeteroLoraState`` that holds FLoRA's global update, and sites add them through the same frozen
forward hook (client.flora.frozen_lora_update; never merged into a 4-bit weight, see there), receiving
only the rounds they have not merged yet. The trainable adapter is the FedAvg (B̄', Ā') and keeps
training from there (FLoRA re-initialises it). Every round, for every layer:

    W0 + frozen residuals + s B̄ Ā == W0 + sum over rounds of the exact weighted mean update.

The round loop's ``arrays`` (and the checkpointed adapter) is the FedAvg adapter; the strategy state
holds the residuals, so the adapter alone is not the model (as for FLoRA). The residual rank grows by
(k + 1) r per round and layer (k sites); nothing is truncated, so the merge stays exact.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from server.methods.flora import HeteroLoraStrategy, hetero_kwargs
from strategies.fedavg import AdapterArrays
from strategies.lora_exact import fedex_residual_factors

log = logging.getLogger("fedtune.server")


class FedExLoraStrategy(HeteroLoraStrategy):
    """HeteroLoraStrategy's messages and frozen-update bookkeeping; trainable = FedAvg, frozen += residual."""

    def __init__(self, *, lora_alpha: float, rank: int, **kwargs: Any) -> None:
        super().__init__("fedex_lora", lora_alpha=lora_alpha, export_rank=rank, **kwargs)

    def _trainable(self, server_round: int, node: int, dims: Mapping[str, tuple[int, int]]) -> AdapterArrays:
        """The global (FedAvg) adapter; every site trains it at the run's rank."""
        return {key: np.asarray(value, np.float32) for key, value in self.current_global.items()}

    def _evaluated(self, rank: int, dims: Mapping[str, tuple[int, int]]) -> AdapterArrays:
        """The global (FedAvg) adapter: with the frozen residuals it is the exact global model."""
        return {key: np.asarray(value, np.float32) for key, value in self.current_global.items()}

    def _merge_round(self, server_round: int, local_adapters: Sequence[AdapterArrays],
                     weights: Sequence[float]) -> AdapterArrays:
        """Append the round's residual factors to the frozen update; the FedAvg adapter is the next global."""
        averaged, residual = fedex_residual_factors(local_adapters, weights, self.scaling(self.export_rank))
        self.aggregator.merge(residual)
        log.info("round %d: fedex_lora averaged %d sites (weights %s); frozen residual rank %d", server_round,
                 len(local_adapters), list(weights), self.aggregator.offsets[-1])
        return {key: averaged[key].astype(np.asarray(value).dtype) for key, value in self.current_global.items()}


def build(cfg: Any) -> FedExLoraStrategy:
    """FedEx-LoRA's coordinator (one LoRA rank, lora.r, at every site; cfg validated: federation.validation)."""
    kwargs = hetero_kwargs(cfg)
    rank = kwargs.pop("export_rank")
    return FedExLoraStrategy(rank=rank, query_timeout=cfg.federation.round_timeout_s, **kwargs)
