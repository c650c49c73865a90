"""Central (site-level) differential privacy for federated LoRA: clipping, noise, accounting, FFA-LoRA.

Adapter updates are ``dict[str, np.ndarray]`` keyed by PEFT parameter names, as in strategies/fedavg.py.

Central DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
each sampled site's LoRA delta is clipped to L2 norm C, the coordinator sums the clipped deltas and adds
N(0, (sigma*C)^2) per coordinate to the SUM, then divides by a fixed denominator n. The unit of privacy
is a whole site (user-level DP): one round is one sampled Gaussian mechanism with sample rate
q = (expected sites per round) / (sites in the population), so the accountant gets one step per round.

Accounting is Opacus' (opacus.accountants): RDP (Mironov 2017) or PRV (Gopi et al. 2021), whose history
format is a list of (noise_multiplier, sample_rate, steps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from federation.secure_random import SecureRandom

AdapterArrays = dict[str, np.ndarray]
# Where DP noise comes from: SecureRandom in runs; anything with numpy's normal(loc, scale, size) in tests.
NoiseSource = SecureRandom | np.random.Generator

ACCOUNTANTS = ("rdp", "prv")
# sigma beyond this makes the update pure noise for any realistic number of sites; a target that
# needs more is treated as unreachable rather than silently training on noise.
DEFAULT_MAX_NOISE_MULTIPLIER = 100.0
# Binary-search precision of the calibrated epsilon (Opacus' default).
DEFAULT_EPSILON_TOLERANCE = 0.01


# ---------------------------------------------------------------------------------------------
# Clipping and noise
# ---------------------------------------------------------------------------------------------


def update_l2_norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors of `update` flattened into one vector (accumulated in float64)."""
    squared = 0.0
    for value in update.values():
        flat = np.asarray(value, dtype=np.float64).ravel()
        squared += float(np.dot(flat, flat))
    return math.sqrt(squared)


def clip_update(update: Mapping[str, np.ndarray], clip_norm: float) -> tuple[AdapterArrays, float]:
    """Scale `update` by min(1, C / ||update||); returns (float64 clipped update, original norm)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    norm = update_l2_norm(update)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    clipped = {key: np.asarray(value, dtype=np.float64) * scale for key, value in update.items()}
    return clipped, norm


def add_gaussian_noise(
    summed_update: Mapping[str, np.ndarray],
    noise_multiplier: float,
    clip_norm: float,
    rng: NoiseSource,
) -> AdapterArrays:
    """Sum of clipped updates + N(0, (sigma*C)^2) per coordinate; float64, shapes unchanged.

    The noise goes on the SUM, whose L2 sensitivity to adding/removing one site is C. Dividing the
    noisy sum by n sites gives a mean with noise std sigma*C/n per coordinate, so more sites per round
    buy accuracy at the same privacy. `rng` is federation.secure_random.SecureRandom in every run (noise
    nobody can regenerate); a seeded numpy Generator is accepted for tests only. float64 sampling stays
    open to Mironov's (2012) floating-point attack (see federation/secure_random.py).
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    std = noise_multiplier * clip_norm
    return {
        key: np.asarray(value, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(value))
        for key, value in summed_update.items()
    }


def private_mean_update(
    updates: Sequence[Mapping[str, np.ndarray]],
    clip_norm: float,
    noise_multiplier: float,
    rng: NoiseSource,
    denominator: float | None = None,
) -> tuple[AdapterArrays, list[float]]:
    """DP-FedAvg aggregate: (sum_i clip(u_i) + noise) / denominator; returns (mean, pre-clip norms).

    Sites are weighted uniformly on purpose: example-count weights would let one site's weight, not C,
    set the sensitivity. `denominator` defaults to len(updates); under Poisson site sampling pass the
    expected number of sites per round so that it does not depend on who was sampled.
    """
    if not updates:
        raise ValueError("nothing to aggregate")
    denominator = float(len(updates)) if denominator is None else float(denominator)
    if not denominator > 0:
        raise ValueError(f"denominator must be positive, got {denominator}")
    total: AdapterArrays = {key: np.zeros(np.shape(value), dtype=np.float64) for key, value in updates[0].items()}
    norms = []
    for update in updates:
        clipped, norm = clip_update(update, clip_norm)
        norms.append(norm)
        for key in total:
            total[key] += clipped[key]
    noisy = add_gaussian_noise(total, noise_multiplier, clip_norm, rng)
    return {key: value / denominator for key, value in noisy.items()}, norms


# ---------------------------------------------------------------------------------------------
# Adaptive clipping (Andrew et al. 2021)
# ---------------------------------------------------------------------------------------------


def noise_multiplier_for_adaptive_clipping(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2): the update noise that keeps total privacy at sigma.

    Andrew et al. (2021), Thm. 1: releasing the noisy unclipped count (std sigma_b) and the noisy update
    sum (multiplier sigma_delta) in the same round costs as much as one Gaussian mechanism with
    multiplier (sigma_delta^-2 + (2 sigma_b)^-2)^(-1/2). To spend exactly the budget of `noise_multiplier`
    (the value the accountant is given), the update noise must be raised to sigma_delta. Requires
    2 * sigma_b > sigma; the paper's default sigma_b is (expected sites per round) / 20.
    """
    if noise_multiplier < 0 or clipped_count_stddev < 0:
        raise ValueError(
            f"noise_multiplier ({noise_multiplier}) and clipped_count_stddev ({clipped_count_stddev}) must be >= 0"
        )
    if noise_multiplier == 0:
        return 0.0
    if 2 * clipped_count_stddev <= noise_multiplier:
        raise ValueError(
            f"clipped_count_stddev={clipped_count_stddev} is too small for noise_multiplier={noise_multiplier}: "
            f"the count query alone would spend more than the whole budget; need 2*clipped_count_stddev > "
            f"noise_multiplier (more sites per round, or a larger clipped_count_stddev)"
        )
    return (noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5


class AdaptiveClipNorm:
    """Clip norm that tracks a quantile of the update norms (Andrew et al. 2021, geometric update).

    Each round: b = (#{||u_i|| <= C} + N(0, sigma_b^2)) / m, then C <- C * exp(-lr * (b - gamma)), with
    gamma = target_unclipped_quantile. Too many unclipped updates (b > gamma) shrink C, too few grow it.
    Defaults are the paper's (C0 = 0.1, gamma = 0.5, lr = 0.2); it recommends sigma_b = m / 20 where m is
    the expected number of sites per round. Use noise_multiplier_for_adaptive_clipping() for the update
    noise, and account with the un-adjusted noise multiplier.
    """

    def __init__(
        self,
        clipped_count_stddev: float,
        initial_clip_norm: float = 0.1,
        target_unclipped_quantile: float = 0.5,
        clip_norm_lr: float = 0.2,
    ) -> None:
        if not initial_clip_norm > 0:
            raise ValueError(f"initial_clip_norm must be positive, got {initial_clip_norm}")
        if not 0.0 <= target_unclipped_quantile <= 1.0:
            raise ValueError(f"target_unclipped_quantile must be in [0, 1], got {target_unclipped_quantile}")
        if not clip_norm_lr > 0:
            raise ValueError(f"clip_norm_lr must be positive, got {clip_norm_lr}")
        if clipped_count_stddev < 0:
            raise ValueError(f"clipped_count_stddev must be >= 0, got {clipped_count_stddev}")
        self.clip_norm = float(initial_clip_norm)
        self.target_unclipped_quantile = float(target_unclipped_quantile)
        self.clip_norm_lr = float(clip_norm_lr)
        self.clipped_count_stddev = float(clipped_count_stddev)

    def update_from_count(
        self, unclipped_count: int, expected_num_updates: float, rng: NoiseSource
    ) -> float:
        """Geometric step from the number of updates with norm <= C (what sites report as bits); new C."""
        if not expected_num_updates > 0:
            raise ValueError(f"expected_num_updates must be positive, got {expected_num_updates}")
        noisy_fraction = (unclipped_count + rng.normal(0.0, self.clipped_count_stddev)) / expected_num_updates
        self.clip_norm *= math.exp(-self.clip_norm_lr * (noisy_fraction - self.target_unclipped_quantile))
        return self.clip_norm

    def update(
        self, norms: Sequence[float], rng: NoiseSource, expected_num_updates: float | None = None
    ) -> float:
        """Geometric step from this round's pre-clip update norms; returns the new clip norm.

        `expected_num_updates` (m) defaults to len(norms); under Poisson site sampling pass the expected
        count, as the paper does, so the normaliser does not depend on who was sampled.
        """
        if not norms:
            raise ValueError("need at least one update norm")
        unclipped = sum(1 for norm in norms if norm <= self.clip_norm)
        m = float(len(norms)) if expected_num_updates is None else float(expected_num_updates)
        return self.update_from_count(unclipped, m, rng)

    def state_dict(self) -> dict[str, float]:
        """Everything needed to resume (plain floats, JSON-friendly)."""
        return {
            "clip_norm": self.clip_norm,
            "target_unclipped_quantile": self.target_unclipped_quantile,
            "clip_norm_lr": self.clip_norm_lr,
            "clipped_count_stddev": self.clipped_count_stddev,
        }

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Inverse of state_dict."""
        self.clip_norm = float(state["clip_norm"])
        self.target_unclipped_quantile = float(state["target_unclipped_quantile"])
        self.clip_norm_lr = float(state["clip_norm_lr"])
        self.clipped_count_stddev = float(state["clipped_count_stddev"])


# ---------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _check_sample_rate(sample_rate: float) -> None:
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")


def epsilon_of_history(history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of a composition [(noise_multiplier, sample_rate, steps), ...] (Opacus)."""
    _check_accountant(accountant)
    _check_delta(delta)
    entries = [(float(sigma), float(q), int(steps)) for sigma, q, steps in history if int(steps) > 0]
    if not entries:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in entries):
        return math.inf
    # Opacus only where privacy is accounted: importing it takes ~2 s (it pulls in torch.distributed), and every
    # ServerApp and site worker imports this module (SecAgg+ clips and noises with it).
    from opacus.accountants import create_accountant

    opacus_accountant = create_accountant(mechanism=accountant)
    opacus_accountant.history = entries
    return float(opacus_accountant.get_epsilon(delta=delta))


def central_dp_epsilon(
    noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """Site-level epsilon after `rounds` rounds; sample_rate = fraction of sites sampled per round."""
    _check_sample_rate(sample_rate)
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    return epsilon_of_history([(noise_multiplier, sample_rate, rounds)], delta, accountant)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    accountant: str = "rdp",
    max_noise_multiplier: float = DEFAULT_MAX_NOISE_MULTIPLIER,
    epsilon_tolerance: float = DEFAULT_EPSILON_TOLERANCE,
) -> float:
    """Smallest sigma (within tolerance) with epsilon(sigma, q, rounds, delta) <= target_epsilon.

    `rounds` is the number of sampled Gaussian steps: server rounds for central DP, optimizer steps for
    DP-SGD. Raises ValueError (naming all inputs) when the target needs sigma > max_noise_multiplier.
    """
    inputs = (
        f"target_epsilon={target_epsilon}, delta={delta}, rounds={rounds}, sample_rate={sample_rate}, "
        f"accountant={accountant}"
    )
    _check_accountant(accountant)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be positive and finite ({inputs})")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1) ({inputs})")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1] ({inputs})")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 ({inputs})")
    if not max_noise_multiplier > 0:
        raise ValueError(f"max_noise_multiplier must be positive, got {max_noise_multiplier}")
    # Epsilon falls as sigma grows, so the target is reachable iff the largest allowed sigma reaches it.
    floor = central_dp_epsilon(max_noise_multiplier, sample_rate, rounds, delta, accountant)
    if floor > target_epsilon:
        raise ValueError(
            f"privacy target unreachable: even noise_multiplier={max_noise_multiplier} gives "
            f"epsilon={floor:.4g} > target ({inputs}); raise the target epsilon or delta, sample fewer "
            f"sites per round, run fewer rounds, or allow a larger max_noise_multiplier"
        )
    from opacus.accountants.utils import get_noise_multiplier  # only here: see epsilon_of_history

    sigma = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=rounds,
        accountant=accountant,
        epsilon_tolerance=epsilon_tolerance,
    )
    # The search brackets from above, so it can end a hair past the cap; the cap itself meets the target.
    return float(min(sigma, max_noise_multiplier))


class PrivacyLedger:
    """The (noise_multiplier, sample_rate, steps) actually used, round by round, and epsilon(delta) so far.

    One ledger per privacy unit: the coordinator keeps one for site-level central DP (one step per
    round); a DP-SGD site's own record-level budget lives in its Opacus accountant (federation/dp_sgd.py).
    """

    def __init__(self, delta: float, accountant: str = "rdp") -> None:
        _check_delta(delta)
        _check_accountant(accountant)
        self.delta = float(delta)
        self.accountant = accountant
        self.history: list[tuple[float, float, int]] = []
        self.epsilons: list[float] = []

    def record_round(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Add one round's releases (identical consecutive entries merge); returns epsilon so far."""
        _check_sample_rate(sample_rate)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        entry = (float(noise_multiplier), float(sample_rate))
        if self.history and self.history[-1][:2] == entry:
            self.history[-1] = (*entry, self.history[-1][2] + int(steps))
        else:
            self.history.append((*entry, int(steps)))
        epsilon = self.epsilon()
        self.epsilons.append(epsilon)
        return epsilon

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at `delta` (default: the ledger's delta)."""
        return epsilon_of_history(self.history, self.delta if delta is None else delta, self.accountant)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Epsilon the ledger would report after one more such round, without recording it."""
        return epsilon_of_history(
            [*self.history, (noise_multiplier, sample_rate, steps)], self.delta, self.accountant
        )

    @property
    def rounds(self) -> int:
        """Number of rounds recorded."""
        return len(self.epsilons)

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state (lists and scalars only)."""
        return {
            "delta": self.delta,
            "accountant": self.accountant,
            "history": [list(entry) for entry in self.history],
            "epsilons": list(self.epsilons),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of state_dict; the accountant kind must match."""
        if state["accountant"] != self.accountant:
            raise ValueError(f"ledger uses {self.accountant!r}, state is for {state['accountant']!r}")
        self.delta = float(state["delta"])
        self.history = [(float(sigma), float(q), int(steps)) for sigma, q, steps in state["history"]]
        self.epsilons = [float(eps) for eps in state["epsilons"]]


# ---------------------------------------------------------------------------------------------
# FFA-LoRA
# ---------------------------------------------------------------------------------------------


def freeze_lora_A(peft_model: Any) -> int:
    """FFA-LoRA: freeze every LoRA A at its (shared, seeded) init; returns how many scalars A holds in all.

    Sun et al. 2024 ("Improving LoRA in Privacy-preserving Federated Learning"). With A trainable,
    FedAvg of the factors is not FedAvg of the products: mean_i(B_i A_i) != mean_i(B_i) mean_i(A_i),
    so averaging adapters drifts from averaging the models the sites trained. With A frozen and the
    same on every site (same init seed), mean_i(B_i A) = mean_i(B_i) A exactly. Under DP it also
    avoids the noise product term (B + xi_B)(A + xi_A) and puts the whole clip norm and noise on B
    alone: about half the noised coordinates (r*out instead of r*(in+out)) for the same privacy.
    Sites and coordinator must then keep A at the shared init (its deltas are exactly zero).
    """
    # Imported here so that the numpy-only helpers above do not pull in torch/peft.
    from peft.tuners.lora import LoraLayer

    frozen = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        a_params = list(module.lora_A.parameters()) + list(module.lora_embedding_A.parameters())
        for param in a_params:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen
