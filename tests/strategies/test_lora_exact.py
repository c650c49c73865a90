"""LoRA-exact aggregation: every merged update equals the exact (weighted) mean of the sites' B @ A."""

import numpy as np
import pytest

from strategies.fedavg import weighted_mean
from strategies.lora_exact import (
    dense_updates,
    fedex_residual,
    fedsa_lora,
    ffa_lora,
    flexlora_aggregate,
    lora_pairs,
    lora_ranks,
    stack_lora_updates,
    svd_redistribute,
    weighted_dense_mean,
)

P = "model.layers.0.self_attn.q_proj"
A, B = f"{P}.lora_A.weight", f"{P}.lora_B.weight"
P2 = "model.layers.0.mlp.up_proj"
A2, B2 = f"{P2}.lora_A.weight", f"{P2}.lora_B.weight"
OUT, IN = 5, 4


def lora(a, b, **extra):
    return {A: np.asarray(a, dtype=np.float64), B: np.asarray(b, dtype=np.float64), **extra}


def random_adapter(rng, rank, extra=True):
    adapter = {
        A: rng.normal(size=(rank, IN)), B: rng.normal(size=(OUT, rank)),
        A2: rng.normal(size=(rank, OUT)), B2: rng.normal(size=(IN, rank)),
    }
    if extra:
        adapter["lm_head.modules_to_save.weight"] = rng.normal(size=(3,))
    return adapter


# Two rank-1 sites whose products are e1 e1^T and e2 e2^T: the exact mean is I/2,
# while the mean of the factors gives [.5, .5]^T [.5, .5] = all 0.25.
SITE_1 = lora([[1.0, 0.0]], [[1.0], [0.0]])
SITE_2 = lora([[0.0, 1.0]], [[0.0], [1.0]])


def test_lora_pairs_finds_layers_and_ignores_other_keys():
    adapter = random_adapter(np.random.default_rng(0), 2)
    assert lora_pairs(adapter) == {P2: (A2, B2), P: (A, B)}
    assert lora_ranks(adapter) == {P: 2, P2: 2}


def test_lora_pairs_rejects_unpaired_keys():
    with pytest.raises(ValueError, match=f"unpaired.*{P}.*only lora_A"):
        lora_pairs({A: np.zeros((2, 3))})
    with pytest.raises(ValueError, match="only lora_B"):
        lora_pairs({B: np.zeros((3, 2))})


def test_lora_pairs_rejects_rank_mismatch_inside_a_layer():
    with pytest.raises(ValueError, match="do not pair"):
        lora_pairs({A: np.zeros((2, 3)), B: np.zeros((4, 3))})


def test_dense_updates_hand_computed():
    adapter = lora([[1.0, 2.0]], [[3.0], [4.0]])
    np.testing.assert_array_equal(dense_updates(adapter)[P], [[3.0, 6.0], [4.0, 8.0]])
    np.testing.assert_array_equal(dense_updates(adapter, scaling=2.0)[P], [[6.0, 12.0], [8.0, 16.0]])


def test_fedavg_of_factors_is_not_the_mean_update():
    exact = weighted_dense_mean([SITE_1, SITE_2], [1, 1])[P]
    factored = dense_updates(weighted_mean([SITE_1, SITE_2], [1, 1]))[P]
    np.testing.assert_array_equal(exact, [[0.5, 0.0], [0.0, 0.5]])
    np.testing.assert_array_equal(factored, [[0.25, 0.25], [0.25, 0.25]])


def test_ffa_lora_averages_b_and_is_exact():
    rng = np.random.default_rng(1)
    frozen_a = rng.normal(size=(2, IN))
    sites = [lora(frozen_a, rng.normal(size=(OUT, 2))) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    merged = ffa_lora(sites, weights)
    np.testing.assert_array_equal(merged[A], frozen_a)
    np.testing.assert_allclose(merged[B], (sites[0][B] + 2 * sites[1][B] + 5 * sites[2][B]) / 8, atol=1e-15)
    np.testing.assert_allclose(dense_updates(merged)[P], weighted_dense_mean(sites, weights)[P], atol=1e-12)


def test_ffa_lora_refuses_different_a():
    moved = lora(SITE_1[A] + 1e-9, SITE_2[B])
    with pytest.raises(ValueError, match="'b' differs from 'a'"):
        ffa_lora([SITE_1, moved], [1, 1], site_ids=["a", "b"])
    assert ffa_lora([SITE_1, moved], [1, 1], a_atol=1e-6)[A] is not None


def test_fedsa_lora_shares_a_and_keeps_b_local():
    rng = np.random.default_rng(2)
    sites = [random_adapter(rng, 2) for _ in range(3)]
    global_part, local_parts = fedsa_lora(sites, [1, 1, 2])
    assert set(global_part) == {A, A2, "lm_head.modules_to_save.weight"}
    np.testing.assert_allclose(global_part[A], (sites[0][A] + sites[1][A] + 2 * sites[2][A]) / 4, atol=1e-15)
    for site, local in zip(sites, local_parts):
        assert set(local) == {B, B2}
        np.testing.assert_array_equal(local[B], site[B])
        assert local[B] is not site[B]


def test_stack_hand_computed_two_rank_one_sites():
    stacked = stack_lora_updates([SITE_1, SITE_2], [1, 3])
    np.testing.assert_array_equal(stacked[A], [[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(stacked[B], [[0.25, 0.0], [0.0, 0.75]])


def test_stack_with_mixed_ranks_equals_weighted_mean_of_products():
    rng = np.random.default_rng(3)
    sites = [random_adapter(rng, rank) for rank in (1, 2, 3)]
    weights = [10.0, 20.0, 30.0]
    stacked = stack_lora_updates(sites, weights)
    assert stacked[A].shape == (6, IN) and stacked[B].shape == (OUT, 6)
    exact = {
        prefix: sum(w / 60.0 * dense_updates(site)[prefix] for w, site in zip(weights, sites)) for prefix in (P, P2)
    }
    for prefix, (a_key, b_key) in lora_pairs(stacked).items():
        np.testing.assert_allclose(stacked[b_key] @ stacked[a_key], exact[prefix], rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        stacked["lm_head.modules_to_save.weight"],
        sum(w / 60.0 * s["lm_head.modules_to_save.weight"] for w, s in zip(weights, sites)),
        atol=1e-15,
    )


def test_stack_respects_peft_scalings_of_each_rank():
    rng = np.random.default_rng(4)
    ranks, alpha = (1, 2, 3), 16.0
    sites = [random_adapter(rng, r, extra=False) for r in ranks]
    scalings = [alpha / r for r in ranks]
    stacked = stack_lora_updates(sites, [1, 1, 1], scalings=scalings, stacked_scaling=alpha / sum(ranks))
    exact = weighted_dense_mean(sites, [1, 1, 1], scalings)[P]
    np.testing.assert_allclose(dense_updates(stacked, alpha / sum(ranks))[P], exact, rtol=0, atol=1e-10)


def test_fedex_residual_hand_computed_and_exact():
    averaged, residual = fedex_residual([SITE_1, SITE_2], [1, 1])
    np.testing.assert_array_equal(residual[P], [[0.25, -0.25], [-0.25, 0.25]])
    base = np.array([[1.0, 2.0], [3.0, 4.0]])
    merged = base + dense_updates(averaged)[P] + residual[P]
    np.testing.assert_array_equal(merged, base + np.eye(2) / 2)


def test_fedex_residual_with_scaling_makes_merged_weight_the_exact_mean():
    rng = np.random.default_rng(5)
    sites = [random_adapter(rng, 2) for _ in range(4)]
    weights, scaling = [1, 2, 3, 4], 8.0
    averaged, residual = fedex_residual(sites, weights, scaling=scaling)
    np.testing.assert_array_equal(averaged[A], weighted_mean(sites, weights)[A])
    exact = weighted_dense_mean(sites, weights, [scaling] * 4)
    for prefix in (P, P2):
        base = rng.normal(size=exact[prefix].shape)
        merged = base + dense_updates(averaged, scaling)[prefix] + residual[prefix]
        np.testing.assert_allclose(merged, base + exact[prefix], rtol=0, atol=1e-10)
        assert np.abs(residual[prefix]).max() > 1e-3  # the residual is not trivially zero


def test_fedex_refuses_mixed_ranks():
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="shape"):
        fedex_residual([random_adapter(rng, 1), random_adapter(rng, 2)], [1, 1])


def test_svd_redistribute_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(7)
    matrix = rng.normal(size=(6, 5))
    u, s, vt = np.linalg.svd(matrix)
    for rank in (1, 2, 3):
        b, a = svd_redistribute(matrix, rank)
        assert b.shape == (6, rank) and a.shape == (rank, 5)
        np.testing.assert_allclose(b @ a, (u[:, :rank] * s[:rank]) @ vt[:rank], atol=1e-12)
        # Eckart-Young: the Frobenius error is the norm of the dropped singular values, the spectral error the next one.
        assert np.linalg.norm(matrix - b @ a) == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-12)
        assert np.linalg.norm(matrix - b @ a, 2) == pytest.approx(s[rank], rel=1e-12)
        # sqrt split: both factors carry sqrt(S).
        np.testing.assert_allclose(b.T @ b, np.diag(s[:rank]), atol=1e-12)
        np.testing.assert_allclose(a @ a.T, np.diag(s[:rank]), atol=1e-12)


def test_svd_redistribute_hand_computed_and_padding():
    b, a = svd_redistribute(np.diag([9.0, 4.0]), 1)
    np.testing.assert_allclose(np.abs(b), [[3.0], [0.0]], atol=1e-15)
    np.testing.assert_allclose(b @ a, [[9.0, 0.0], [0.0, 0.0]], atol=1e-14)
    b, a = svd_redistribute(np.diag([9.0, 4.0]), 4)
    assert b.shape == (2, 4) and a.shape == (4, 2)
    np.testing.assert_allclose(b @ a, np.diag([9.0, 4.0]), atol=1e-14)
    with pytest.raises(ValueError, match="rank"):
        svd_redistribute(np.eye(2), 0)


def test_flexlora_gives_each_site_its_rank_of_the_exact_mean():
    rng = np.random.default_rng(8)
    ranks = (1, 2, 3)
    sites = [random_adapter(rng, r) for r in ranks]
    weights, scalings = [1.0, 1.0, 2.0], [16.0 / r for r in ranks]
    site_scalings = [16.0 / r for r in (4, 1)]
    out = flexlora_aggregate(sites, weights, site_ranks=[4, 1], scalings=scalings, site_scalings=site_scalings)
    exact = weighted_dense_mean(sites, weights, scalings)
    for site_adapter, rank, site_scaling in zip(out, (4, 1), site_scalings):
        assert lora_ranks(site_adapter) == {P: rank, P2: rank}
        for prefix in (P, P2):
            u, s, vt = np.linalg.svd(exact[prefix])
            best = (u[:, :rank] * s[:rank]) @ vt[:rank]
            np.testing.assert_allclose(dense_updates(site_adapter, site_scaling)[prefix], best, rtol=0, atol=1e-10)
        head = "lm_head.modules_to_save.weight"
        np.testing.assert_allclose(site_adapter[head], (sites[0][head] + sites[1][head] + 2 * sites[2][head]) / 4, atol=1e-15)
    # The mean of ranks 1+2+3 has rank <= 6 > min(OUT, IN) = 4: rank 4 reproduces it exactly.
    np.testing.assert_allclose(dense_updates(out[0], site_scalings[0])[P], exact[P], rtol=0, atol=1e-10)


def test_weights_validation():
    with pytest.raises(ValueError, match="one weight per adapter"):
        stack_lora_updates([SITE_1, SITE_2], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        stack_lora_updates([SITE_1, SITE_2], [1.0, -1.0])
