"""Central (site-level) DP on the coordinator: DP-FedAvg with Opacus accounting.

Flower's message-API DP wrappers are not used here: they compute ``reply - sent params`` and
write back ``sent + clipped``, which assumes sites return full weights, while our sites return
deltas; and their noise is added after the inner (weighted) aggregate. The same math — clip each
site's update to C, add N(0, (sigma*C)^2) to the sum, divide by the expected number of sites —
is in federation/privacy.py, tested, and the result feeds any aggregator (server optimizers keep
the guarantee by post-processing).

All of this run's DP noise (the sum's, SecAgg+'s and adaptive clipping's noisy count) is drawn from
`rng`, a federation.secure_random.SecureRandom: OS entropy, nothing seeded, nothing in state_dict().
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from federation.config import CentralDPConfig
from federation.privacy import (AdaptiveClipNorm, PrivacyLedger, calibrate_noise_multiplier,
                                noise_multiplier_for_adaptive_clipping, private_mean_update)
from federation.secure_random import secure_random

log = logging.getLogger("fedtune.server")


class CentralDP:
    """DP-FedAvg state for one run: clip norm (fixed or adaptive), noise multiplier and the privacy ledger."""

    def __init__(self, cfg: CentralDPConfig, num_sites: int, sites_per_round: int, rounds: int):
        if not 0 < sites_per_round <= num_sites:
            raise ValueError(f"central DP needs 0 < sites per round ({sites_per_round}) <= sites ({num_sites})")
        self.cfg = cfg
        self.expected_sites = float(sites_per_round)
        self.sample_rate = sites_per_round / num_sites
        if cfg.target_epsilon > 0:
            # Raises a clear ValueError when the target cannot be met: the run refuses to start.
            self.noise_multiplier = calibrate_noise_multiplier(
                cfg.target_epsilon, cfg.delta, self.sample_rate, rounds, cfg.accountant, cfg.max_noise_multiplier)
            log.info("central DP: calibrated noise multiplier %.4f for epsilon %.3g at delta %.1e over %d rounds "
                     "(site sampling rate %.3f)", self.noise_multiplier, cfg.target_epsilon, cfg.delta, rounds,
                     self.sample_rate)
        else:
            self.noise_multiplier = cfg.noise_multiplier
        self.clip_norm = cfg.clip_norm
        self.adaptive = None
        self.sum_noise_multiplier = self.noise_multiplier
        if cfg.adaptive_clipping:
            # The paper's m/20 assumes hundreds of sites per round; with few sites it would leave no budget
            # for the sum (need 2*sigma_b > sigma), so default to at least sigma.
            count_std = cfg.clipped_count_stddev or max(self.expected_sites / 20.0, self.noise_multiplier)
            self.adaptive = AdaptiveClipNorm(count_std, cfg.clip_norm, cfg.target_unclipped_quantile,
                                             cfg.clip_norm_lr)
            # Part of the budget goes to the noisy unclipped count (Andrew et al. 2021, Thm 1).
            self.sum_noise_multiplier = noise_multiplier_for_adaptive_clipping(self.noise_multiplier, count_std)
        self.ledger = PrivacyLedger(cfg.delta, cfg.accountant)
        # Never seeded and never saved: whoever knows the seed or the state could subtract the noise.
        self.rng = secure_random()
        log.info("central DP: noise is drawn from OS entropy (ChaCha20 keyed by os.urandom) and is not "
                 "reproducible by design; seeds reproduce everything else")

    def aggregate(self, deltas: Sequence[Mapping[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Noisy mean of the clipped deltas, and this round's privacy report (epsilon so far, C, sigma)."""
        clip_norm = self.clip_norm
        mean, norms = private_mean_update(deltas, clip_norm, self.sum_noise_multiplier, self.rng,
                                          denominator=self.expected_sites)
        epsilon = self.ledger.record_round(self.noise_multiplier, self.sample_rate)
        if self.adaptive is not None:
            self.clip_norm = self.adaptive.update(norms, self.rng, self.expected_sites)
        report = {"epsilon": epsilon, "delta": self.cfg.delta, "noise_multiplier": self.noise_multiplier,
                  "clip_norm": clip_norm, "next_clip_norm": self.clip_norm, "sample_rate": self.sample_rate,
                  "clipped_sites": int(sum(n > clip_norm for n in norms)), "update_norms": [float(n) for n in norms],
                  "accountant": self.cfg.accountant}
        log.info("central DP: epsilon %.4f (delta %.1e) after %d rounds; C=%.4g sigma=%.4g; %d of %d updates clipped",
                 epsilon, self.cfg.delta, self.ledger.rounds, clip_norm, self.noise_multiplier,
                 report["clipped_sites"], len(norms))
        return mean, report

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: ledger, clip norm, noise multiplier (no randomness: the noise source has no state)."""
        return {"ledger": self.ledger.state_dict(), "clip_norm": self.clip_norm,
                "adaptive": None if self.adaptive is None else self.adaptive.state_dict(),
                "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict() returned; an older checkpoint's "rng" entry (a seeded generator) is ignored."""
        self.ledger.load_state_dict(state["ledger"])
        self.clip_norm = float(state["clip_norm"])
        if self.adaptive is not None and state.get("adaptive"):
            self.adaptive.load_state_dict(state["adaptive"])
        self.noise_multiplier = float(state["noise_multiplier"])
