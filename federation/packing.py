"""Packed adapter transport: a dict of numpy arrays <-> ONE flat byte Array (+ a small layout) in a Flower ArrayRecord.

Flower moves every Array of a message as its own object (and its own request) between SuperLink, SuperNode and
the ClientApp process; a LoRA adapter is hundreds of tensors (224 for llama-1b all-linear), and moving them one
by one costs seconds per round (BENCHMARKS.md, "LoRA-delta transfer"). So every fedtune message that carries
tensors packs them: the ArrayRecord holds two Arrays,

* ``PACKED_KEY``: uint8, shape (nbytes,): the tensors' raw bytes, in order, each starting at a multiple of ALIGN;
* ``LAYOUT_KEY``: uint8, the UTF-8 JSON layout ``{"format", "names", "dtypes", "shapes", "offsets", "nbytes"}``
  (dtypes as numpy's ``dtype.str``, e.g. ``"<f4"``).

The layout travels inside the same ArrayRecord, so a packed record is self-describing wherever it goes
(``unpack_arrays`` needs nothing else), and a reply still holds exactly one ArrayRecord.

Unpacking validates before it allocates anything: both Arrays' declared and npy-header dtype and shape, the
payload length, the layout's types, an allow-list of dtypes, unique names, and offsets that must be exactly the
canonical ones for the declared shapes and dtypes (so entries can neither overlap, leave gaps, nor run past the
buffer). A receiver that knows what to expect (the coordinator, server/replies.py) also checks each entry's name
and size (``check_entry``) before anything is copied. A record without the packed keys is read Array by Array
(fedtune before packed transport, hand-built test messages). The bytes are copied once; values are bit-identical.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

PACKED_KEY = "fedtune.packed"
LAYOUT_KEY = "fedtune.layout"
LAYOUT_FORMAT = "fedtune.packed/1"
ALIGN = 8  # every entry starts at a multiple of the largest itemsize allowed, so each view is aligned
# Layout JSON size cap: ~100 bytes per entry; an adapter of 3 x 1000 codec parts stays well below it.
MAX_LAYOUT_BYTES = 1 << 20
MAX_NDIM = 8
# What an entry may be: the upload codecs' and adapters' dtypes (federation/compression.py), little-endian.
ALLOWED_DTYPES = frozenset(np.dtype(t).str for t in (np.float16, np.float32, np.float64, np.int8, np.uint8,
                                                      np.uint16, np.int32, np.int64))
_LAYOUT_FIELDS = ("format", "names", "dtypes", "shapes", "offsets", "nbytes")


class PackedLayoutError(ValueError):
    """A packed record whose layout or bytes are malformed; the message says what is wrong."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a packed record: name, dtype, shape and byte offset in the buffer."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        """Element count."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Byte count in the buffer."""
        return self.size * self.dtype.itemsize


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def canonical_offsets(dtypes: list[np.dtype], shapes: list[tuple[int, ...]]) -> tuple[list[int], int]:
    """(offset of each entry, total bytes) when entries follow each other, each aligned to ALIGN."""
    offsets, end = [], 0
    for dtype, shape in zip(dtypes, shapes):
        offsets.append(_align(end))
        end = offsets[-1] + math.prod(shape) * dtype.itemsize
    return offsets, end


def is_packed(record) -> bool:
    """True when `record` (a Flower ArrayRecord) is in the packed layout."""
    return PACKED_KEY in record or LAYOUT_KEY in record


def pack_arrays(arrays: Mapping[str, np.ndarray]):
    """numpy dict (any allowed dtypes and shapes) -> Flower ArrayRecord of one flat uint8 Array and its layout."""
    from flwr.app import Array, ArrayRecord
    from flwr.common.constant import SType

    values = [np.asarray(value) for value in arrays.values()]
    dtypes = [value.dtype for value in values]
    for name, dtype in zip(arrays, dtypes):
        if dtype.str not in ALLOWED_DTYPES:
            raise PackedLayoutError(f"{name}: dtype {dtype} cannot be packed (allowed: {sorted(ALLOWED_DTYPES)})")
    shapes = [tuple(int(d) for d in value.shape) for value in values]  # 0-d stays 0-d
    offsets, nbytes = canonical_offsets(dtypes, shapes)
    # The packed Array's bytes are what np.save writes for the flat uint8 buffer (Array(ndarray) would call it),
    # joined straight from the tensors: one copy of the payload, where zeros + fill + np.save + BytesIO made three.
    pieces, end = [npy_header(nbytes)], 0
    for value, offset in zip(values, offsets):
        pieces.append(bytes(offset - end))  # the alignment padding: zeros, so it is deterministic
        pieces.append(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)
        end = offset + value.nbytes
    packed = Array(dtype=str(np.dtype(np.uint8)), shape=(nbytes,), stype=SType.NUMPY, data=b"".join(pieces))
    layout_bytes = np.frombuffer(layout_json(list(arrays), dtypes, shapes), np.uint8)
    return ArrayRecord({PACKED_KEY: packed, LAYOUT_KEY: Array(layout_bytes)})


def npy_header(nbytes: int) -> bytes:
    """The npy header np.save writes before a C-ordered 1-D uint8 array of `nbytes` elements."""
    from numpy.lib import format as npy

    stream = io.BytesIO()
    npy.write_array_header_1_0(stream, {"descr": npy.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                                        "shape": (nbytes,)})
    return stream.getvalue()


def layout_json(names: list[str], dtypes: list[np.dtype], shapes: list[tuple[int, ...]]) -> bytes:
    """The layout of entries packed in this order, as the UTF-8 JSON that travels under LAYOUT_KEY."""
    offsets, nbytes = canonical_offsets(dtypes, shapes)
    layout = {"format": LAYOUT_FORMAT, "names": names, "dtypes": [np.dtype(d).str for d in dtypes],
              "shapes": [list(s) for s in shapes], "offsets": offsets, "nbytes": nbytes}
    return json.dumps(layout, separators=(",", ":")).encode()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Bytes read to parse an npy header: magic + length + the 10,000-byte header limit read_header enforces below.
NPY_HEADER_READ_BYTES = 10_000 + 16


def _npy_payload(array, what: str, max_bytes: int | None = None) -> tuple[memoryview, int]:
    """(the Flower Array's raw bytes, payload length) of a 1-D uint8 npy Array, checked without allocating."""
    from numpy.lib import format as npy

    if array.stype != "numpy.ndarray" or array.dtype != "uint8" or len(array.shape) != 1 \
            or not _is_int(array.shape[0]):
        raise PackedLayoutError(f"{what} must be a 1-D uint8 numpy Array, got {array.stype} {array.dtype} "
                                f"{tuple(array.shape)[:MAX_NDIM]}")
    length = array.shape[0]
    if max_bytes is not None and length > max_bytes:
        raise PackedLayoutError(f"{what} of {length} bytes exceeds {max_bytes}")
    data = memoryview(array.data)
    stream = io.BytesIO(data[:NPY_HEADER_READ_BYTES])  # BytesIO copies what it is given: the header only
    try:
        version = npy.read_magic(stream)
        read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"npy version {version}")
        shape, _, dtype = read_header(stream, max_header_size=10_000)
    except (ValueError, TypeError, SyntaxError, EOFError) as exc:
        raise PackedLayoutError(f"{what}: unreadable npy header: {exc}") from None
    header = stream.tell()
    if dtype != np.uint8 or tuple(shape) != (length,) or len(data) - header != length:
        raise PackedLayoutError(f"{what}: npy header says {dtype} {shape} with {len(data) - header} payload bytes, "
                                f"the Array says uint8 ({length},)")
    return data[header:], length


def read_layout(record) -> list[Entry]:
    """The checked entries of a packed record (PackedLayoutError naming the first problem); allocates nothing big."""
    if PACKED_KEY not in record or LAYOUT_KEY not in record or len(record) != 2:
        raise PackedLayoutError(f"a packed record holds exactly {PACKED_KEY!r} and {LAYOUT_KEY!r}, got "
                                f"{len(record)} arrays {sorted(record)[:4]}")
    layout_bytes, _ = _npy_payload(record[LAYOUT_KEY], "layout", MAX_LAYOUT_BYTES)
    _, nbytes = _npy_payload(record[PACKED_KEY], "packed buffer")
    try:
        layout = json.loads(bytes(layout_bytes).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PackedLayoutError(f"layout is not JSON: {type(exc).__name__}") from None
    if not isinstance(layout, dict) or sorted(layout) != sorted(_LAYOUT_FIELDS):
        raise PackedLayoutError(f"layout must be an object with exactly {list(_LAYOUT_FIELDS)}")
    if layout["format"] != LAYOUT_FORMAT:
        raise PackedLayoutError(f"layout format must be {LAYOUT_FORMAT!r}, got {str(layout['format'])[:40]!r}")
    names, dtypes, shapes, offsets = (layout[k] for k in ("names", "dtypes", "shapes", "offsets"))
    if not all(isinstance(v, list) for v in (names, dtypes, shapes, offsets)) \
            or not len(names) == len(dtypes) == len(shapes) == len(offsets):
        raise PackedLayoutError("layout names, dtypes, shapes and offsets must be lists of one length")
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise PackedLayoutError("layout names must be unique strings")
    for name, dtype, shape, offset in zip(names, dtypes, shapes, offsets):
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise PackedLayoutError(f"{name[:80]}: dtype {str(dtype)[:20]!r} is not allowed "
                                    f"({sorted(ALLOWED_DTYPES)})")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
            raise PackedLayoutError(f"{name[:80]}: shape must be at most {MAX_NDIM} non-negative ints")
        if not _is_int(offset):
            raise PackedLayoutError(f"{name[:80]}: offset must be an int")
    parsed_dtypes = [np.dtype(d) for d in dtypes]
    parsed_shapes = [tuple(s) for s in shapes]
    expected_offsets, end = canonical_offsets(parsed_dtypes, parsed_shapes)
    for name, offset, expected in zip(names, offsets, expected_offsets):
        if offset != expected:
            raise PackedLayoutError(f"{name[:80]}: offset {offset} is not the canonical {expected} "
                                    f"(entries follow each other, aligned to {ALIGN} bytes)")
    if layout["nbytes"] != end or end != nbytes:
        raise PackedLayoutError(f"layout declares {str(layout['nbytes'])[:20]} bytes, its entries need {end}, "
                                f"the buffer holds {nbytes}")
    return [Entry(n, d, s, o) for n, d, s, o in zip(names, parsed_dtypes, parsed_shapes, offsets)]


def unpack_arrays(record, check_entry: Callable[[Entry], None] | None = None, *, copy: bool = True
                  ) -> dict[str, np.ndarray]:
    """Flower ArrayRecord -> numpy dict with the dtypes and shapes as sent (packed or one Array per tensor).

    check_entry(entry) runs on every entry of a packed record after its layout is checked and before the
    buffer is copied; it raises to refuse the record (the coordinator checks names and sizes against the
    adapter it expects). PackedLayoutError for a malformed packed record. copy=False returns read-only views
    of the record's bytes (a packed record only; the coordinator decodes them right away and keeps no copy).
    """
    if not is_packed(record):
        return {key: value.numpy() for key, value in record.items()}
    entries = read_layout(record)
    if check_entry is not None:
        for entry in entries:
            check_entry(entry)
    payload, nbytes = _npy_payload(record[PACKED_KEY], "packed buffer")
    buffer = np.frombuffer(payload, np.uint8, count=nbytes)
    if copy:
        buffer = buffer.copy()  # one copy: writable, owned arrays
    return {e.name: buffer[e.offset:e.offset + e.nbytes].view(e.dtype).reshape(e.shape) for e in entries}
