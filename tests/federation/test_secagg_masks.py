"""SecAgg+ masks: ChaCha20 streams keyed by the whole secret, not Flower's 32-bit-seeded MT19937."""

import os

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_pseudo_rand_gen

from federation.secagg_masks import cryptographic_masks, narrow_dtype, use_cryptographic_masks

MOD = 2**32


def _fold32(seed: bytes) -> int:
    """The 32-bit seed Flower's pseudo_rand_gen derives from a secret (XOR of its 4-byte words)."""
    folded = 0
    for i in range(0, len(seed), 4):
        folded ^= int.from_bytes(seed[i:i + 4], "little")
    return folded


def test_masks_are_deterministic_per_secret_shaped_and_in_range():
    secret = os.urandom(32)
    shapes = [(1,), (3, 5), (7,), ()]
    first, again = cryptographic_masks(secret, MOD, shapes), cryptographic_masks(secret, MOD, shapes)
    assert [m.shape for m in first] == shapes and all(m.dtype == np.int64 for m in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    flat = np.concatenate([m.ravel() for m in first])
    assert flat.min() >= 0 and flat.max() < MOD
    small = cryptographic_masks(secret, 1000, [(10_000,)])[0]  # non-power-of-two range
    assert small.min() >= 0 and small.max() < 1000 and len(np.unique(small)) > 990


def test_secrets_differing_in_one_bit_give_uncorrelated_masks():
    secret = bytearray(os.urandom(44))
    flipped = bytearray(secret)
    flipped[17] ^= 0x04
    n = 200_000
    a = cryptographic_masks(bytes(secret), MOD, [(n,)])[0].astype(np.float64)
    b = cryptographic_masks(bytes(flipped), MOD, [(n,)])[0].astype(np.float64)
    # |corr| of independent uniforms is ~ 1/sqrt(n) = 0.0022; 0.015 is > 6 sigma.
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.015
    differing_bits = np.unpackbits((a.astype(np.uint32) ^ b.astype(np.uint32)).view(np.uint8)).mean()
    assert abs(differing_bits - 0.5) < 0.005


def test_masks_are_uniform_chi_square():
    values = cryptographic_masks(os.urandom(32), MOD, [(400_000,)])[0]
    counts = np.bincount((values >> 24).astype(np.int64), minlength=256)  # top byte: 256 bins
    expected = len(values) / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: mean 255, sd 22.6; 380 is beyond 5.5 sd.
    assert chi2 < 380, chi2


def test_brute_force_over_flowers_32_bit_seed_space_recovers_flowers_masks_but_not_ours():
    # A pairwise key as Flower makes it: 44 bytes of urlsafe base64 text.
    import base64

    secret = base64.urlsafe_b64encode(os.urandom(32))
    observed_flower = flower_pseudo_rand_gen(secret, MOD, [(8,)])[0]
    observed_ours = cryptographic_masks(secret, MOD, [(8,)])[0]
    true_seed = _fold32(secret)
    # The attacker's search, over a window of the 2**32 seeds that contains the true one (the whole space
    # takes seconds per core for MT19937 prefixes; the window keeps the test fast and still contains the answer).
    window = range(max(0, true_seed - 2000), min(2**32, true_seed + 2000))

    def search(observed):
        for candidate in window:
            if np.array_equal(np.random.RandomState(candidate).randint(0, MOD - 1, (8,), dtype=np.int64), observed):
                return candidate
        return None

    assert search(observed_flower) == true_seed  # the attack works on Flower's masks (the test can fail) ...
    assert search(observed_ours) is None  # ... and finds nothing for ours


def test_narrow_dtype_is_the_smallest_unsigned_width():
    assert narrow_dtype(2**8) == np.uint8 and narrow_dtype(2**8 + 1) == np.uint16
    assert narrow_dtype(2**32) == np.uint32 and narrow_dtype(2**32 + 1) == np.uint64
    with pytest.raises(ValueError):
        narrow_dtype(2**64 + 1)


def test_installed_on_both_sides_of_flower():
    import importlib

    use_cryptographic_masks("site")
    use_cryptographic_masks("coordinator")
    use_cryptographic_masks("site")  # idempotent
    site = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    coordinator = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    assert site.pseudo_rand_gen is cryptographic_masks and coordinator.pseudo_rand_gen is cryptographic_masks
    assert site.parameters_mod([np.array([2**32 + 5, 7])], 2**32)[0].dtype == np.uint32
    with pytest.raises(ValueError):
        use_cryptographic_masks("somewhere")
