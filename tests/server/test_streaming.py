import numpy as np
import pytest

from strategies.fedavg import UpdateRejected, weighted_mean
from server.streaming import StreamingWeightedMean

KEY_A = "base_model.model.layer.q_proj.lora_A.weight"
KEY_B = "base_model.model.layer.q_proj.lora_B.weight"


def stream(updates, weights, accumulator="float64"):
    mean = StreamingWeightedMean(accumulator)
    for update, weight in zip(updates, weights):
        mean.add(update, weight)
    return mean.result()


@pytest.mark.parametrize("accumulator", ["float64", "float32", "kahan32"])
def test_matches_hand_computation_exactly(accumulator):
    d1 = {KEY_A: np.array([[1.0, 2.0]], np.float32), KEY_B: np.array([[3.0], [0.0]], np.float32)}
    d2 = {KEY_A: np.array([[4.0, -1.0]], np.float32), KEY_B: np.array([[0.0], [6.0]], np.float32)}
    out = stream([d1, d2], [10, 30], accumulator)  # (10 u1 + 30 u2) / 40: dyadic, exact in every dtype
    np.testing.assert_array_equal(out[KEY_A], [[3.25, -0.25]])
    np.testing.assert_array_equal(out[KEY_B], [[0.75], [4.5]])
    np.testing.assert_array_equal(out[KEY_A], weighted_mean([d1, d2], [10, 30])[KEY_A])
    assert out[KEY_A].dtype == (np.float64 if accumulator == "float64" else np.float32)


def random_updates(n, seed=0):
    rng = np.random.default_rng(seed)
    updates = [{KEY_A: rng.standard_normal((16, 64)).astype(np.float32),
                KEY_B: rng.standard_normal((64, 16)).astype(np.float32)} for _ in range(n)]
    return updates, rng.integers(1, 1000, n).astype(float).tolist()


def test_float64_matches_weighted_mean_to_float64_rounding():
    updates, weights = random_updates(50)
    ref, out = weighted_mean(updates, weights), stream(updates, weights)
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-12, atol=1e-15)


def test_kahan32_is_more_accurate_than_plain_float32():
    updates, weights = random_updates(200, seed=1)
    ref = weighted_mean(updates, weights)
    err = {acc: max(np.abs(stream(updates, weights, acc)[k] - ref[k]).max() for k in ref)
           for acc in ("float32", "kahan32")}
    # float32 result rounding alone is ~2^-24 * |mean| (~1e-7 here); plain float32 summation adds more
    assert err["kahan32"] < 1e-6
    assert err["kahan32"] < err["float32"]


def test_memory_is_one_accumulator_regardless_of_site_count():
    updates, weights = random_updates(3)
    mean = StreamingWeightedMean("float64")
    for update, weight in zip(updates * 10, weights * 10):
        mean.add(update, weight)
    assert mean.count == 30 and mean.total_weight == 10 * sum(weights)
    assert sum(a.nbytes for a in mean.sums.values()) == 8 * (16 * 64 + 64 * 16)


def test_rejects_mismatched_update_before_adding_anything():
    updates, weights = random_updates(2)
    mean = StreamingWeightedMean()
    mean.add(updates[0], 1.0)
    before = {k: v.copy() for k, v in mean.sums.items()}
    with pytest.raises(UpdateRejected, match="shape"):
        mean.add({KEY_A: updates[1][KEY_A], KEY_B: np.zeros((3, 3), np.float32)}, 1.0)
    with pytest.raises(UpdateRejected, match="missing"):
        mean.add({KEY_A: updates[1][KEY_A]}, 1.0)
    for key in before:
        np.testing.assert_array_equal(mean.sums[key], before[key])
    assert mean.count == 1


def test_refuses_bad_weights_and_empty_and_reuse():
    with pytest.raises(ValueError, match="nothing"):
        StreamingWeightedMean().result()
    mean = StreamingWeightedMean()
    with pytest.raises(ValueError, match="non-negative"):
        mean.add({KEY_A: np.zeros(2)}, -1.0)
    mean.add({KEY_A: np.zeros(2)}, 0.0)
    with pytest.raises(ValueError, match="positive sum"):
        mean.result()
    with pytest.raises(UpdateRejected, match="non-float"):
        StreamingWeightedMean().add({KEY_A: np.zeros(2, np.int64)}, 1.0)
    with pytest.raises(ValueError, match="accumulator"):
        StreamingWeightedMean("float16")
    done = StreamingWeightedMean()
    done.add({KEY_A: np.ones(2)}, 1.0)
    done.result()
    with pytest.raises(RuntimeError, match="already"):
        done.add({KEY_A: np.ones(2)}, 1.0)


@pytest.mark.parametrize("accumulator", ["float32", "float64", "kahan32"])
def test_bfloat16_tensor_updates_equal_their_float32_decoding(accumulator):
    """A bf16 upload viewed as a torch tensor (no decode step) sums exactly like its float32 decoding."""
    import torch

    updates, weights = random_updates(5, seed=2)
    as_bf16 = [{k: torch.from_numpy(v).to(torch.bfloat16) for k, v in u.items()} for u in updates]
    decoded = [{k: v.float().numpy() for k, v in u.items()} for u in as_bf16]
    out, ref = stream(as_bf16, weights, accumulator), stream(decoded, weights, accumulator)
    for key in ref:
        np.testing.assert_array_equal(out[key], ref[key])
    with pytest.raises(UpdateRejected, match="non-float"):
        StreamingWeightedMean(accumulator).add({KEY_A: torch.zeros(2, dtype=torch.int32)}, 1.0)
