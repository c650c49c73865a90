"""Server optimizers: hand-computed steps, parity with Flower's strategies, checkpoint round trips."""

import io

import numpy as np
import pytest

from strategies.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi

KEY = "layer.lora_B.weight"


def one(value):
    return {KEY: np.array([value], dtype=np.float64)}


def test_fedavgm_without_momentum_is_global_plus_lr_times_delta():
    optimizer = FedAvgM(server_lr=0.5, momentum=0.0)
    assert optimizer.step(one(1.0), one(2.0))[KEY][0] == 2.0


def test_fedavgm_momentum_hand_computed():
    optimizer = FedAvgM(server_lr=0.5, momentum=0.9)
    # Round 1: buf = -2 (first pseudo-gradient), new = 1 + 0.5 * 2 = 2.
    first = optimizer.step(one(1.0), one(2.0))
    assert first[KEY][0] == 2.0
    # Round 2: buf = 0.9 * -2 - 4 = -5.8, new = 2 + 0.5 * 5.8 = 4.9.
    second = optimizer.step(first, one(4.0))
    assert second[KEY][0] == pytest.approx(4.9, abs=1e-15)


def test_fedadam_first_step_hand_computed():
    eta, beta_1, beta_2, tau = 0.1, 0.9, 0.99, 1e-3
    new = FedAdam(eta, beta_1, beta_2, tau).step(one(0.0), one(0.5))
    m, v = 0.1 * 0.5, 0.01 * 0.25  # (1 - b1) d, (1 - b2) d^2
    # Flower's bias correction uses exponent server_round + 1 = 2 on the first round.
    step_size = eta * np.sqrt(1 - beta_2**2) / (1 - beta_1**2)
    assert new[KEY][0] == pytest.approx(step_size * m / (np.sqrt(v) + tau), rel=1e-14)


def test_fedyogi_first_step_hand_computed():
    new = FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3).step(one(0.0), one(0.5))
    # v = 0 - 0.01 * 0.25 * sign(0 - 0.25) = +0.0025, m = 0.05, no bias correction.
    assert new[KEY][0] == pytest.approx(0.01 * 0.05 / (0.05 + 1e-3), rel=1e-14)


def test_fedyogi_second_moment_decreases_toward_small_deltas():
    optimizer = FedYogi()
    optimizer.step(one(0.0), one(1.0))
    before = optimizer.v_t[KEY][0]
    optimizer.step(one(0.0), one(0.1))
    # sign(v - d^2) > 0 so v shrinks by (1 - b2) d^2 = 0.01 * 0.01.
    assert optimizer.v_t[KEY][0] == pytest.approx(before - 0.01 * 0.01, abs=1e-15)


def test_fedadagrad_accumulates_squares():
    optimizer = FedAdagrad(eta=0.1, tau=1e-3)
    first = optimizer.step(one(0.0), one(0.5))
    assert first[KEY][0] == pytest.approx(0.1 * 0.5 / (0.5 + 1e-3), rel=1e-14)
    second = optimizer.step(first, one(1.0))
    # m = d (beta_1 = 0), v = 0.25 + 1.
    assert second[KEY][0] == pytest.approx(first[KEY][0] + 0.1 * 1.0 / (np.sqrt(1.25) + 1e-3), rel=1e-14)


def test_global_dtype_is_kept():
    out = FedAdam().step({KEY: np.zeros(2, dtype=np.float32)}, {KEY: np.ones(2)})
    assert out[KEY].dtype == np.float32


def test_mismatched_delta_keys_raise():
    with pytest.raises(ValueError, match="missing"):
        FedAdam().step(one(0.0), {"other": np.zeros(1)})


OPTIMIZERS = [
    lambda: FedAvgM(server_lr=0.7, momentum=0.9),
    lambda: FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
    lambda: FedYogi(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2),
    lambda: FedAdagrad(eta=0.1, tau=1e-3),
]


def adapter(rng):
    return {"a.lora_A.weight": rng.normal(size=(2, 3)), "a.lora_B.weight": rng.normal(size=(4, 2))}


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_state_round_trip_through_savez_gives_identical_next_update(make):
    rng = np.random.default_rng(0)
    global_adapter = adapter(rng)
    original = make()
    for _ in range(2):
        global_adapter = original.step(global_adapter, adapter(rng))
    state = original.state_dict()
    assert all(isinstance(v, (np.ndarray, int, float)) for v in state.values())
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    restored = make()
    with np.load(buffer) as loaded:
        restored.load_state_dict({key: loaded[key] for key in loaded.files})
    assert restored.step_count == original.step_count == 2
    next_delta = adapter(rng)
    expected = original.step(global_adapter, next_delta)
    got = restored.step(global_adapter, next_delta)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_fresh_state_round_trip(make):
    rng = np.random.default_rng(1)
    global_adapter, delta = adapter(rng), adapter(rng)
    restored = make()
    restored.load_state_dict(make().state_dict())
    expected = make().step(global_adapter, delta)
    got = restored.step(global_adapter, delta)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


@pytest.fixture
def flower_task_identity(monkeypatch):
    # Flower Messages read the running task's identity; set it only for this test.
    from flwr.supercore.task_identity import TaskIdentity

    for attribute in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


@pytest.mark.parametrize("name", ["FedAvgM", "FedAdam", "FedYogi", "FedAdagrad"])
def test_matches_flower_strategies_over_three_rounds(name, flower_task_identity):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import strategy as flower

    ours, theirs = {
        "FedAvgM": (FedAvgM(server_lr=0.7, momentum=0.9), flower.FedAvgM(server_learning_rate=0.7, server_momentum=0.9)),
        "FedAdam": (FedAdam(eta=0.1, beta_1=0.8, beta_2=0.95, tau=1e-2),
                    flower.FedAdam(eta=0.1, beta_1=0.8, beta_2=0.95, tau=1e-2)),
        "FedYogi": (FedYogi(eta=0.1, beta_1=0.8, beta_2=0.95, tau=1e-2),
                    flower.FedYogi(eta=0.1, beta_1=0.8, beta_2=0.95, tau=1e-2)),
        "FedAdagrad": (FedAdagrad(eta=0.1, tau=1e-2), flower.FedAdagrad(eta=0.1, tau=1e-2)),
    }[name]
    rng = np.random.default_rng(2)
    global_ours = adapter(rng)
    global_flower = {key: value.copy() for key, value in global_ours.items()}
    num_examples = [3, 5]
    for server_round in (1, 2, 3):
        deltas = [adapter(rng) for _ in num_examples]
        mean_delta = {key: sum(n * d[key] for n, d in zip(num_examples, deltas)) / sum(num_examples) for key in deltas[0]}
        global_ours = ours.step(global_ours, mean_delta)
        # Flower strategies see full local models and remember the current global themselves.
        if name == "FedAvgM":
            if theirs.current_arrays is None:
                theirs.current_arrays = ArrayRecord({k: Array(v) for k, v in global_flower.items()})
        else:
            theirs.current_arrays = {k: v.copy() for k, v in global_flower.items()}
        replies = [
            Message(
                RecordDict({
                    "arrays": ArrayRecord({k: Array(global_flower[k] + d[k]) for k in d}),
                    "metrics": MetricRecord({"num-examples": n}),
                }),
                dst_node_id=0,
                message_type="train",
            )
            for n, d in zip(num_examples, deltas)
        ]
        record, _ = theirs.aggregate_train(server_round, replies)
        global_flower = {key: record[key].numpy() for key in global_flower}
        for key in global_ours:
            np.testing.assert_allclose(global_ours[key], global_flower[key], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- variant: flower | paper, against hand-written formulas

def _reference_run(kind, variant, deltas, x0, eta, beta_1, beta_2, tau):
    """Hand-written, one coordinate-wise loop per formula: Flower 1.41 (v0 = 0, FedAdam bias-corrected) or
    Reddi et al. 2021 Algorithm 2 (v_{-1} = tau^2, no bias correction)."""
    x = np.array(x0, dtype=np.float64)
    m = np.zeros_like(x)
    v = np.zeros_like(x) if variant == "flower" else np.full_like(x, tau**2)
    for t, d in enumerate(deltas, start=1):
        d = np.asarray(d, dtype=np.float64)
        m = beta_1 * m + (1.0 - beta_1) * d
        if kind == "adam":
            v = beta_2 * v + (1.0 - beta_2) * d**2
        elif kind == "yogi":
            v = v - (1.0 - beta_2) * d**2 * np.sign(v - d**2)
        else:
            v = v + d**2
        step = eta
        if kind == "adam" and variant == "flower":
            # Flower 1.41 bias-corrects with exponent r + 1 in its 1-based server round r
            step = eta * np.sqrt(1.0 - beta_2 ** float(t + 1)) / (1.0 - beta_1 ** float(t + 1))
        x = x + step * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("variant", ["flower", "paper"])
@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_server_optimizer_variants_follow_their_formula_exactly(kind, variant):
    from strategies.server_opt import FedAdagrad, FedAdam, FedYogi

    rng = np.random.default_rng(7)
    x0 = rng.normal(size=(3, 4))
    deltas = [rng.normal(scale=0.1, size=(3, 4)) for _ in range(4)]
    eta, beta_1, beta_2, tau = 0.05, 0.9, 0.99, 1e-3
    if kind == "adam":
        opt = FedAdam(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, variant=variant)
    elif kind == "yogi":
        opt = FedYogi(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, variant=variant)
    else:
        opt = FedAdagrad(eta=eta, tau=tau, variant=variant)
        beta_1 = 0.0
    x = {"w": x0.copy()}
    for d in deltas:
        x = opt.step(x, {"w": d})
    expected = _reference_run(kind, variant, deltas, x0, eta, beta_1, beta_2, tau)
    np.testing.assert_allclose(x["w"], expected, rtol=1e-13, atol=0)


def test_the_two_variants_differ_and_flower_is_the_default():
    from strategies.server_opt import FedAdam

    x, d = {"w": np.zeros(2)}, {"w": np.array([0.1, -0.2])}
    default, flower, paper = FedAdam(), FedAdam(variant="flower"), FedAdam(variant="paper")
    np.testing.assert_array_equal(default.step(x, d)["w"], flower.step(x, d)["w"])
    assert not np.allclose(flower.step(x, d)["w"], paper.step(x, d)["w"])
    with pytest.raises(ValueError, match="variant must be one of"):
        FedAdam(variant="reddi")
