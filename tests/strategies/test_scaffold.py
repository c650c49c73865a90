"""SCAFFOLD option II control-variate math."""

import io

import numpy as np
import pytest
import torch

from strategies.scaffold import client_control_update, correct_gradient, server_control_update, zero_control

K = "l.lora_A.weight"


def one(value):
    return {K: np.array([float(value)])}


def test_client_control_update_hand_computed():
    # c_i+ = 1 - 0.5 + (2 - 1.5) / (5 * 0.1) = 1.5
    new_c, delta_c = client_control_update(one(1.0), one(0.5), one(2.0), one(1.5), local_steps=5, lr=0.1)
    assert new_c[K][0] == pytest.approx(1.5, abs=1e-15)
    assert delta_c[K][0] == pytest.approx(0.5, abs=1e-15)


def test_option_two_is_the_mean_local_gradient_when_controls_start_at_zero():
    # Local SGD on f(y) = 0.5 ||y - t||^2 with corrected gradients (all controls zero).
    target, x, lr, steps = np.array([3.0, -1.0]), np.array([0.0, 2.0]), 0.1, 4
    y, seen = x.copy(), []
    for _ in range(steps):
        grad = correct_gradient(y - target, np.zeros(2), np.zeros(2))
        seen.append(grad)
        y = y - lr * grad
    new_c, _ = client_control_update({K: np.zeros(2)}, {K: np.zeros(2)}, {K: x}, {K: y}, steps, lr)
    np.testing.assert_allclose(new_c[K], np.mean(seen, axis=0), atol=1e-14)


def test_server_control_update_divides_by_all_sites():
    new_c = server_control_update(one(0.0), [one(1.0), one(3.0)], num_sites_total=4)
    assert new_c[K][0] == 1.0
    with pytest.raises(ValueError, match="num_sites_total"):
        server_control_update(one(0.0), [one(1.0), one(3.0)], num_sites_total=1)


def test_correct_gradient_numpy_and_torch():
    np.testing.assert_array_equal(correct_gradient(np.array([1.0]), np.array([0.25]), np.array([2.0])), [2.75])
    grad = torch.tensor([1.0, 2.0], dtype=torch.float32)
    out = correct_gradient(grad, np.array([0.5, 0.5]), np.array([0.25, 1.0]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.75, 2.5]))


def test_controls_survive_a_savez_checkpoint():
    rng = np.random.default_rng(0)
    adapter = {K: rng.normal(size=(2, 3)), "l.lora_B.weight": rng.normal(size=(4, 2))}
    c_local, c_global = zero_control(adapter), zero_control(adapter)
    local = {k: v + rng.normal(size=v.shape) for k, v in adapter.items()}
    c_local, _ = client_control_update(c_local, c_global, adapter, local, 3, 0.01)
    buffer = io.BytesIO()
    np.savez(buffer, **c_local)
    buffer.seek(0)
    with np.load(buffer) as loaded:
        restored = {k: loaded[k] for k in loaded.files}
    expected, _ = client_control_update(c_local, c_global, adapter, adapter, 3, 0.01)
    got, _ = client_control_update(restored, c_global, adapter, adapter, 3, 0.01)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
