"""Upload codecs for LoRA deltas: float32 arrays <-> compact numpy arrays that fit in a Flower ArrayRecord.

A delta is ``dict[str, np.ndarray]`` (float32, PEFT keys). Encoding maps every tensor to one or more
arrays whose keys say what they are, so an encoded upload is readable without knowing its codec:

======  =====================================================  ==============================
codec   encoded keys (dtype)                                    bytes per element
======  =====================================================  ==============================
fp32    ``key`` (float32): unchanged, today's wire format       4
bf16    ``key::bf16`` (uint16: upper half of the float32 bits)  2
fp16    ``key::fp16`` (float16)                                 2
int8    ``key::q`` (int8) + ``key::scale`` (float32)            1 (+4 per scale)
int4    ``key::q4`` (uint8: two 4-bit codes per byte) +         0.5 + 4 / block (+4 per dim)
        ``key::scale4`` (float32, one per block of elements)
        + ``key::shape4`` (int32: block size, then shape)
topk    ``key::idx`` (int32, flat) + ``key::val`` (float16,     6 * fraction (+8 for the shape)
        or uint16 = bf16 bits) + ``key::shape`` (int32)
======  =====================================================  ==============================

Lossy codecs should run behind ``ErrorFeedback`` (EF-SGD, Seide et al. 2014; Karimireddy et al. 2019):
what compression drops in one round is added to the site's next delta, so nothing is lost for good.

A site's delta may also be torch tensors on the model's device (federation.adapter.trained_delta): on a GPU, bf16
(with or without error feedback) is computed there and only its payload is copied to the host (``on_device``,
``bf16_on_device``: the same bytes as the host path); its residual stays there as ``DeviceArrays`` for the site's
next round (client/site_state.py copies it to the host for the file, in the background). Every other codec copies
the delta first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

CODECS = ("fp32", "bf16", "fp16", "int8", "int4", "topk")
SEPARATOR = "::"
INT8_LEVELS = 127  # symmetric int8: q in [-127, 127], so -x encodes as -q
INT4_LEVELS = 7  # symmetric int4: q in [-7, 7], stored as q + 8 in a nibble (0 is never used)
BF16_QUIET_NAN = np.uint16(0x7FC0)  # what torch.bfloat16 turns every NaN into
FP16_MAX = float(np.finfo(np.float16).max)

# suffix -> codec, for every part an encoded upload may hold
_PART_CODEC = {"bf16": "bf16", "fp16": "fp16", "q": "int8", "scale": "int8", "idx": "topk", "val": "topk",
               "shape": "topk", "q4": "int4", "scale4": "int4", "shape4": "int4"}


# --------------------------------------------------------------------------- bfloat16 without a numpy dtype


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 (any shape) -> uint16 bfloat16 bit patterns, round-to-nearest-even as torch.bfloat16; same shape.

    torch's own conversion (c10/util/BFloat16.h's rounding): one vectorised, multi-threaded pass, where the same
    rounding written out on the bits in numpy took several (~10x slower on a site's upload). Every NaN becomes
    BF16_QUIET_NAN (torch's vectorised CPU cast may give another NaN pattern).
    """
    import torch

    values = np.ascontiguousarray(x, dtype=np.float32)
    out = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = BF16_QUIET_NAN
    return out


def bf16_bits_to_float32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact: bf16 is the upper half of a float32); same shape.

    `out` (float32, bits' shape) is written in place when given: a reused buffer avoids page faults.
    """
    bits = np.asarray(bits, dtype=np.uint16)
    if out is None:
        out = np.empty(bits.shape, dtype=np.float32)
    if out.shape != bits.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {bits.shape}, got {out.dtype} {out.shape}")
    np.left_shift(bits, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    return out


def on_device(delta: Mapping, codec: "UploadCodec") -> bool:
    """Whether `delta` is encoded where its tensors are (bf16_on_device): torch tensors on a GPU with the bf16 codec.

    The one place this is decided. Every other delta goes the host path: torch tensors are copied to the host first
    (federation.adapter.host_arrays); the other codecs' arithmetic (scales, top-k, packing) is numpy's. CPU tensors
    too: there is no copy to save, and the host path measured faster on CPU (bf16_on_device works on any device).
    """
    import torch

    return codec.name == "bf16" and any(isinstance(v, torch.Tensor) and v.device.type == "cuda"
                                        for v in delta.values())


@dataclass(frozen=True, eq=False)
class DeviceArrays:
    """float32 arrays kept where they were computed, as one flat torch tensor: the bf16 residual of a GPU site.

    Never written into once made (each round makes a new one): another thread may be copying it (to_host).
    """

    flat: Any  # torch.Tensor: the arrays in `shapes`' order, each flattened
    shapes: dict[str, tuple[int, ...]]
    # CUDA: recorded on the computing stream once `flat` was queued, so a copy on another stream waits for it.
    ready: Any = None

    @classmethod
    def of(cls, flat, shapes: Mapping[str, tuple[int, ...]]) -> "DeviceArrays":
        """Wrap a flat tensor just computed on the current stream."""
        import torch

        ready = None
        if flat.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(flat.device))
        return cls(flat, dict(shapes), ready)

    def clone(self) -> "DeviceArrays":
        """A copy on the same device (a device-to-device copy on the current stream)."""
        return DeviceArrays.of(self.flat.clone(), self.shapes)

    def to_host(self) -> dict[str, np.ndarray]:
        """{key: float32 numpy array}, from any thread: CPU tensors shared; CUDA copied on a stream of its own.

        The copy's stream waits for `ready`, so it sees the finished values, and does not queue behind (nor hold
        up) what the current stream runs meanwhile (the next round's training). `self` holds `flat` until the copy
        is done, so its memory cannot be reused under it.
        """
        import torch

        from federation.adapter import split_flat, to_numpy

        if self.ready is None:
            (flat,) = to_numpy([self.flat])
        else:
            stream = torch.cuda.Stream(self.flat.device)
            stream.wait_event(self.ready)
            with torch.cuda.stream(stream):
                (flat,) = to_numpy([self.flat])  # copies on, and waits for, the current stream: this one
        return dict(zip(self.shapes, split_flat(flat, list(self.shapes.values()))))


def on_host(arrays: Mapping[str, np.ndarray] | DeviceArrays) -> Mapping[str, np.ndarray]:
    """Numpy arrays as they are, DeviceArrays copied to the host."""
    return arrays.to_host() if isinstance(arrays, DeviceArrays) else arrays


def bf16_on_device(delta: Mapping, residual: Mapping[str, np.ndarray] | DeviceArrays | None = None
                   ) -> tuple[dict[str, np.ndarray], DeviceArrays | None]:
    """(bf16-encoded delta + residual, what the encoding dropped), computed where the delta's torch tensors are.

    Bit for bit the host path (float32_to_bf16_bits, ErrorFeedback's float32 arithmetic): x = delta + residual,
    q = bf16(x) rounded to nearest even, NaN as BF16_QUIET_NAN, residual' = x - q. Only the 2-byte payload comes to
    the host, in one copy; with feedback (residual not None: {} in the first round, a file's numpy arrays after a
    restart, else last round's DeviceArrays) residual' stays on the device as DeviceArrays; without, it is None.
    The tensors of one upload are concatenated, so each step is one kernel.
    """
    import torch

    from federation.adapter import split_flat, to_numpy

    keys = list(delta)
    for key in keys:
        if SEPARATOR in key:
            raise ValueError(f"{key}: adapter keys must not contain {SEPARATOR!r}")
    shapes = {k: tuple(delta[k].shape) for k in keys}
    x = torch.cat([delta[k].detach().float().reshape(-1) for k in keys])
    if residual:
        x += _residual_on(residual, shapes, x.device)
    q = x.to(torch.bfloat16)
    bits = q.view(torch.int16)
    bits.masked_fill_(torch.isnan(x), int(BF16_QUIET_NAN))  # 0x7FC0 < 2**15: the same bits as int16
    kept = None if residual is None else DeviceArrays.of(x.sub_(q.float()), shapes)
    (hosted,) = to_numpy([bits])
    encoded = {f"{k}::bf16": value.view(np.uint16) for k, value in zip(keys, split_flat(hosted, shapes.values()))}
    return encoded, kept


def _residual_on(residual: Mapping[str, np.ndarray] | DeviceArrays, shapes: dict[str, tuple[int, ...]], device):
    """The residual as one flat float32 tensor on `device` in the order of `shapes`: last round's DeviceArrays there
    as it is; anything else (a restarted site's file) concatenated and copied there."""
    if isinstance(residual, DeviceArrays) and residual.flat.device == device and \
            list(residual.shapes.items()) == list(shapes.items()):
        return residual.flat
    residual = on_host(residual)
    _check_residual(residual, shapes)
    from federation.adapter import to_device_flat

    return to_device_flat([residual[k] for k in shapes], device)


# --------------------------------------------------------------------------- one tensor


def _check_fp16_range(key: str, x: np.ndarray) -> None:
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > FP16_MAX:
        raise ValueError(f"{key}: |value| {peak:.3g} overflows float16 (max {FP16_MAX}); use bf16 instead")


def int8_scales(x: np.ndarray, per_row: bool) -> np.ndarray:
    """absmax / 127 as float32: shape (1,) per tensor, or (rows,) per row (axis 0) when per_row and x.ndim >= 2."""
    a = np.abs(x.astype(np.float32, copy=False))
    peak = a.reshape(x.shape[0], -1).max(axis=1) if per_row and x.ndim >= 2 and x.size else \
        np.array([a.max() if a.size else 0.0])
    return (peak / INT8_LEVELS).astype(np.float32)


def _scale_broadcast(scale: np.ndarray, ndim: int) -> np.ndarray:
    return scale.reshape((-1,) + (1,) * (ndim - 1)) if scale.size > 1 else scale.reshape(())


def topk_count(size: int, fraction: float) -> int:
    """How many entries topk keeps of `size`: ceil(fraction * size), at least 1 of a non-empty tensor."""
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


def _encode_tensor(key: str, x: np.ndarray, codec: "UploadCodec") -> dict[str, np.ndarray]:
    if codec.name == "fp32":
        return {key: x}
    if codec.name == "bf16":
        return {f"{key}::bf16": float32_to_bf16_bits(x)}
    if codec.name == "fp16":
        _check_fp16_range(key, x)
        return {f"{key}::fp16": x.astype(np.float16)}
    if codec.name in ("int8", "int4", "topk") and not np.all(np.isfinite(x)):
        # bf16/fp16 carry NaN/Inf to the coordinator, which rejects the update; these codecs would hide them.
        raise ValueError(f"{key}: non-finite values cannot be {codec.name}-encoded")
    if codec.name == "int8":
        scale = int8_scales(x, codec.int8_per_row)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
        # Divide by the float32 scale that is sent, so |x - q * scale| <= scale / 2 holds for the decoded value.
        q = np.rint(x.astype(np.float64) / _scale_broadcast(safe, x.ndim))
        return {f"{key}::q": np.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(np.int8), f"{key}::scale": scale}
    if codec.name == "int4":
        return _encode_int4(key, x, codec.int4_block)
    # topk
    flat = x.reshape(-1)
    k = topk_count(flat.size, codec.topk_fraction)
    idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]) if k < flat.size else \
        np.arange(flat.size)
    values = flat[idx]
    if codec.topk_values == "fp16":
        _check_fp16_range(key, values)
        encoded_values = values.astype(np.float16)
    else:
        encoded_values = float32_to_bf16_bits(values)
    return {f"{key}::idx": idx.astype(np.int32), f"{key}::val": encoded_values,
            f"{key}::shape": np.asarray(x.shape, dtype=np.int32)}


def _encode_int4(key: str, x: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """Blockwise absmax int4 (as bitsandbytes' 4-bit blocks, but symmetric): |x - decoded| <= scale / 2 per block."""
    flat = x.reshape(-1).astype(np.float64)
    blocks = math.ceil(flat.size / block) if flat.size else 0
    padded = np.zeros(blocks * block)
    padded[:flat.size] = flat
    # float32 scales are what is sent, so quantize against exactly those
    scale = (np.abs(padded.reshape(blocks, block)).max(axis=1) / INT4_LEVELS).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
    q = np.clip(np.rint(padded.reshape(blocks, block) / safe[:, None]), -INT4_LEVELS, INT4_LEVELS).reshape(-1)
    codes = (q + INT4_LEVELS + 1).astype(np.uint8)  # 1..15
    if codes.size % 2:
        codes = np.append(codes, np.uint8(INT4_LEVELS + 1))
    packed = codes[0::2] | (codes[1::2] << 4)
    return {f"{key}::q4": packed.astype(np.uint8), f"{key}::scale4": scale,
            f"{key}::shape4": np.asarray((block, *x.shape), dtype=np.int32)}


def _check_declared_size(key: str, shape: tuple[int, ...], max_elements: int | None) -> int:
    """prod(shape), refused above max_elements: a declared shape must not make the decoder allocate at will."""
    size = math.prod(shape)
    if max_elements is not None and size > max_elements:
        raise ValueError(f"{key}: declared shape {list(shape)} ({size} elements) exceeds the largest expected "
                         f"tensor ({max_elements} elements)")
    return size


def _decode_int4(encoded: Mapping[str, np.ndarray], key: str, max_elements: int | None = None) -> np.ndarray:
    packed = _part(encoded, key, "q4", (np.uint8,))
    scale = _part(encoded, key, "scale4", (np.float32,))
    header = _part(encoded, key, "shape4", (np.int32,))  # block size, then the tensor's shape
    if header.ndim != 1 or header.size < 1 or header[0] < 1 or np.any(header[1:] < 0):
        raise ValueError(f"{key}::shape4: expected [block >= 1, *shape], got {header.tolist()}")
    block, shape = int(header[0]), tuple(int(s) for s in header[1:])
    size = _check_declared_size(key, shape, max_elements)
    blocks = math.ceil(size / block)
    if scale.shape != (blocks,) or packed.shape != ((blocks * block + 1) // 2,):
        raise ValueError(f"{key}: int4 parts q4 {packed.shape}, scale4 {scale.shape} do not fit shape {list(shape)} "
                         f"in blocks of {block}")
    codes = np.empty(2 * packed.size, dtype=np.float32)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    q = codes[:blocks * block].reshape(blocks, block) - (INT4_LEVELS + 1)
    return (q * scale[:, None]).reshape(-1)[:size].astype(np.float32).reshape(shape)


def _part(encoded: Mapping[str, np.ndarray], key: str, suffix: str, dtypes: tuple) -> np.ndarray:
    name = f"{key}{SEPARATOR}{suffix}"
    if name not in encoded:
        raise ValueError(f"{key}: encoded upload lacks part {name!r}")
    value = np.asarray(encoded[name])
    if value.dtype not in [np.dtype(d) for d in dtypes]:
        raise ValueError(f"{name}: dtype {value.dtype}, expected {' or '.join(np.dtype(d).name for d in dtypes)}")
    return value


def _decode_tensor(encoded: Mapping[str, np.ndarray], key: str, codec: str,
                   max_elements: int | None = None) -> np.ndarray:
    if codec == "fp32":
        value = np.asarray(encoded[key])
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{key}: dtype {value.dtype}, expected a float (or encoded parts {key}::...)")
        return value.astype(np.float32, copy=False)
    if codec == "bf16":
        return bf16_bits_to_float32(_part(encoded, key, "bf16", (np.uint16,)))
    if codec == "fp16":
        return _part(encoded, key, "fp16", (np.float16,)).astype(np.float32)
    if codec == "int8":
        q = _part(encoded, key, "q", (np.int8,))
        scale = _part(encoded, key, "scale", (np.float32,))
        rows = q.shape[0] if q.ndim >= 1 else 1
        if scale.ndim != 1 or scale.size not in (1, rows):
            raise ValueError(f"{key}::scale: shape {scale.shape}, expected (1,) or ({rows},) for q of shape {q.shape}")
        return (q.astype(np.float32) * _scale_broadcast(scale, q.ndim)).astype(np.float32)
    if codec == "int4":
        return _decode_int4(encoded, key, max_elements)
    idx = _part(encoded, key, "idx", (np.int32,))
    values = _part(encoded, key, "val", (np.float16, np.uint16))
    shape = _part(encoded, key, "shape", (np.int32,))
    if shape.ndim != 1 or np.any(shape < 0):
        raise ValueError(f"{key}::shape: not a shape: {shape.tolist()}")
    size = _check_declared_size(key, tuple(int(s) for s in shape), max_elements)
    if idx.ndim != 1 or values.shape != idx.shape:
        raise ValueError(f"{key}: topk idx {idx.shape} and val {values.shape} must be 1-D of one length")
    if idx.size and (idx.min() < 0 or idx.max() >= size or np.any(np.diff(idx) <= 0)):
        raise ValueError(f"{key}::idx: indices must be strictly increasing in [0, {size})")
    dense = np.zeros(size, dtype=np.float32)
    dense[idx] = values.astype(np.float32) if values.dtype == np.float16 else bf16_bits_to_float32(values)
    return dense.reshape(tuple(int(s) for s in shape))


# --------------------------------------------------------------------------- whole uploads


@dataclass(frozen=True)
class UploadCodec:
    """How a site compresses its delta; `name` in CODECS, the other fields matter only to their codec."""

    name: str = "bf16"
    # topk: fraction of each tensor's entries kept (largest |value|), and how the kept values travel.
    topk_fraction: float = 0.1
    topk_values: str = "fp16"  # "fp16" (10-bit mantissa) | "bf16" (float32's range)
    # int8: one absmax scale per row (axis 0) instead of one per tensor.
    int8_per_row: bool = False
    # int4: one absmax scale per this many consecutive elements (flattened); 64 as bitsandbytes' NF4 blocks.
    int4_block: int = 64

    def __post_init__(self):
        if self.name not in CODECS:
            raise ValueError(f"unknown upload codec {self.name!r}; valid: {list(CODECS)}")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ValueError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if self.int4_block < 1:
            raise ValueError(f"int4_block must be >= 1, got {self.int4_block}")
        if self.topk_values not in ("fp16", "bf16"):
            raise ValueError(f"topk_values must be fp16 or bf16, got {self.topk_values!r}")

    @property
    def lossless(self) -> bool:
        """fp32 sends the delta as is."""
        return self.name == "fp32"

    def encode(self, delta: Mapping) -> dict[str, np.ndarray]:
        """float32 delta (numpy arrays, or torch tensors on one device) -> encoded arrays (keys as in the module table)."""
        if on_device(delta, self):
            return bf16_on_device(delta)[0]
        out: dict[str, np.ndarray] = {}
        for key, value in _host(delta).items():
            if SEPARATOR in key:
                raise ValueError(f"{key}: adapter keys must not contain {SEPARATOR!r}")
            out.update(_encode_tensor(key, np.asarray(value, dtype=np.float32), self))
        return out


def encode_upload(delta: Mapping[str, np.ndarray], codec: UploadCodec | str = "bf16") -> dict[str, np.ndarray]:
    """float32 delta {key: array} -> encoded {key or key::part: array}; `codec` a name or an UploadCodec."""
    return (UploadCodec(codec) if isinstance(codec, str) else codec).encode(delta)


def upload_codecs(encoded: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Adapter key -> the codec its parts say it was encoded with; ValueError on an unknown or mixed part."""
    parts: dict[str, set[str]] = {}
    for name in encoded:
        key, sep, suffix = name.rpartition(SEPARATOR)
        if not sep:
            key, suffix = name, ""
        elif suffix not in _PART_CODEC:
            raise ValueError(f"{name}: unknown encoded part {suffix!r}; known: {sorted(_PART_CODEC)}")
        parts.setdefault(key, set()).add(suffix)
    codecs: dict[str, str] = {}
    for key, suffixes in parts.items():
        found = {_PART_CODEC.get(s, "fp32") for s in suffixes}
        if len(found) != 1:
            raise ValueError(f"{key}: parts of several codecs {sorted(found)} ({sorted(suffixes)})")
        codecs[key] = found.pop()
    return codecs


def decode_upload(encoded: Mapping[str, np.ndarray], max_elements: int | None = None) -> dict[str, np.ndarray]:
    """Encoded upload -> float32 delta {key: array}; ValueError naming the key on missing/wrong parts.

    max_elements: the largest tensor the receiver expects; codecs that declare a shape (topk, int4) are refused
    above it before anything is allocated (an untrusted upload).
    """
    return {key: _decode_tensor(encoded, key, codec, max_elements) for key, codec in upload_codecs(encoded).items()}


def encoded_nbytes(encoded: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of an encoded upload (array data only; Flower adds ~130 bytes of header per array)."""
    return int(sum(np.asarray(v).nbytes for v in encoded.values()))


# --------------------------------------------------------------------------- error feedback


def _host(delta: Mapping) -> Mapping[str, np.ndarray]:
    """The delta as numpy arrays: torch tensors (trained_delta's, on the model's device) copied to the host."""
    import torch

    if any(isinstance(v, torch.Tensor) for v in delta.values()):
        from federation.adapter import host_arrays

        return host_arrays(delta)
    return delta


def _check_residual(residual: Mapping[str, np.ndarray], shapes: Mapping[str, tuple]) -> None:
    """ValueError unless the residual has exactly the delta's keys and shapes."""
    if set(residual) != set(shapes):
        diff = sorted(set(residual) ^ set(shapes))
        raise ValueError(f"error-feedback residual and delta have different keys, e.g. {diff[:3]}")
    for key, shape in shapes.items():
        if tuple(shape) != np.shape(residual[key]):
            raise ValueError(f"{key}: delta shape {tuple(shape)} vs residual {np.shape(residual[key])}")


class ErrorFeedback:
    """A site's compression residual e (EF-SGD): send C(delta + e), keep e <- delta + e - decode(C(delta + e)).

    The residual is one float32 adapter held at the site: numpy arrays, or DeviceArrays after an encoding on the
    device (bf16_on_device); ``state_dict()`` is {key: residual} so it can be checkpointed with the site's other
    state (a Flower ArrayRecord, np.savez).
    """

    def __init__(self, residual: Mapping[str, np.ndarray] | DeviceArrays | None = None) -> None:
        """Start from `residual` (a state_dict() or DeviceArrays, kept as given: not copied), or from none."""
        self.residual: dict[str, np.ndarray] | DeviceArrays = \
            residual if isinstance(residual, DeviceArrays) else dict(residual or {})

    def compensate(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """delta + residual (float32), key by key; the residual must have the delta's keys and shapes (or be empty)."""
        residual = on_host(self.residual)
        if not residual:
            return {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}
        _check_residual(residual, {k: np.shape(v) for k, v in delta.items()})
        return {key: np.asarray(value, dtype=np.float32) + residual[key] for key, value in delta.items()}

    def encode(self, delta: Mapping, codec: UploadCodec | str) -> dict[str, np.ndarray]:
        """Encode delta + residual with `codec` and keep what the encoding dropped as the next residual.

        delta: numpy arrays, or torch tensors on one device (on a GPU with bf16: encoded there, bf16_on_device, and
        the residual kept there).
        """
        codec = UploadCodec(codec) if isinstance(codec, str) else codec
        if on_device(delta, codec):
            encoded, self.residual = bf16_on_device(delta, self.residual)
            return encoded
        corrected = self.compensate(_host(delta))
        encoded = codec.encode(corrected)
        if codec.lossless:
            self.residual = {}
        else:
            decoded = decode_upload(encoded)
            self.residual = {k: corrected[k] - decoded[k] for k in corrected}
        return encoded

    def reset(self) -> None:
        """Forget the residual (the adapter shape or the federation changed)."""
        self.residual = {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """{adapter key: residual (float32, the key's shape)} on the host; empty before the first lossy round."""
        return {k: v.copy() for k, v in on_host(self.residual).items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a residual saved by state_dict()."""
        self.residual = {k: np.asarray(v, dtype=np.float32).copy() for k, v in state.items()}
