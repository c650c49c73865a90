"""Packed adapter transport (federation/packing.py): one flat Array per record, bit-identical, malformed layouts refused."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from federation.adapter import from_array_record, to_array_record
from federation.compression import CODECS, UploadCodec, decode_upload
from federation.packing import (LAYOUT_KEY, PACKED_KEY, PackedLayoutError, is_packed, pack_arrays, read_layout,
                                unpack_arrays)


def _mixed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"m.l0.lora_A.weight": rng.standard_normal((3, 5)).astype(np.float32),
            "m.l0.lora_B.weight::q": rng.integers(-127, 128, (7, 3), dtype=np.int8),
            "m.l0.lora_B.weight::scale": np.float32([0.25]),
            "c": rng.standard_normal((2, 2)),
            "bits": rng.integers(0, 2**16, (4,), dtype=np.uint16),
            "empty": np.zeros((0, 3), np.float32), "scalar": np.array(7, np.int32)}


def _record(layout: dict, buffer: np.ndarray) -> ArrayRecord:
    return ArrayRecord({PACKED_KEY: Array(buffer),
                        LAYOUT_KEY: Array(np.frombuffer(json.dumps(layout).encode(), np.uint8))})


def _layout(record: ArrayRecord) -> tuple[dict, np.ndarray]:
    return json.loads(record[LAYOUT_KEY].numpy().tobytes()), record[PACKED_KEY].numpy()


def test_pack_unpack_is_bit_identical_in_order_dtype_and_shape():
    arrays = _mixed()
    record = pack_arrays(arrays)
    assert sorted(record) == sorted([PACKED_KEY, LAYOUT_KEY]) and is_packed(record)
    back = unpack_arrays(record)
    assert list(back) == list(arrays)
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert back[key].tobytes() == value.tobytes(), key
        assert back[key].flags.writeable and back[key].flags.aligned


@pytest.mark.parametrize("arrays", [_mixed(), {"only": np.float32([1.5])}, {"empty": np.zeros((0,), np.int8)}, {},
                                    {"transposed": np.arange(12, dtype=np.float16).reshape(3, 4).T,
                                     "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
                                     "strided": np.arange(10, dtype=np.uint8)[::3]}])
def test_the_packed_array_is_byte_identical_to_np_save_of_the_flat_buffer(arrays):
    # What pack_arrays wrote before it joined the bytes itself: the flat buffer, zero-padded, as Array(ndarray).
    record = pack_arrays(arrays)
    layout, _ = _layout(record)
    buffer = np.zeros(layout["nbytes"], np.uint8)
    for value, offset in zip(arrays.values(), layout["offsets"]):
        buffer[offset:offset + value.nbytes] = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    expected = Array(buffer)
    packed = record[PACKED_KEY]
    assert (packed.dtype, packed.shape, packed.stype) == (expected.dtype, expected.shape, expected.stype)
    assert isinstance(packed.data, bytes) and packed.data == expected.data
    assert packed.object_id == expected.object_id


def test_an_adapter_is_one_flower_array_whatever_its_tensor_count():
    adapter = {f"layers.{i}.lora_A.weight": np.full((2, 3), i, np.float32) for i in range(300)}
    record = to_array_record(adapter)
    assert len(record) == 2 and record[PACKED_KEY].shape == (300 * 2 * 3 * 4,)
    assert all(np.array_equal(from_array_record(record)[k], v) for k, v in adapter.items())


def test_unpacked_records_are_still_read():
    arrays = {"a": np.arange(4, dtype=np.float32), "b::q": np.int8([1, -1])}
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    assert not is_packed(record)
    assert all(np.array_equal(unpack_arrays(record)[k], v) for k, v in arrays.items())


@pytest.mark.parametrize("codec", CODECS)
def test_every_upload_codec_survives_packing_bit_for_bit(codec):
    rng = np.random.default_rng(1)
    delta = {f"m.l{i}.lora_{ab}.weight": rng.standard_normal((4, 6)).astype(np.float32) for i in range(3) for ab in "AB"}
    encoded = UploadCodec(codec).encode(delta)
    decoded_direct, decoded_packed = decode_upload(encoded), decode_upload(unpack_arrays(pack_arrays(encoded)))
    for key in delta:
        assert decoded_packed[key].tobytes() == decoded_direct[key].tobytes()


def test_unsupported_dtypes_are_not_packed():
    with pytest.raises(PackedLayoutError, match="dtype"):
        pack_arrays({"x": np.array(["a"])})


def _mutations():
    """(what, change(layout, buffer) -> (layout, buffer) or a raw ArrayRecord, expected message part)."""
    def edit(**fields):
        return lambda layout, buffer: ({**layout, **fields}, buffer)

    return [
        ("offset shifted", lambda l, b: ({**l, "offsets": [l["offsets"][0]] + [o + 8 for o in l["offsets"][1:]]}, b),
         "canonical"),
        ("overlapping entries", lambda l, b: ({**l, "offsets": [0] * len(l["offsets"])}, b), "canonical"),
        ("shape larger than the buffer", lambda l, b: ({**l, "shapes": [[10**6, 10**6]] + l["shapes"][1:]}, b),
         "canonical"),
        ("buffer shorter", lambda l, b: (l, b[:-8]), "bytes"),
        ("buffer longer", lambda l, b: (l, np.concatenate([b, np.zeros(8, np.uint8)])), "bytes"),
        ("nbytes lies", edit(nbytes=4), "bytes"),
        ("object dtype", lambda l, b: ({**l, "dtypes": ["|O"] + l["dtypes"][1:]}, b), "not allowed"),
        ("complex dtype", lambda l, b: ({**l, "dtypes": ["<c8"] + l["dtypes"][1:]}, b), "not allowed"),
        ("big-endian dtype", lambda l, b: ({**l, "dtypes": [">f4"] + l["dtypes"][1:]}, b), "not allowed"),
        ("negative dimension", lambda l, b: ({**l, "shapes": [[-3, 5]] + l["shapes"][1:]}, b), "non-negative"),
        ("float dimension", lambda l, b: ({**l, "shapes": [[3.0, 5]] + l["shapes"][1:]}, b), "non-negative"),
        ("bool offset", lambda l, b: ({**l, "offsets": [False] + l["offsets"][1:]}, b), "offset must be an int"),
        ("duplicate names", lambda l, b: ({**l, "names": [l["names"][0]] * len(l["names"])}, b), "unique"),
        ("lists of different lengths", lambda l, b: ({**l, "names": l["names"][:-1]}, b), "one length"),
        ("unknown format", edit(format="other/9"), "format"),
        ("missing field", lambda l, b: ({k: v for k, v in l.items() if k != "offsets"}, b), "exactly"),
        ("extra field", edit(comment="hi"), "exactly"),
        ("layout not an object", lambda l, b: ([1, 2], b), "exactly"),
    ]


@pytest.mark.parametrize("what,change,message", _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_layouts_are_refused_with_a_reason(what, change, message):
    layout, buffer = change(*_layout(pack_arrays(_mixed())))
    with pytest.raises(PackedLayoutError, match=message):
        unpack_arrays(_record(layout, buffer))


def test_malformed_records_are_refused_before_the_npy_payload_is_read():
    good = pack_arrays(_mixed())
    cases = {
        "no layout": ArrayRecord({PACKED_KEY: good[PACKED_KEY]}),
        "third array": ArrayRecord({**{k: good[k] for k in good}, "x": Array(np.zeros(1, np.float32))}),
        "buffer not uint8": ArrayRecord({PACKED_KEY: Array(np.zeros(4, np.float32)), LAYOUT_KEY: good[LAYOUT_KEY]}),
        "layout not JSON": ArrayRecord({PACKED_KEY: good[PACKED_KEY], LAYOUT_KEY: Array(np.uint8([255, 0, 1]))}),
    }
    for what, record in cases.items():
        with pytest.raises(PackedLayoutError):
            read_layout(record)
    # An npy header that declares far more than the Array carries (np.load would allocate it first).
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "|u1", "fortran_order": False, "shape": (2**40,)})
    lying = Array(dtype="uint8", shape=(2**40,), stype="numpy.ndarray", data=stream.getvalue() + b"\0" * 16)
    with pytest.raises(PackedLayoutError, match="payload"):
        read_layout(ArrayRecord({PACKED_KEY: lying, LAYOUT_KEY: good[LAYOUT_KEY]}))


def test_check_entry_runs_on_every_entry_before_the_buffer_is_copied():
    seen = []
    unpack_arrays(pack_arrays(_mixed()), seen.append)
    assert [e.name for e in seen] == list(_mixed())

    def refuse(entry):
        raise PackedLayoutError(f"no {entry.name}")

    with pytest.raises(PackedLayoutError, match="no m.l0.lora_A.weight"):
        unpack_arrays(pack_arrays(_mixed()), refuse)
