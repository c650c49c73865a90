"""Central DP and DP-SGD wired into real (in-process) federations; accounting checked independently."""

import numpy as np
import pytest

from server.app import build_strategy
from server.privacy import CentralDP
from simulations.simulate import simulate


def test_noise_added_by_coordinator_has_std_sigma_c(make_cfg):
    cfg = make_cfg("privacy=central_dp", "privacy.central.clip_norm=0.5", "privacy.central.noise_multiplier=1.3")
    dp = CentralDP(cfg.privacy.central, num_sites=4, sites_per_round=4, rounds=1)
    zeros = [{"w": np.zeros(200_000)} for _ in range(4)]
    mean, report = dp.aggregate(zeros)
    noise_on_sum = mean["w"] * 4  # the mean divides the noisy sum by the expected number of sites
    assert np.std(noise_on_sum) == pytest.approx(1.3 * 0.5, rel=0.05)
    assert abs(np.mean(noise_on_sum)) < 0.01


def test_clipped_site_cannot_move_the_mean_more_than_c_over_m(make_cfg):
    cfg = make_cfg("privacy=central_dp", "privacy.central.clip_norm=0.5", "privacy.central.noise_multiplier=0.0")
    dp = CentralDP(cfg.privacy.central, num_sites=4, sites_per_round=4, rounds=1)
    huge = {"w": np.full(10, 1e6)}
    mean, report = dp.aggregate([huge, {"w": np.zeros(10)}, {"w": np.zeros(10)}, {"w": np.zeros(10)}])
    assert np.linalg.norm(mean["w"]) == pytest.approx(0.5 / 4)
    assert report["clipped_sites"] == 1


def test_unreachable_target_epsilon_refuses_to_start(make_cfg):
    # Refused where the config is composed (federation.validation), before any run can start.
    with pytest.raises(ValueError, match="privacy.central.target_epsilon: privacy target unreachable"):
        make_cfg("privacy=central_dp", "privacy.central.target_epsilon=0.0001", "privacy.central.delta=1e-5",
                 "privacy.central.max_noise_multiplier=5", "federation.rounds=50")


def test_target_epsilon_is_met_by_calibrated_noise(make_cfg):
    cfg = make_cfg("privacy=central_dp", "privacy.central.target_epsilon=8", "federation.rounds=5",
                   "federation.num_clients=10", "strategy.fraction_train=0.3")
    dp = build_strategy(cfg).central_dp
    assert dp.sample_rate == pytest.approx(0.3)
    from federation.privacy import central_dp_epsilon

    eps = central_dp_epsilon(dp.noise_multiplier, 0.3, 5, 1e-5, "rdp")
    assert eps <= 8 and eps > 8 * 0.95


def test_central_dp_run_reports_epsilon_matching_opacus(make_cfg):
    from opacus.accountants import RDPAccountant

    cfg = make_cfg("privacy=central_dp", "privacy.central.noise_multiplier=1.1", "federation.num_clients=3",
                   "federation.rounds=3")
    rows = simulate(cfg, engine="inprocess")
    independent = RDPAccountant()
    for row in rows[1:]:
        independent.step(noise_multiplier=1.1, sample_rate=1.0)
        assert row["epsilon"] == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
        assert row["privacy"]["noise_multiplier"] == 1.1 and row["privacy"]["delta"] == 1e-5
    assert rows[1]["epsilon"] < rows[2]["epsilon"] < rows[3]["epsilon"]


def test_dp_sgd_sites_report_finite_growing_epsilon(make_cfg):
    cfg = make_cfg("privacy=dp_sgd", "privacy.local_dp_sgd.noise_multiplier=1.0", "federation.num_clients=2",
                   "federation.rounds=2")
    rows = simulate(cfg, engine="inprocess")
    eps = [r["local_dp_epsilon"] for r in rows[1:]]
    assert all(e is not None and np.isfinite(e) for e in eps)
    assert eps[1] > eps[0] > 0
    assert all(r["clients_ok"] == 2 for r in rows[1:])
    assert rows[-1]["adapter_digest"] != rows[0]["adapter_digest"], "DP-SGD did not change the adapter"
