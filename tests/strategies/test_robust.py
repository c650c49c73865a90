"""Robust aggregation: hand-computed statistics, and resistance to one x100 or sign-flipped site."""

import numpy as np
import pytest

from strategies.fedavg import weighted_mean
from strategies.robust import (
    coordinate_median,
    coordinate_trimmed_mean,
    flatten_adapter,
    krum,
    krum_scores,
    norm_bound,
    update_norm,
)


def scalars(*values):
    return [{"w": np.array([float(v)])} for v in values]


def test_flatten_and_norm_use_all_keys():
    update = {"b": np.array([[4.0]]), "a": np.array([3.0])}
    np.testing.assert_array_equal(flatten_adapter(update), [3.0, 4.0])
    assert update_norm(update) == 5.0


def test_norm_bound_scales_only_large_updates():
    big = {"a": np.array([3.0]), "b": np.array([4.0])}
    small = {"a": np.array([0.3]), "b": np.array([0.4])}
    clipped, untouched = norm_bound([big, small], max_norm=1.0)
    np.testing.assert_allclose(clipped["a"], [0.6], atol=1e-15)
    np.testing.assert_allclose(clipped["b"], [0.8], atol=1e-15)
    np.testing.assert_array_equal(untouched["a"], [0.3])
    with pytest.raises(ValueError, match="max_norm"):
        norm_bound([big], 0.0)


def test_trimmed_mean_hand_computed():
    assert coordinate_trimmed_mean(scalars(1, 2, 3, 4, 100), 0.2)["w"][0] == 3.0
    # int(0.1 * 5) = 0: nothing trimmed, plain mean.
    assert coordinate_trimmed_mean(scalars(1, 2, 3, 4, 100), 0.1)["w"][0] == 22.0
    with pytest.raises(ValueError, match="trim_fraction"):
        coordinate_trimmed_mean(scalars(1, 2), 0.5)


def test_trimmed_mean_is_per_coordinate():
    updates = [{"w": np.array([1.0, 50.0])}, {"w": np.array([2.0, -9.0])}, {"w": np.array([90.0, 3.0])}]
    np.testing.assert_array_equal(coordinate_trimmed_mean(updates, 0.34)["w"], [2.0, 3.0])


def test_median_hand_computed():
    assert coordinate_median(scalars(1, 2, 3, 4, 100))["w"][0] == 3.0
    assert coordinate_median(scalars(1, 2, 3, 100))["w"][0] == 2.5


def test_krum_hand_computed():
    updates = scalars(0, 1, 2.5, 4, 100)
    # n=5, f=1: each score sums the 2 smallest squared distances to the others.
    np.testing.assert_allclose(krum_scores(updates, 1)[:4], [1 + 6.25, 1 + 2.25, 2.25 + 2.25, 2.25 + 9])
    selected, chosen = krum(updates, num_malicious=1)
    assert selected == [1] and chosen["w"][0] == 1.0
    selected, chosen = krum(updates, num_malicious=1, multi_k=3)
    assert selected == [1, 2, 0]
    assert chosen["w"][0] == pytest.approx(3.5 / 3, abs=1e-15)
    selected, chosen = krum(updates, num_malicious=1, multi_k=2, weights=[1, 1, 3, 1, 1])
    assert chosen["w"][0] == pytest.approx((1 + 3 * 2.5) / 4, abs=1e-15)


def test_krum_argument_checks():
    with pytest.raises(ValueError, match="multi_k"):
        krum(scalars(0, 1, 2), 0, multi_k=4)
    with pytest.raises(ValueError, match="at least 2"):
        krum(scalars(0), 0)
    with pytest.raises(ValueError, match="shape"):
        krum([{"w": np.zeros(2)}, {"w": np.zeros(3)}], 0)


def honest_and_attacker(attack, seed=0, honest=6):
    rng = np.random.default_rng(seed)
    direction = {"x.lora_A.weight": rng.normal(size=(2, 8)), "x.lora_B.weight": rng.normal(size=(6, 2))}
    updates = [{k: v + 0.01 * rng.normal(size=v.shape) for k, v in direction.items()} for _ in range(honest)]
    honest_mean = weighted_mean(updates, [1.0] * honest)
    victim = updates[0]
    bad = {k: (100.0 * v if attack == "x100" else -v) for k, v in victim.items()}
    return updates + [bad], honest_mean


def relative_error(result, reference):
    return np.linalg.norm(flatten_adapter(result) - flatten_adapter(reference)) / np.linalg.norm(
        flatten_adapter(reference)
    )


@pytest.mark.parametrize("attack", ["x100", "sign_flip"])
def test_robust_statistics_resist_one_attacker_while_fedavg_does_not(attack):
    updates, honest_mean = honest_and_attacker(attack)
    assert relative_error(weighted_mean(updates, [1.0] * len(updates)), honest_mean) > 0.25
    assert relative_error(coordinate_median(updates), honest_mean) < 0.05
    assert relative_error(coordinate_trimmed_mean(updates, 0.15), honest_mean) < 0.05
    selected, chosen = krum(updates, num_malicious=1)
    assert 6 not in selected and relative_error(chosen, honest_mean) < 0.05
    selected, chosen = krum(updates, num_malicious=1, multi_k=4)
    assert 6 not in selected and relative_error(chosen, honest_mean) < 0.05


def test_norm_bound_limits_a_x100_attacker():
    updates, honest_mean = honest_and_attacker("x100")
    max_norm = update_norm(honest_mean) * 1.1
    bounded = norm_bound(updates, max_norm)
    assert max(update_norm(u) for u in bounded) <= max_norm * (1 + 1e-12)
    assert relative_error(weighted_mean(bounded, [1.0] * len(bounded)), honest_mean) < 0.05
