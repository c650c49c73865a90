"""Central DP math: clipping, noise, adaptive clipping, accounting, calibration, FFA-LoRA."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from federation.privacy import (
    AdaptiveClipNorm,
    PrivacyLedger,
    add_gaussian_noise,
    calibrate_noise_multiplier,
    central_dp_epsilon,
    clip_update,
    epsilon_of_history,
    freeze_lora_A,
    noise_multiplier_for_adaptive_clipping,
    private_mean_update,
    update_l2_norm,
)
from federation.secure_random import secure_random

# ------------------------------------------------------------------ clipping and noise


def test_update_l2_norm_is_global_over_tensors():
    update = {"a.lora_A.weight": np.array([[3.0, 4.0]]), "a.lora_B.weight": np.array([[12.0]])}
    assert update_l2_norm(update) == 13.0


def test_clip_update_scales_to_clip_norm_and_reports_original_norm():
    update = {"a": np.array([3.0, 4.0], dtype=np.float32), "b": np.array([[12.0]], dtype=np.float32)}
    clipped, norm = clip_update(update, clip_norm=6.5)
    assert norm == 13.0
    np.testing.assert_array_equal(clipped["a"], [1.5, 2.0])
    np.testing.assert_array_equal(clipped["b"], [[6.0]])
    unchanged, norm = clip_update(update, clip_norm=20.0)
    assert norm == 13.0
    np.testing.assert_array_equal(unchanged["a"], update["a"])
    np.testing.assert_array_equal(unchanged["b"], update["b"])


def test_clip_update_zero_update_and_bad_clip_norm():
    clipped, norm = clip_update({"a": np.zeros(3)}, clip_norm=1.0)
    assert norm == 0.0
    np.testing.assert_array_equal(clipped["a"], np.zeros(3))
    with pytest.raises(ValueError):
        clip_update({"a": np.ones(3)}, clip_norm=0.0)


def test_clipped_norm_never_exceeds_clip_norm_over_random_updates():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scale = rng.lognormal(0.0, 2.0)
        update = {
            "x.lora_A.weight": rng.normal(0, scale, size=(4, 7)).astype(np.float32),
            "x.lora_B.weight": rng.normal(0, scale, size=(9, 4)).astype(np.float32),
        }
        clip_norm = rng.lognormal(0.0, 1.0)
        clipped, norm = clip_update(update, clip_norm)
        assert update_l2_norm(clipped) <= clip_norm * (1 + 1e-12)
        assert norm == pytest.approx(update_l2_norm(update), rel=1e-12)
        # Clipping only rescales: same direction, and no-op below the bound.
        factor = min(1.0, clip_norm / norm)
        for key in update:
            np.testing.assert_allclose(clipped[key], update[key].astype(np.float64) * factor, rtol=1e-12)


def test_noise_std_matches_sigma_times_clip_norm():
    # 400k draws: the sample std's relative error is ~1/sqrt(2n) = 0.1%, far inside the 5% band.
    sigma, clip_norm = 1.3, 0.7
    summed = {"a": np.full((400, 500), 2.0), "b": np.zeros(200_000)}
    noisy = add_gaussian_noise(summed, sigma, clip_norm, secure_random())
    noise = np.concatenate([(noisy["a"] - 2.0).ravel(), noisy["b"].ravel()])
    assert noisy["a"].shape == (400, 500) and noisy["b"].shape == (200_000,)
    assert abs(noise.std() - sigma * clip_norm) <= 0.05 * sigma * clip_norm
    assert abs(noise.mean()) < 5 * sigma * clip_norm / math.sqrt(noise.size)


def test_the_same_sum_gets_different_noise_every_time():
    summed = {"a": np.zeros((3, 4)), "b": np.ones(5)}
    first, second = (add_gaussian_noise(summed, 1.0, 0.5, secure_random()) for _ in range(2))
    assert all(not np.array_equal(first[key], second[key]) for key in summed)
    rng = secure_random()
    updates = [{"w": np.array([3.0, 4.0])}, {"w": np.array([0.0, 1.0])}]
    assert not np.array_equal(private_mean_update(updates, 1.0, 1.0, rng)[0]["w"],
                              private_mean_update(updates, 1.0, 1.0, rng)[0]["w"])


def test_zero_noise_multiplier_adds_nothing():
    summed = {"a": np.array([1.0, -2.0])}
    np.testing.assert_array_equal(add_gaussian_noise(summed, 0.0, 1.0, np.random.default_rng(0))["a"], [1.0, -2.0])


def test_private_mean_update_without_noise_is_mean_of_clipped_updates():
    updates = [{"w": np.array([3.0, 4.0])}, {"w": np.array([0.0, 1.0])}]
    mean, norms = private_mean_update(updates, clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    assert norms == [5.0, 1.0]
    # (0.6, 0.8) + (0, 1) over 2
    np.testing.assert_allclose(mean["w"], [0.3, 0.9])
    mean, _ = private_mean_update(updates, 1.0, 0.0, np.random.default_rng(0), denominator=4)
    np.testing.assert_allclose(mean["w"], [0.15, 0.45])


# ------------------------------------------------------------------ adaptive clipping


def test_adaptive_clip_single_step_is_the_geometric_update():
    clip = AdaptiveClipNorm(clipped_count_stddev=0.0, initial_clip_norm=1.0, target_unclipped_quantile=0.5,
                            clip_norm_lr=0.2)
    # one of four norms is <= 1: b = 0.25 < 0.5, so C grows by exp(0.2 * 0.25)
    new = clip.update([0.5, 2.0, 3.0, 4.0], np.random.default_rng(0))
    assert new == pytest.approx(math.exp(0.05))
    assert clip.clip_norm == new


@pytest.mark.parametrize("initial_clip_norm", [0.05, 20.0])
@pytest.mark.parametrize("target", [0.5, 0.9])
def test_adaptive_clip_converges_to_target_quantile(initial_clip_norm, target):
    rng = np.random.default_rng(0)
    norm_sigma, sites_per_round = 0.5, 100
    true_quantile = math.exp(norm_sigma * {0.5: 0.0, 0.9: 1.2815515655446004}[target])
    clip = AdaptiveClipNorm(clipped_count_stddev=sites_per_round / 20, initial_clip_norm=initial_clip_norm,
                            target_unclipped_quantile=target)
    history = []
    for _ in range(300):
        norms = rng.lognormal(0.0, norm_sigma, size=sites_per_round)
        history.append(clip.update(list(norms), rng))
    late = np.array(history[-100:])
    assert abs(math.log(np.median(late) / true_quantile)) < 0.1
    fresh = rng.lognormal(0.0, norm_sigma, size=100_000)
    assert np.mean(fresh <= np.median(late)) == pytest.approx(target, abs=0.05)


def test_adaptive_clip_count_noise_from_the_secure_source_has_the_configured_std():
    # Invert the geometric step to read off the noise added to the unclipped count, over many draws.
    count_std, lr, gamma, m = 2.0, 0.01, 0.5, 10.0
    rng = secure_random()
    noise = []
    for _ in range(4000):
        clip = AdaptiveClipNorm(clipped_count_stddev=count_std, initial_clip_norm=1.0, target_unclipped_quantile=gamma,
                                clip_norm_lr=lr)
        new = clip.update_from_count(4, m, rng)
        noise.append((gamma - math.log(new) / lr) * m - 4)
    noise = np.array(noise)
    assert abs(noise.mean()) < 5 * count_std / math.sqrt(noise.size)
    assert abs(noise.std() / count_std - 1.0) < 0.05
    assert len(np.unique(np.round(noise, 9))) == noise.size


def test_adaptive_clip_state_round_trip():
    clip = AdaptiveClipNorm(clipped_count_stddev=0.5, initial_clip_norm=0.3)
    clip.update([0.1, 0.2, 5.0], np.random.default_rng(0))
    other = AdaptiveClipNorm(clipped_count_stddev=9.0)
    other.load_state_dict(json.loads(json.dumps(clip.state_dict())))
    assert other.state_dict() == clip.state_dict()


def test_noise_multiplier_for_adaptive_clipping_keeps_total_privacy():
    sigma, sigma_b = 1.0, 1.0
    sigma_delta = noise_multiplier_for_adaptive_clipping(sigma, sigma_b)
    assert sigma_delta == pytest.approx(1 / math.sqrt(0.75))
    # Andrew et al. Thm 1: the pair costs as much as one Gaussian with the original multiplier.
    assert (sigma_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(sigma)
    assert noise_multiplier_for_adaptive_clipping(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        noise_multiplier_for_adaptive_clipping(2.0, 1.0)


# ------------------------------------------------------------------ accounting


def _independent_rdp_epsilon(history, delta):
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=t, orders=orders) for s, q, t in history)
    return rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def test_central_dp_epsilon_full_participation_matches_closed_form():
    # q = 1: T rounds of the Gaussian mechanism have RDP T * alpha / (2 sigma^2); convert with
    # Balle et al. (2020), Thm 21, exactly as Opacus does, minimised over the same orders.
    sigma, rounds, delta = 2.0, 10, 1e-5
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = rounds * alphas / (2 * sigma**2)
    eps = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    expected = float(np.nanmin(eps))
    assert central_dp_epsilon(sigma, 1.0, rounds, delta) == pytest.approx(expected, rel=1e-9)


def test_central_dp_epsilon_matches_opacus_analysis():
    sigma, q, rounds, delta = 1.1, 0.1, 50, 1e-5
    assert central_dp_epsilon(sigma, q, rounds, delta, "rdp") == pytest.approx(
        _independent_rdp_epsilon([(sigma, q, rounds)], delta), rel=1e-12
    )
    prv = PRVAccountant()
    for _ in range(rounds):
        prv.step(noise_multiplier=sigma, sample_rate=q)
    assert central_dp_epsilon(sigma, q, rounds, delta, "prv") == pytest.approx(prv.get_epsilon(delta=delta), rel=1e-9)
    # PRV is the tighter accountant.
    assert central_dp_epsilon(sigma, q, rounds, delta, "prv") < central_dp_epsilon(sigma, q, rounds, delta, "rdp")


def test_central_dp_epsilon_edge_cases():
    assert central_dp_epsilon(1.0, 0.5, 0, 1e-5) == 0.0
    assert central_dp_epsilon(0.0, 0.5, 3, 1e-5) == math.inf
    with pytest.raises(ValueError):
        central_dp_epsilon(1.0, 0.0, 3, 1e-5)
    with pytest.raises(ValueError):
        central_dp_epsilon(1.0, 0.5, 3, 0.0)
    with pytest.raises(ValueError):
        central_dp_epsilon(1.0, 0.5, 3, 1e-5, accountant="gdp")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_reaches_target(accountant):
    target, delta, q, rounds = 3.0, 1e-5, 0.2, 40
    sigma = calibrate_noise_multiplier(target, delta, q, rounds, accountant)
    eps = central_dp_epsilon(sigma, q, rounds, delta, accountant)
    assert eps <= target
    assert eps >= target - 0.05
    # and it is (nearly) the smallest such sigma
    assert central_dp_epsilon(sigma * 0.97, q, rounds, delta, accountant) > target


def test_unreachable_target_raises_with_the_inputs_in_the_message():
    with pytest.raises(ValueError) as info:
        calibrate_noise_multiplier(1e-4, 1e-5, 1.0, 1000)
    message = str(info.value)
    for part in ("target_epsilon=0.0001", "delta=1e-05", "rounds=1000", "sample_rate=1.0"):
        assert part in message
    # reachable with sigma ~ 4.6, but not under a cap of 2
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(1.0, 1e-5, 1.0, 1, max_noise_multiplier=2.0)


@pytest.mark.parametrize(
    "target, delta, q, rounds",
    [(0.0, 1e-5, 0.5, 10), (math.inf, 1e-5, 0.5, 10), (1.0, 0.0, 0.5, 10), (1.0, 1.0, 0.5, 10),
     (1.0, 1e-5, 0.0, 10), (1.0, 1e-5, 1.5, 10), (1.0, 1e-5, 0.5, 0)],
)
def test_invalid_calibration_inputs_raise(target, delta, q, rounds):
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(target, delta, q, rounds)


def test_ledger_reports_epsilon_after_every_round():
    ledger = PrivacyLedger(delta=1e-5)
    reported = [ledger.record_round(1.2, 0.3) for _ in range(5)]
    assert ledger.history == [(1.2, 0.3, 5)]
    for k, eps in enumerate(reported, start=1):
        assert eps == pytest.approx(_independent_rdp_epsilon([(1.2, 0.3, k)], 1e-5), rel=1e-12)
    assert all(b > a for a, b in zip(reported, reported[1:]))
    assert ledger.epsilons == reported and ledger.rounds == 5


def test_ledger_composes_heterogeneous_rounds():
    ledger = PrivacyLedger(delta=1e-6)
    ledger.record_round(1.0, 0.5)
    ledger.record_round(2.0, 0.25, steps=3)
    ledger.record_round(2.0, 0.25)
    assert ledger.history == [(1.0, 0.5, 1), (2.0, 0.25, 4)]
    expected = _independent_rdp_epsilon([(1.0, 0.5, 1), (2.0, 0.25, 4)], 1e-6)
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-12)
    assert ledger.epsilon(delta=1e-3) < ledger.epsilon()


def test_ledger_projection_does_not_record():
    ledger = PrivacyLedger(delta=1e-5)
    ledger.record_round(1.0, 0.5)
    projected = ledger.epsilon_if(1.0, 0.5)
    assert ledger.history == [(1.0, 0.5, 1)]
    assert projected == pytest.approx(ledger.record_round(1.0, 0.5))


def test_ledger_checkpoint_round_trip():
    ledger = PrivacyLedger(delta=1e-5, accountant="rdp")
    ledger.record_round(1.0, 0.5)
    ledger.record_round(0.8, 0.5)
    restored = PrivacyLedger(delta=0.1)
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.history == ledger.history
    assert restored.epsilon() == ledger.epsilon()
    assert restored.record_round(0.8, 0.5) == pytest.approx(epsilon_of_history([(1.0, 0.5, 1), (0.8, 0.5, 2)], 1e-5))
    with pytest.raises(ValueError, match="prv"):
        PrivacyLedger(delta=1e-5, accountant="prv").load_state_dict(ledger.state_dict())


# ------------------------------------------------------------------ FFA-LoRA


def test_freeze_lora_A_freezes_exactly_the_A_matrices():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    a_names = {n for n, _ in model.named_parameters() if ".lora_A." in n}
    b_names = {n for n, _ in model.named_parameters() if ".lora_B." in n}
    # 7 linear projections per layer x 2 layers
    assert len(a_names) == len(b_names) == 14
    expected = sum(p.numel() for n, p in model.named_parameters() if n in a_names)

    assert freeze_lora_A(model) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == b_names
    # idempotent
    assert freeze_lora_A(model) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == b_names
