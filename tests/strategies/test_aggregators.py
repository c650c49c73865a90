"""The per-round aggregator interface: factory, rank checks, and each rule's new global adapter."""

import io
import re

import numpy as np
import pytest

from strategies.aggregators import (
    AdapterAggregator,
    FedAdamAggregator,
    FedAvgAggregator,
    FedExLoRAAggregator,
    MixedRanksError,
    RobustAggregator,
    build_aggregator,
    check_uniform_ranks,
    valid_aggregator_names,
)
from strategies.fedavg import UpdateRejected, weighted_mean
from strategies.lora_exact import dense_updates, weighted_dense_mean
from strategies.robust import coordinate_median
from strategies.server_opt import FedAdam

P = "model.layers.0.self_attn.v_proj"
A, B = f"{P}.lora_A.weight", f"{P}.lora_B.weight"
SITES = ["hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e"]
ROBUST_PARAMS = {"norm_bound": {"max_norm": 1.0}, "krum": {"num_malicious": 1},
                 "multi_krum": {"num_malicious": 1, "multi_k": 2}}


def adapter(rng, rank=2, scale=1.0):
    return {A: scale * rng.normal(size=(rank, 4)), B: scale * rng.normal(size=(3, rank))}


def every_aggregator():
    return [build_aggregator(name, ROBUST_PARAMS.get(name, {})) for name in valid_aggregator_names()]


def test_all_names_build_objects_that_follow_the_protocol():
    assert {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "ffa_lora", "fedex_lora",
            "median", "trimmed_mean", "krum", "multi_krum", "norm_bound"} == set(valid_aggregator_names())
    for aggregator in every_aggregator():
        assert isinstance(aggregator, AdapterAggregator)


def test_factory_errors_are_clear():
    with pytest.raises(ValueError, match="unknown aggregator 'fedsgd'.*fedavg.*krum"):
        build_aggregator("fedsgd", {})
    with pytest.raises(ValueError, match="'fedadam' takes.*unknown \\['lr'\\]"):
        build_aggregator("fedadam", {"lr": 0.1})
    with pytest.raises(ValueError, match="missing \\['num_malicious'\\]"):
        build_aggregator("krum", {})
    inner = build_aggregator("median", {"inner": "fedadam", "inner_params": {"eta": 0.5}})
    assert inner.name == "median+fedadam" and inner.inner.optimizer.eta == 0.5


def test_fedavg_hand_computed_and_keeps_dtype():
    global_adapter = {A: np.ones((1, 2), dtype=np.float32), B: np.zeros((2, 1), dtype=np.float32)}
    updates = [{A: np.full((1, 2), 1.0), B: np.full((2, 1), 4.0)}, {A: np.full((1, 2), 3.0), B: np.zeros((2, 1))}]
    new = FedAvgAggregator().aggregate(global_adapter, updates, [1.0, 3.0], SITES[:2])
    np.testing.assert_array_equal(new[A], [[3.5, 3.5]])  # 1 + (1 + 9) / 4
    np.testing.assert_array_equal(new[B], [[1.0], [1.0]])
    assert new[A].dtype == np.float32


def test_mixed_ranks_are_refused_naming_sites_and_ranks():
    rng = np.random.default_rng(0)
    global_adapter = adapter(rng, rank=2)
    updates = [adapter(rng, 2), adapter(rng, 4), adapter(rng, 2)]
    with pytest.raises(MixedRanksError, match=f"{P}.*'hospital-a' r=2, site 'hospital-b' r=4"):
        check_uniform_ranks(updates, SITES[:3])
    for aggregator in every_aggregator():
        assert aggregator.supports_mixed_ranks is False
        with pytest.raises(MixedRanksError, match=re.escape(f"aggregator '{aggregator.name}'")):
            aggregator.aggregate(global_adapter, updates, [1, 1, 1], SITES[:3])


def test_bad_updates_are_rejected_naming_the_site():
    rng = np.random.default_rng(1)
    global_adapter = adapter(rng)
    bad = adapter(rng)
    bad[A][0, 0] = np.nan
    with pytest.raises(UpdateRejected, match="'hospital-b'.*non-finite"):
        FedAvgAggregator().aggregate(global_adapter, [adapter(rng), bad], [1, 1], SITES[:2])
    with pytest.raises(ValueError, match="2 updates, 1 weights"):
        FedAvgAggregator().aggregate(global_adapter, [adapter(rng), adapter(rng)], [1], SITES[:2])


def test_fedadam_aggregator_steps_on_the_weighted_mean_and_checkpoints():
    rng = np.random.default_rng(2)
    global_adapter = adapter(rng)
    rounds = [[adapter(rng, scale=0.1) for _ in range(3)] for _ in range(3)]
    reference, aggregator = FedAdam(eta=0.05), FedAdamAggregator(eta=0.05)
    expected = got = global_adapter
    for updates in rounds[:2]:
        expected = reference.step(expected, weighted_mean(updates, [1, 2, 3]))
        got = aggregator.aggregate(got, updates, [1, 2, 3], SITES[:3])
    buffer = io.BytesIO()
    np.savez(buffer, **aggregator.state_dict())
    buffer.seek(0)
    restored = build_aggregator("fedadam", {"eta": 0.05})
    with np.load(buffer) as loaded:
        restored.load_state_dict({k: loaded[k] for k in loaded.files})
    expected = reference.step(expected, weighted_mean(rounds[2], [1, 2, 3]))
    got_restored = restored.aggregate(got, rounds[2], [1, 2, 3], SITES[:3])
    got = aggregator.aggregate(got, rounds[2], [1, 2, 3], SITES[:3])
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
        np.testing.assert_array_equal(got_restored[key], expected[key])


def test_ffa_lora_aggregator_averages_b_and_refuses_moved_a():
    rng = np.random.default_rng(3)
    global_adapter = adapter(rng)
    updates = [{A: np.zeros((2, 4)), B: rng.normal(size=(3, 2))} for _ in range(3)]
    new = build_aggregator("ffa_lora", {}).aggregate(global_adapter, updates, [1, 1, 2], SITES[:3])
    np.testing.assert_array_equal(new[A], global_adapter[A])
    np.testing.assert_allclose(new[B], global_adapter[B] + (updates[0][B] + updates[1][B] + 2 * updates[2][B]) / 4,
                               atol=1e-15)
    updates[2][A] = updates[2][A] + 1e-3
    with pytest.raises(ValueError, match="'hospital-c' differs from 'hospital-a'"):
        build_aggregator("ffa_lora", {}).aggregate(global_adapter, updates, [1, 1, 2], SITES[:3])


def test_fedex_aggregator_residual_merges_to_the_exact_mean():
    rng = np.random.default_rng(4)
    global_adapter = adapter(rng)
    updates = [adapter(rng, scale=0.5) for _ in range(3)]
    weights, scaling = [3, 1, 1], 2.0
    aggregator = FedExLoRAAggregator(scaling=scaling)
    new = aggregator.aggregate(global_adapter, updates, weights, SITES[:3])
    locals_ = [{k: global_adapter[k] + u[k] for k in u} for u in updates]
    np.testing.assert_allclose(new[A], weighted_mean(locals_, weights)[A], atol=1e-15)
    base = rng.normal(size=(3, 4))
    merged = base + aggregator.last_residual[P] + dense_updates(new, scaling)[P]
    exact = base + weighted_dense_mean(locals_, weights, [scaling] * 3)[P]
    np.testing.assert_allclose(merged, exact, rtol=0, atol=1e-10)
    assert np.abs(aggregator.last_residual[P]).max() > 1e-3


def attacked_round(seed=5):
    rng = np.random.default_rng(seed)
    global_adapter = adapter(rng)
    direction = adapter(rng, scale=0.1)
    updates = [{k: v + 1e-3 * rng.normal(size=v.shape) for k, v in direction.items()} for _ in range(4)]
    updates.append({k: -100.0 * v for k, v in direction.items()})
    return global_adapter, updates, weighted_mean(updates[:4], [1] * 4)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multi_krum"])
def test_robust_aggregators_stay_near_the_honest_update(name):
    global_adapter, updates, honest = attacked_round()
    target = {k: global_adapter[k] + honest[k] for k in honest}
    robust = build_aggregator(name, ROBUST_PARAMS.get(name, {}))
    new = robust.aggregate(global_adapter, updates, [1] * 5, SITES)
    plain = FedAvgAggregator().aggregate(global_adapter, updates, [1] * 5, SITES)
    for key in target:
        assert np.abs(new[key] - target[key]).max() < 0.01
        assert np.abs(plain[key] - target[key]).max() > 1.0
    if "krum" in name:
        assert "hospital-e" not in robust.last_selected_sites


def test_norm_bound_then_fedavg_clips_each_site():
    rng = np.random.default_rng(6)
    global_adapter = adapter(rng)
    updates = [{A: np.full((2, 4), 3.0 / np.sqrt(8)), B: np.full((3, 2), 4.0 / np.sqrt(6))}, adapter(rng, scale=0.0)]
    new = build_aggregator("norm_bound", {"max_norm": 1.0}).aggregate(global_adapter, updates, [1, 1], SITES[:2])
    # Site a has norm 5, clipped to 1, then averaged with a zero update.
    np.testing.assert_allclose(new[A] - global_adapter[A], 0.5 * 0.2 * 3.0 / np.sqrt(8), atol=1e-15)
    np.testing.assert_allclose(new[B] - global_adapter[B], 0.5 * 0.2 * 4.0 / np.sqrt(6), atol=1e-15)


def test_median_feeds_the_inner_server_optimizer():
    global_adapter, updates, _ = attacked_round(7)
    robust = RobustAggregator(FedAdamAggregator(eta=0.1), "median")
    new = robust.aggregate(global_adapter, updates, [1] * 5, SITES)
    expected = FedAdam(eta=0.1).step(global_adapter, coordinate_median(updates))
    for key in expected:
        np.testing.assert_array_equal(new[key], expected[key])
    assert robust.state_dict()["step"] == 1


def test_statistics_cannot_feed_fedex():
    with pytest.raises(ValueError, match="cannot feed 'fedex_lora'"):
        build_aggregator("median", {"inner": "fedex_lora"})
    krum_fedex = build_aggregator("multi_krum", {"num_malicious": 1, "multi_k": 3, "inner": "fedex_lora"})
    global_adapter, updates, _ = attacked_round(8)
    krum_fedex.aggregate(global_adapter, updates, [1] * 5, SITES)
    assert set(krum_fedex.last_residual) == {P}
