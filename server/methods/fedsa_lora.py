"""Coordinator side of FedSA-LoRA (Guo et al. 2024): sites upload the lora_A (and non-LoRA) deltas only and keep lora_B.

The site side is client/fedsa.py. The coordinator fills the missing B deltas with zeros, so the inner aggregator
(``strategy.aggregator``, default fedavg) averages A and leaves the global B at its initial value; the checkpointed
global adapter is the shared A with that initial B, the personal B's never leave the sites. Which keys stay at the
site is strategies.lora_exact.fedsa_split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from server.strategy import LoraDeltaStrategy, aggregator_params, sampling_kwargs
from strategies.aggregators import build_aggregator
from strategies.fedavg import UpdateRejected
from strategies.lora_exact import fedsa_split
from strategies.registry import aggregator_of


class FedSALoraStrategy(LoraDeltaStrategy):
    """LoraDeltaStrategy for uploads without lora_B: missing B deltas count as zero, so only A is averaged."""

    def complete_update(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Refuse an upload that carries lora_B; fill every lora_B delta with zeros (the global B never moves)."""
        leaked = list(fedsa_split(arrays)[1])
        if leaked:
            raise UpdateRejected(f"FedSA-LoRA keeps lora_B at the site, but the upload has lora_B parts {leaked[:2]}")
        zeros = {key: np.zeros(np.shape(value), np.float32) for key, value in fedsa_split(self.current_global)[1].items()}
        return {**arrays, **zeros}


def build(cfg: Any) -> FedSALoraStrategy:
    """FedSALoraStrategy around the inner aggregator (``strategy.aggregator``, default fedavg) and its params."""
    inner = build_aggregator(aggregator_of(cfg.strategy.name, cfg.strategy.aggregator), aggregator_params(cfg.strategy))
    return FedSALoraStrategy(inner, **sampling_kwargs(cfg))
