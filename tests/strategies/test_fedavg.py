import numpy as np
import pytest

from strategies.fedavg import UpdateRejected, aggregate_lora_deltas, apply_delta, validate_update

KEY_A = "base_model.model.layer.q_proj.lora_A.weight"
KEY_B = "base_model.model.layer.q_proj.lora_B.weight"


def test_fedavg_matches_hand_computation():
    d1 = {KEY_A: np.array([[1.0, 2.0]]), KEY_B: np.array([[3.0], [0.0]])}
    d2 = {KEY_A: np.array([[4.0, -1.0]]), KEY_B: np.array([[0.0], [6.0]])}
    # weights 1 and 3 -> 0.25 / 0.75
    out = aggregate_lora_deltas([d1, d2], [10, 30])
    np.testing.assert_array_equal(out[KEY_A], [[0.25 * 1 + 0.75 * 4, 0.25 * 2 + 0.75 * -1]])
    np.testing.assert_array_equal(out[KEY_B], [[0.75], [4.5]])
    assert out[KEY_A].dtype == np.float64


def test_apply_delta_keeps_dtype():
    g = {KEY_A: np.ones((1, 2), np.float32)}
    out = apply_delta(g, {KEY_A: np.full((1, 2), 0.5)}, server_lr=2.0)
    np.testing.assert_array_equal(out[KEY_A], [[2.0, 2.0]])
    assert out[KEY_A].dtype == np.float32


def test_fedavg_refuses_bad_weights():
    d = {KEY_A: np.zeros((1, 2))}
    with pytest.raises(ValueError):
        aggregate_lora_deltas([d, d], [0, 0])
    with pytest.raises(ValueError):
        aggregate_lora_deltas([d], [1, 2])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda u: u.pop(KEY_B), "missing"),
        (lambda u: u.__setitem__("extra.lora_A.weight", np.zeros(1)), "unexpected"),
        (lambda u: u.__setitem__(KEY_A, np.zeros((2, 2))), "shape"),
        (lambda u: u.__setitem__(KEY_A, np.array([[np.nan, 0.0]])), "NaN"),
        (lambda u: u.__setitem__(KEY_B, np.array([[np.inf], [0.0]])), "NaN/Inf"),
        (lambda u: u.__setitem__(KEY_A, np.array([[1, 2]])), "dtype"),
    ],
)
def test_validate_rejects_bad_updates(mutate, message):
    ref = {KEY_A: np.zeros((1, 2)), KEY_B: np.zeros((2, 1))}
    update = {k: v.copy() for k, v in ref.items()}
    validate_update(update, ref)  # the untouched update passes
    mutate(update)
    with pytest.raises(UpdateRejected, match=message):
        validate_update(update, ref)
