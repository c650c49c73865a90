"""Randomness for differential privacy: drawn from OS entropy, never from a seed, never stored or sent.

DP noise only protects anyone if nobody can reproduce it. numpy's default generator (PCG64) is a
deterministic function of its seed: seeded from a config value (which lands in config.json and in the
run config every site receives), anyone can regenerate the noise and subtract it; and its whole
128-bit state is exposed by ``bit_generator.state``, so a checkpointed generator gives away every
past and future draw as well. PCG64 is also not a cryptographic generator: its outputs can be used
to recover its state. So the coordinator's noise (central DP, SecAgg+ with DP, adaptive clipping's
noisy count) comes from `SecureRandom`: a ChaCha20 keystream (the `cryptography` package, i.e.
OpenSSL) under a fresh 256-bit key from ``os.urandom`` for every draw. It keeps no state between
draws, so there is nothing to checkpoint, log or send, and a run's noise is not reproducible by
design. Everything else stays reproducible from the config seeds.

Not covered: floating-point attacks on the sampler (Mironov 2012; Jin et al. 2021) read the noise
off the low bits of a float64 Gaussian. Defending against them needs a discrete or snapped sampler,
which we do not have.

DP-SGD at the sites runs inside Opacus and needs a `torch.Generator`: `os_entropy_torch_generator`.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

# Uniforms per ChaCha20 key: 32 MiB of keystream at a time, which bounds the memory of a draw and
# keeps the cipher's 32-bit block counter (256 GiB per key) far from wrapping. A new key per chunk
# costs one os.urandom call.
_UNIFORMS_PER_KEY = 1 << 22
_MANTISSA_BITS = 53


def _random_words(count: int) -> np.ndarray:
    """`count` uint64 words of ChaCha20 keystream under a fresh OS-entropy key and nonce."""
    # cryptography's ChaCha20 nonce is 16 bytes: a 32-bit little-endian block counter, then the 96-bit
    # nonce. Start the counter at 0 so a chunk can never run it over.
    key, nonce = os.urandom(32), bytes(4) + os.urandom(12)
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * count)), dtype=np.uint64)


def _uniforms(count: int) -> np.ndarray:
    """`count` float64 uniforms in (0, 1], 53 random bits each (never 0, so log() is finite)."""
    mantissas = _random_words(count) >> np.uint64(64 - _MANTISSA_BITS)
    values = mantissas.astype(np.float64)  # exact: < 2**53
    values += 1.0
    values *= 2.0**-_MANTISSA_BITS
    return values


def _fill_standard_normal(out: np.ndarray) -> None:
    """Fill a flat float64 array with N(0, 1) by Box-Muller, both outputs of every pair used."""
    for start in range(0, out.size, _UNIFORMS_PER_KEY):
        chunk = out[start:start + _UNIFORMS_PER_KEY]
        pairs = (chunk.size + 1) // 2
        u = _uniforms(2 * pairs)
        radius = np.sqrt(-2.0 * np.log(u[:pairs]))
        angle = u[pairs:]
        angle *= 2.0 * math.pi
        chunk[:pairs] = radius * np.cos(angle)
        chunk[pairs:] = (radius * np.sin(angle))[:chunk.size - pairs]


def _shape(size) -> tuple[int, ...]:
    if size is None:
        return ()
    return tuple(int(n) for n in np.atleast_1d(size)) if np.ndim(size) else (int(size),)


class SecureRandom:
    """The part of numpy's Generator that DP noise uses, drawn from a ChaCha20 keystream keyed by os.urandom.

    Stateless: every call uses a fresh key. Vectorised in chunks; measured on the shared 2-core dev box:
    100M normals in ~4.6 s (10M in ~0.6 s; numpy's PCG64 takes ~0.12 s for 10M), i.e. a few seconds
    per round at the coordinator for a 100M-parameter adapter, mostly numpy's log/cos/sin, not ChaCha20.
    """

    def random(self, size=None) -> float | np.ndarray:
        """Uniforms in (0, 1] (numpy's are in [0, 1): 0 is excluded so that log() is always finite)."""
        shape = _shape(size)
        values = _uniforms(math.prod(shape)).reshape(shape)
        return float(values) if size is None else values

    def standard_normal(self, size=None) -> float | np.ndarray:
        """N(0, 1) samples of shape `size` (a float when size is None), like numpy's."""
        shape = _shape(size)
        values = np.empty(math.prod(shape), dtype=np.float64)
        _fill_standard_normal(values)
        values = values.reshape(shape)
        return float(values) if size is None else values

    def normal(self, loc: float = 0.0, scale: float = 1.0, size=None) -> float | np.ndarray:
        """N(loc, scale^2) samples of shape `size` (a float when size is None), like numpy's."""
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        values = self.standard_normal(size)
        if size is None:
            return float(loc + scale * values)
        values *= scale
        values += loc
        return values

    def __repr__(self) -> str:
        return "SecureRandom(ChaCha20 keyed from os.urandom, no state)"


def secure_random() -> SecureRandom:
    """The generator of all DP noise drawn with numpy (see the module docstring)."""
    return SecureRandom()


# torch's CPU generator state (CPUGeneratorImplState, torch >= 1.x): uint64 initial seed, int32 left,
# int32 seeded, uint64 next, uint64 state[624] (each holding one 32-bit MT word), then normal caches.
_MT_WORDS = 624
_MT_LEFT_OFFSET, _MT_NEXT_OFFSET, _MT_STATE_OFFSET = 8, 16, 24


def os_entropy_torch_generator(device="cpu"):
    """A torch.Generator on `device` whose state comes from os.urandom; for Opacus' sampling and noise.

    On CPU, torch's generator is an MT19937, and ``manual_seed`` keeps only the low 32 bits of a seed
    (2**32 candidates: enumerable). So we write all 624 words of its state from os.urandom instead
    (19937 bits of entropy). MT19937 is not a cryptographic generator: 624 consecutive 32-bit outputs
    reveal its state. DP-SGD never exposes them: the Poisson masks (one comparison per example) never
    leave the site, and the noise leaves only summed into the trained update. On CUDA the generator
    is Philox4x32, whose 64-bit key is the seed: we draw it from os.urandom. Opacus' ``secure_mode``
    would add two things we do not have: torchcsprng's /dev/urandom-backed generator (every draw from
    the OS, no PRNG state at all) and the 2n-sample Gaussian that defeats floating-point attacks
    (Opacus' _generate_noise); it needs the torchcsprng package.
    """
    import torch

    device = torch.device(device)
    generator = torch.Generator(device=device)
    if device.type != "cpu":
        generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
        return generator
    state = generator.get_state().numpy().copy()
    _check_mt_state_layout(torch, state.size)
    words = np.frombuffer(os.urandom(4 * _MT_WORDS), dtype=np.uint32).astype("<u8")
    state[_MT_STATE_OFFSET:_MT_STATE_OFFSET + 8 * _MT_WORDS] = words.view(np.uint8)
    # left = 1, next = 0: the first draw regenerates (twists) the whole state before using it.
    state[_MT_LEFT_OFFSET:_MT_LEFT_OFFSET + 4] = np.array([1], dtype="<i4").view(np.uint8)
    state[_MT_NEXT_OFFSET:_MT_NEXT_OFFSET + 8] = np.array([0], dtype="<u8").view(np.uint8)
    generator.set_state(torch.from_numpy(state))
    return generator


def _check_mt_state_layout(torch, state_size: int) -> None:
    """Refuse to write a CPU generator state whose layout is not the one this module knows."""
    probe_seed = 0x1234_5678
    probe = torch.Generator().manual_seed(probe_seed).get_state().numpy()
    known = (
        sys.byteorder == "little"
        and state_size == probe.size
        and probe.size >= _MT_STATE_OFFSET + 8 * _MT_WORDS
        and int(probe[:8].view("<u8")[0]) == probe_seed
        and int(probe[_MT_STATE_OFFSET:_MT_STATE_OFFSET + 8].view("<u8")[0]) == probe_seed
    )
    if not known:
        raise RuntimeError(f"torch {torch.__version__}: unexpected CPU generator state layout; cannot fill it "
                           "from OS entropy (update federation/secure_random.py)")
