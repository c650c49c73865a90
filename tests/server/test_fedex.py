"""FedEx-LoRA: FedAvg of the factors plus the exact residual as a frozen update, through the real round loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import MessageType

import client.task as plain_client
from client.app import app as client_app
import server.app
import server.methods.fedex_lora
from client.flora import FROZEN_COUNT_STATE, FROZEN_RECORD, FROZEN_STATE, frozen_lora_update
from federation.adapter import from_array_record, set_adapter_arrays
from server.methods.fedex_lora import FedExLoraStrategy
from strategies.fedavg import weighted_mean
from strategies.lora_exact import fedex_residual_factors
from server.methods import build_coordinator
from strategies.aggregators import MixedRanksError
from strategies.lora_exact import fedex_residual, lora_pairs, weighted_dense_mean
from tests.server.test_hetero import RecordingGrid, lora_methods_loop  # noqa: F401 (fixture)

SITES = 3
ROUNDS = 2


def _dense(factors, scaling=1.0):
    return {prefix: scaling * np.asarray(factors[b], np.float64) @ np.asarray(factors[a], np.float64)
            for prefix, (a, b) in lora_pairs(factors).items()}


def _random_adapter(rng, rank=3, shapes=((5, 4), (2, 6))):
    adapter = {}
    for index, (out_features, in_features) in enumerate(shapes):
        adapter[f"l{index}.lora_A.weight"] = rng.normal(size=(rank, in_features)).astype(np.float32)
        adapter[f"l{index}.lora_B.weight"] = rng.normal(size=(out_features, rank)).astype(np.float32)
    return adapter


@pytest.fixture
def residual_rounds(monkeypatch):
    """Every (local adapters, weights, scaling) FedExLoraStrategy aggregated, one entry per round."""
    calls, real = [], server.methods.fedex_lora.fedex_residual_factors

    def recording(adapters, weights, scaling):
        calls.append(([dict(a) for a in adapters], list(weights), scaling))
        return real(adapters, weights, scaling)

    monkeypatch.setattr(server.methods.fedex_lora, "fedex_residual_factors", recording)
    return calls


def test_residual_factors_make_the_merge_the_exact_weighted_mean():
    rng = np.random.default_rng(0)
    sites, weights, scaling = [_random_adapter(rng) for _ in range(SITES)], [1.0, 2.0, 5.0], 2.0
    averaged, residual = fedex_residual_factors(sites, weights, scaling)
    assert residual["l0.lora_A.weight"].shape == (4 * 3, 4) and residual["l0.lora_B.weight"].shape == (5, 4 * 3)
    exact = weighted_dense_mean(sites, weights, [scaling] * SITES)
    _, dense_residual = fedex_residual(sites, weights, scaling)
    for prefix, update in _dense(residual).items():
        np.testing.assert_allclose(update + _dense(averaged, scaling)[prefix], exact[prefix], atol=1e-6)
        np.testing.assert_allclose(update, dense_residual[prefix], atol=1e-6)
    # Hand-checkable: identical sites leave no residual (FedAvg of the factors is already exact).
    _, none_left = fedex_residual_factors([sites[0]] * SITES, weights, scaling)
    for update in _dense(none_left).values():
        np.testing.assert_allclose(update, 0.0, atol=1e-6)


def test_three_sites_two_rounds_merge_exactly_at_the_server_and_at_the_sites(
        make_cfg, lora_methods_loop, residual_rounds):  # noqa: F811 (fixture)
    cfg = make_cfg(f"federation.num_clients={SITES}", f"federation.rounds={ROUNDS}", "strategy=fedex_lora")
    grid = RecordingGrid(client_app, SITES)
    rows = server.app.run_federation(grid, cfg)
    assert all(r["clients_ok"] == SITES and not r["rejected"] and not r["failed"] for r in rows[1:])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    strategy = lora_methods_loop[0]
    assert isinstance(strategy, FedExLoraStrategy)
    scaling = cfg.lora.alpha / cfg.lora.r
    state = strategy.aggregator
    assert len(residual_rounds) == ROUNDS
    assert state.offsets == [0, (SITES + 1) * cfg.lora.r, 2 * (SITES + 1) * cfg.lora.r]
    # Per round: that round's frozen residual + s B̄ Ā is the weighted mean of the sites' s B_i A_i.
    for index, (adapters, weights, round_scaling) in enumerate(residual_rounds):
        assert round_scaling == scaling
        averaged = weighted_mean(adapters, weights)
        residual = {key: (value[state.offsets[index]:state.offsets[index + 1]] if ".lora_A." in key
                          else value[:, state.offsets[index]:state.offsets[index + 1]])
                    for key, value in state.factors_since(0).items()}
        exact = weighted_dense_mean(adapters, weights, [scaling] * len(adapters))
        for prefix, update in _dense(residual).items():
            np.testing.assert_allclose(update + _dense(averaged, scaling)[prefix], exact[prefix], atol=1e-6)
        # ... and plain factor averaging would not be: the residual matters.
        assert max(np.abs(update).max() for update in _dense(residual).values()) > 1e-4
    # The trainable global adapter is the FedAvg of the last round's factors (not re-initialised).
    final_global = weighted_mean(*residual_rounds[-1][:2])
    checkpoint_global = strategy.current_global  # what the last evaluation sent with the frozen part
    for key, value in final_global.items():
        np.testing.assert_allclose(checkpoint_global[key], value, atol=1e-6)
    # Sites: every one merged both residuals (the last came with the final evaluation); a site's model with
    # the frozen hook and the global adapter computes base + (residuals + s B̄ Ā) on random inputs.
    total = {prefix: update + _dense(final_global, scaling)[prefix]
             for prefix, update in _dense(state.factors_since(0)).items()}
    model = plain_client.get_runtime(cfg).model.eval()
    rng = torch.Generator().manual_seed(0)
    for context in grid.contexts.values():
        assert int(context.state[FROZEN_COUNT_STATE]["count"]) == ROUNDS
        frozen = from_array_record(context.state[FROZEN_STATE])
        with torch.no_grad():
            set_adapter_arrays(model, {k: np.asarray(v, np.float32) for k, v in final_global.items()})
            with frozen_lora_update(model, frozen):
                for prefix, update in total.items():
                    layer = model.get_submodule(prefix)
                    base = layer.get_base_layer().weight.double()
                    x = torch.randn(4, base.shape[1], generator=rng)
                    expected = x.double() @ (base + torch.from_numpy(update)).T
                    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    # Round 2 sent no frozen record: every site merged round 1's residual at the round-1 evaluation.
    round2_train = [m for m, _ in grid.exchanges if m.metadata.message_type.startswith(MessageType.TRAIN)
                    and m.content["config"]["server-round"] == 2]
    assert len(round2_train) == SITES and all(FROZEN_RECORD not in m.content.array_records for m in round2_train)


def test_state_round_trips_through_state_dict(make_cfg):
    cfg = make_cfg("strategy=fedex_lora")
    rng = np.random.default_rng(1)
    built = build_coordinator(cfg)
    assert isinstance(built, FedExLoraStrategy)
    for _ in range(2):
        _, residual = fedex_residual_factors([_random_adapter(rng) for _ in range(SITES)], [1, 1, 2], 2.0)
        built.aggregator.merge(residual)
    restored = build_coordinator(cfg)
    restored.aggregator.load_state_dict(built.aggregator.state_dict())
    assert restored.aggregator.offsets == built.aggregator.offsets == [0, 12, 24]
    for key, value in built.aggregator.factors_since(1).items():
        np.testing.assert_array_equal(restored.aggregator.factors_since(1)[key], value)


def test_refuses_secagg_mixed_ranks_and_another_aggregator(make_cfg):
    with pytest.raises(ValueError, match="privacy.secagg and privacy.central"):
        build_coordinator(make_cfg("strategy=fedex_lora", "privacy.secagg.enabled=true"))
    with pytest.raises(ValueError, match="strategy.aggregator must be"):
        build_coordinator(make_cfg("strategy=fedex_lora", "strategy.aggregator=fedavg"))
    with pytest.raises(MixedRanksError, match="needs the same LoRA rank"):
        build_coordinator(make_cfg("strategy=fedex_lora", "+strategy.params.site_ranks=[4,8]"))
