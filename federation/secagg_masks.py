"""SecAgg+ masks from a cryptographic stream (ChaCha20 keyed by the whole secret), and the narrowest masked upload.

Flower 1.41 expands every SecAgg+ mask with ``secaggplus_utils.pseudo_rand_gen``: it XOR-folds the secret
(a site's 32-byte private-mask seed, or a pairwise key that is 44 bytes of base64 text) to a 32-bit integer and
seeds numpy's MT19937 with it. The pairwise seed then has about 28 effective bits (base64 characters carry 6 bits
in 8), which one core enumerates in seconds: a coordinator that sees a 2-site round recovers the pairwise mask
and with it each site's quantized delta, bit-exactly. Here every mask is the ChaCha20 keystream under
``SHA-256(domain || secret)``, so all of the secret's entropy is used and predicting the mask means breaking
ChaCha20 or SHA-256.

Flower has no hook for its PRG, so ``use_cryptographic_masks`` replaces the name ``pseudo_rand_gen`` inside the
two Flower modules that call it (the site's ``secaggplus_mod`` and the coordinator's ``SecAggPlusWorkflow``);
rewriting those ~1,000 lines of protocol to change one function would be a larger risk than rebinding it.
Both sides of a federation must run it (the coordinator announces it in the FitIns config, ``MASK_SCHEME_KEY``,
and a site refuses a round that does not), otherwise the unmasked sum would be garbage.

Masked vectors are sums modulo ``mod_range`` (a power of two <= 2**32 in this project), so they fit an unsigned
integer of that width: ``narrow_masked_upload`` sends uint32 (4 B per value) instead of Flower's int64 (8 B). The
coordinator's running sum of uint32 vectors wraps modulo 2**32, which ``mod_range`` divides, so the sum modulo
``mod_range`` is unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

# MASK_SCHEME is announced by the coordinator in the SecAgg+ FitIns config; a site masks only under this scheme.
from federation.protocol import MASK_SCHEME, MASK_SCHEME_KEY  # noqa: F401 (re-exported)

# Domain separation: a mask key is never equal to any other use of the same secret.
_DOMAIN = b"fedtune secagg+ mask v1\x00"
# ChaCha20's 16-byte nonce is a 4-byte block counter + 12-byte nonce; each key is used for one stream only.
_NONCE = bytes(16)
# Keystream generated per call to ChaCha20 (bounded temporary memory for large adapters).
_CHUNK_VALUES = 1 << 22


def _values_from_keystream(encryptor, count: int, num_range: int) -> np.ndarray:
    """`count` integers uniform in [0, num_range) from the keystream, as int64 (Flower's mask dtype)."""
    out = np.empty(count, dtype=np.int64)
    power_of_two = num_range & (num_range - 1) == 0
    width = 4 if power_of_two and num_range <= 2**32 else 8
    for start in range(0, count, _CHUNK_VALUES):
        n = min(_CHUNK_VALUES, count - start)
        raw = np.frombuffer(encryptor.update(bytes(width * n)), dtype="<u4" if width == 4 else "<u8")
        if power_of_two:
            out[start:start + n] = raw & np.uint64(num_range - 1)
        else:  # modulo bias below num_range / 2**64: negligible for any range a SecAgg+ sum can use
            out[start:start + n] = (raw % np.uint64(num_range)).astype(np.int64)
    return out


def cryptographic_masks(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Drop-in for Flower's pseudo_rand_gen: int64 arrays of the given shapes, uniform in [0, num_range)."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) < 16:
        raise ValueError("a SecAgg+ mask secret must be at least 16 bytes")
    if not 1 < num_range <= 2**63:
        raise ValueError(f"num_range must be in (1, 2**63], got {num_range}")
    key = hashlib.sha256(_DOMAIN + bytes(seed)).digest()
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    sizes = [math.prod(shape) for shape in dimensions_list]
    flat = _values_from_keystream(encryptor, sum(sizes), int(num_range))
    out, offset = [], 0
    for shape, size in zip(dimensions_list, sizes):
        out.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return out


def narrow_dtype(mod_range: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every value in [0, mod_range)."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if mod_range - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"mod_range {mod_range} does not fit 64 bits")


def _narrowing(flower_parameters_mod: Callable) -> Callable:
    def parameters_mod_narrow(parameters: list[np.ndarray], divisor: int) -> list[np.ndarray]:
        """Flower's parameters_mod, then cast to the narrowest unsigned dtype (values are in [0, divisor))."""
        dtype = narrow_dtype(int(divisor))
        return [np.asarray(value).astype(dtype) for value in flower_parameters_mod(parameters, divisor)]

    parameters_mod_narrow.fedtune_narrowing = True  # type: ignore[attr-defined]
    return parameters_mod_narrow


def _rebind(module: Any, name: str, replacement: Callable, expected_origin: str) -> None:
    current = getattr(module, name, None)
    if current is replacement or getattr(current, "fedtune_narrowing", False):
        return
    if current is None or getattr(current, "__module__", "") != expected_origin:
        # A Flower version that moved or renamed the function: refuse rather than run with 32-bit masks.
        raise RuntimeError(f"{module.__name__}.{name} is not Flower 1.41's {expected_origin}.{name}; "
                           "cannot install cryptographic SecAgg+ masks on this Flower version")
    setattr(module, name, replacement)


def use_cryptographic_masks(side: str) -> None:
    """Make Flower's SecAgg+ on `side` ("site" or "coordinator") expand masks with ChaCha20 (idempotent).

    On the site, masked uploads are also sent in the narrowest unsigned dtype that the modulus allows.
    """
    if side == "site":
        # By module path: the package re-exports a function of the same name as this module.
        module = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
        _rebind(module, "parameters_mod", _narrowing(module.parameters_mod),
                "flwr.common.secure_aggregation.ndarrays_arithmetic")
    elif side == "coordinator":
        module = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    else:
        raise ValueError(f"side must be 'site' or 'coordinator', got {side!r}")
    _rebind(module, "pseudo_rand_gen", cryptographic_masks, "flwr.common.secure_aggregation.secaggplus_utils")
