"""FedProx proximal term."""

import numpy as np
import pytest
import torch

from client.proximal import proximal_term


def test_hand_computed_value_and_gradient():
    local = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    term = proximal_term({"w": local}, {"w": np.zeros(2)}, mu=0.5)
    assert term.dim() == 0 and term.item() == 1.25  # 0.25 * (1 + 4)
    term.backward()
    torch.testing.assert_close(local.grad, torch.tensor([0.5, 1.0], dtype=torch.float64))  # mu (w - w_g)


def test_sequences_and_no_gradient_to_the_anchor():
    local = torch.tensor([3.0], requires_grad=True)
    anchor = torch.tensor([1.0], requires_grad=True)
    term = proximal_term([local], [anchor], mu=2.0)
    assert term.item() == 4.0
    term.backward()
    assert anchor.grad is None and local.grad.item() == 4.0


def test_zero_mu_and_errors():
    local = torch.ones(2, requires_grad=True)
    assert proximal_term([local], [torch.zeros(2)], mu=0.0).item() == 0.0
    with pytest.raises(KeyError, match="lacks"):
        proximal_term({"a": local}, {"b": torch.zeros(2)}, mu=1.0)
    with pytest.raises(ValueError, match="shape"):
        proximal_term([local], [torch.zeros(3)], mu=1.0)
    with pytest.raises(ValueError, match="mu"):
        proximal_term([local], [torch.zeros(2)], mu=-1.0)
