"""Central DP and DP-SGD wired into real (in-process) federations; accounting checked independently."""

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MessageType

import client.app as client_app
from federation.privacy import clip_update
from federation.store import read_peft_adapter
from server.app import build_strategy, run_federation
from server.privacy import CentralDP
from server.replies import TRAIN_REPLY, decode_train_reply
from simulations.inprocess import InProcessGrid
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


# ------------------------------------------------------------------ noise nobody can predict or replay


def test_two_coordinators_with_identical_configs_draw_different_noise(make_cfg):
    cfg = make_cfg("privacy=central_dp")
    zeros = [{"w": np.zeros(1000)} for _ in range(2)]
    first, second = (CentralDP(cfg.privacy.central, 2, 2, 1).aggregate(zeros)[0]["w"] for _ in range(2))
    assert not np.array_equal(first, second)


def test_two_secagg_dp_rounds_with_identical_sites_draw_different_noise():
    from federation.config import CentralDPConfig
    from server.secagg import secagg_train_round
    from tests.server.test_secagg import GLOBAL, PARAMS, StageDropGrid, stub_train
    from client.secagg import make_secagg_app

    means = []
    for _ in range(2):
        dp = CentralDP(CentralDPConfig(enabled=True, clip_norm=0.05, noise_multiplier=1.0), num_sites=3,
                       sites_per_round=3, rounds=1)
        result = secagg_train_round(StageDropGrid(make_secagg_app(stub_train), 3), 1, GLOBAL, "{}", PARAMS,
                                    timeout=30, central_dp=dp)
        assert result.error is None
        means.append(result.mean_delta)
    assert all(not np.array_equal(means[0][key], means[1][key]) for key in GLOBAL)


def test_privacy_state_holds_no_randomness_and_old_checkpoints_with_rng_still_load(make_cfg):
    cfg = make_cfg("privacy=central_dp_adaptive")
    dp = CentralDP(cfg.privacy.central, num_sites=4, sites_per_round=4, rounds=3)
    dp.aggregate([{"w": np.full(10, float(k))} for k in range(4)])
    state = json.loads(json.dumps(dp.state_dict()))
    assert set(state) == {"ledger", "clip_norm", "adaptive", "noise_multiplier"}
    assert not _generator_state_in(json.dumps(state))
    older = {**state, "rng": np.random.default_rng(0).bit_generator.state}  # what earlier versions saved
    resumed = CentralDP(cfg.privacy.central, num_sites=4, sites_per_round=4, rounds=3)
    resumed.load_state_dict(older)
    assert resumed.state_dict() == state


def test_the_schema_has_no_noise_seed(make_cfg):
    assert "seed" not in dataclasses.asdict(make_cfg("privacy=central_dp").privacy.central)
    with pytest.raises(Exception, match="seed"):
        make_cfg("privacy=central_dp", "privacy.central.seed=0")


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every message the coordinator sends and every reply it gets."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += messages
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.received += replies
        return replies


def _run(make_cfg, tmp_path, name: str, *overrides: str) -> tuple[list[dict], RecordingGrid, Path]:
    cfg = make_cfg("federation.num_clients=2", "federation.rounds=1", "federation.evaluate_before_training=false",
                   *overrides)
    cfg.output_dir = str(tmp_path / name)
    grid = RecordingGrid(client_app.app, cfg.federation.num_clients)
    return run_federation(grid, cfg), grid, Path(cfg.output_dir)


def test_dp_runs_with_identical_configs_differ_while_runs_without_dp_are_bit_identical(make_cfg, tmp_path):
    plain = [_run(make_cfg, tmp_path, f"plain-{i}")[0] for i in range(2)]
    assert [r["adapter_digest"] for r in plain[0]] == [r["adapter_digest"] for r in plain[1]]
    dp = [_run(make_cfg, tmp_path, f"dp-{i}", "privacy=central_dp")[0] for i in range(2)]
    assert dp[0][-1]["start_adapter_digest"] == dp[1][-1]["start_adapter_digest"]  # same start, same seeds
    assert dp[0][-1]["adapter_digest"] != dp[1][-1]["adapter_digest"]


_GENERATOR_STATE = re.compile(r'(?i)"rng"|bit_generator|pcg64|has_uint32|"inc"|"uinteger"|python_random_state')


def _generator_state_in(text: str) -> bool:
    return bool(_GENERATOR_STATE.search(text))


def _texts_written(run_dir: Path) -> dict[str, str]:
    """Every file of the run as searchable text: text files whole, safetensors/npz by their names and metadata."""
    from safetensors import safe_open

    texts = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        if path.suffix == ".safetensors":
            with safe_open(str(path), "np") as fh:
                texts[str(path)] = json.dumps([list(fh.keys()), fh.metadata()])
        elif path.suffix == ".npz":
            texts[str(path)] = json.dumps(list(np.load(path).keys()))
        elif path.suffix == ".png":
            continue  # the loss plot
        else:
            texts[str(path)] = path.read_text()  # an unexpected binary file fails here, to be looked at
    return texts


def _texts_sent(grid: RecordingGrid) -> list[str]:
    """Everything the coordinator sent to sites, except the adapter weights themselves (their names are kept)."""
    texts = []
    for msg in grid.sent:
        for record in msg.content.config_records.values():
            texts.append(json.dumps({key: str(value) for key, value in record.items()}))
        texts += [json.dumps(list(record.keys())) for record in msg.content.array_records.values()]
    return texts


def _noise_removed_with_seed(grid: RecordingGrid, run_dir: Path, seed: int, sigma: float, clip: float,
                             expected_sites: float) -> np.ndarray:
    """The review's attack: noisy sum from the released adapters minus numpy noise regenerated from `seed`;
    returns what is left minus the sites' true clipped sum, per coordinate."""
    before = read_peft_adapter(run_dir / "checkpoints" / "round-0000")
    after = read_peft_adapter(run_dir / "checkpoints" / "round-0001")
    deltas = [decode_train_reply(m, TRAIN_REPLY, "site")[0] for m in grid.received if m.metadata.message_type == MessageType.TRAIN]
    clipped_sum = {key: sum(clip_update(d, clip)[0][key] for d in deltas) for key in deltas[0]}
    regenerated = np.random.default_rng(seed)  # drawn in the order the coordinator drew them
    errors = [((after[key].astype(np.float64) - before[key]) * expected_sites
               - regenerated.normal(0.0, sigma * clip, size=np.shape(value)) - value).ravel()
              for key, value in clipped_sum.items()]
    return np.concatenate(errors)


def test_the_reviews_noise_subtraction_attack_fails(make_cfg, tmp_path, monkeypatch, caplog):
    sigma, clip = 1.0, 0.5
    overrides = ("privacy=central_dp", f"privacy.central.noise_multiplier={sigma}", f"privacy.central.clip_norm={clip}")
    # The attack is real: against a coordinator that seeds numpy with 0 (as before), it recovers the clipped sum.
    with monkeypatch.context() as patch:
        patch.setattr("server.privacy.secure_random", lambda: np.random.default_rng(0))
        _, seeded_grid, seeded_dir = _run(make_cfg, tmp_path, "seeded", *overrides)
    assert np.abs(_noise_removed_with_seed(seeded_grid, seeded_dir, 0, sigma, clip, 2.0)).max() < 1e-5

    with caplog.at_level(logging.INFO):
        _, grid, run_dir = _run(make_cfg, tmp_path, "secure", *overrides)
    assert sum("not reproducible by design" in r.getMessage() for r in caplog.records) == 1

    # Nothing written or sent holds a generator's state or a noise seed.
    written, sent = _texts_written(run_dir), _texts_sent(grid)
    assert any(path.endswith("server_state.json") for path in written) and sent
    assert not [path for path, text in written.items() if _generator_state_in(text)]
    assert not [text for text in sent if _generator_state_in(text)]
    config = json.loads((run_dir / "config.json").read_text())
    assert "seed" not in config["privacy"]["central"]
    # The run config travels to each site once (server/run_config_once.py); later messages name it by hash.
    run_configs = [json.loads(str(m.content["config"][client_app.RUN_CONFIG_KEY])) for m in grid.sent
                   if client_app.RUN_CONFIG_KEY in m.content["config"]]
    assert run_configs and all("seed" not in c["privacy"]["central"] for c in run_configs)

    # Regenerating numpy noise from seed 0 (the old default) or any seed in the config leaves noise of
    # std sqrt(2) sigma C on every coordinate instead of recovering the clipped sum.
    config_seeds = {v for k, v in _items(config) if k == "seed"}
    for seed in sorted(config_seeds | set(range(8))):
        error = _noise_removed_with_seed(grid, run_dir, seed, sigma, clip, 2.0)
        assert np.sqrt(np.mean(error**2)) > 0.5 * sigma * clip, seed


def _items(tree):
    """(key, value) of every entry of a nested JSON object."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _items(value)
        else:
            yield key, value
