import numpy as np
import pytest
import torch

from federation.compression import (
    DeviceArrays,
    ErrorFeedback,
    UploadCodec,
    bf16_bits_to_float32,
    bf16_on_device,
    decode_upload,
    encode_upload,
    encoded_nbytes,
    float32_to_bf16_bits,
    on_device,
    topk_count,
    upload_codecs,
)

KEY_A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"


def delta(seed: int = 0, scale: float = 1e-2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {KEY_A: (scale * rng.standard_normal((8, 64))).astype(np.float32),
            KEY_B: (scale * rng.standard_normal((32, 8))).astype(np.float32)}


FP32_BYTES = 4 * (8 * 64 + 32 * 8)


def test_fp32_is_the_identity():
    d = delta()
    encoded = encode_upload(d, "fp32")
    assert set(encoded) == {KEY_A, KEY_B}
    out = decode_upload(encoded)
    for key in d:
        np.testing.assert_array_equal(out[key], d[key])
        assert out[key].dtype == np.float32
    assert encoded_nbytes(encoded) == FP32_BYTES


def test_bf16_matches_torch_rounding_exactly():
    rng = np.random.default_rng(1)
    x = np.concatenate([
        rng.standard_normal(4096).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, 4096),
        # ties at the rounding boundary (low 16 bits = 0x8000), both parities, and specials
        (np.array([0x3F808000, 0x3F818000, 0x00008000, 0x7F7FFFFF], dtype=np.uint32)).view(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45], dtype=np.float32),
    ])
    bits = float32_to_bf16_bits(x)
    # Reference written out on the bits (c10/util/BFloat16.h's round-to-nearest-even), independent of torch's cast.
    raw = x.astype(np.float32).view(np.uint32)  # the function takes any float array as float32
    expected = ((raw + ((raw >> 16) & np.uint32(1)) + np.uint32(0x7FFF)) >> 16).astype(np.uint16)
    expected[np.isnan(x)] = 0x7FC0  # a NaN's payload must not carry into the exponent
    np.testing.assert_array_equal(bits, expected)
    assert bits[np.isnan(x)][0] == 0x7FC0 and bits.dtype == np.uint16 and bits.shape == x.shape
    np.testing.assert_array_equal(bf16_bits_to_float32(bits), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    out = np.full(x.shape, 7.0, np.float32)
    assert bf16_bits_to_float32(bits, out=out) is out
    np.testing.assert_array_equal(out, bf16_bits_to_float32(bits))


def test_bf16_relative_error_at_most_2_to_minus_8_and_half_size():
    d = delta()
    encoded = encode_upload(d, "bf16")
    assert set(encoded) == {f"{KEY_A}::bf16", f"{KEY_B}::bf16"}
    out = decode_upload(encoded)
    for key in d:
        assert np.all(np.abs(out[key] - d[key]) <= np.abs(d[key]) * 2.0**-8)
    assert encoded_nbytes(encoded) == FP32_BYTES // 2


def test_fp16_round_trip_and_overflow_is_an_error():
    d = delta()
    out = decode_upload(encode_upload(d, "fp16"))
    np.testing.assert_array_equal(out[KEY_A], d[KEY_A].astype(np.float16).astype(np.float32))
    assert encoded_nbytes(encode_upload(d, "fp16")) == FP32_BYTES // 2
    with pytest.raises(ValueError, match=KEY_A):
        encode_upload({KEY_A: np.array([1e6], np.float32)}, "fp16")


@pytest.mark.parametrize("per_row", [False, True])
def test_int8_error_at_most_half_a_scale(per_row):
    d = delta(2)
    encoded = encode_upload(d, UploadCodec("int8", int8_per_row=per_row))
    out = decode_upload(encoded)
    for key in d:
        scale = encoded[f"{key}::scale"]
        assert scale.shape == ((d[key].shape[0],) if per_row else (1,))
        bound = (scale.reshape(-1, 1) if per_row else scale) / 2
        assert np.all(np.abs(out[key] - d[key]) <= bound + np.spacing(np.abs(d[key])))
        # the largest entry (per row / tensor) is exact up to float32 rounding: it maps to +-127
        assert np.abs(encoded[f"{key}::q"]).max() == 127
    n_scales = (8 + 32) if per_row else 2
    assert encoded_nbytes(encoded) == FP32_BYTES // 4 + 4 * n_scales


@pytest.mark.parametrize("block", [64, 7, 1000])
def test_int4_error_at_most_half_a_block_scale_and_about_an_eighth_of_fp32(block):
    d = delta(3)
    d["odd.lora_B.weight"] = np.linspace(-1, 1, 33, dtype=np.float32)  # odd count: the last byte holds one code
    encoded = encode_upload(d, UploadCodec("int4", int4_block=block))
    out = decode_upload(encoded)
    for key, value in d.items():
        flat, scale = value.reshape(-1), encoded[f"{key}::scale4"]
        assert scale.shape == (-(-flat.size // block),)
        bound = np.repeat(scale, block)[:flat.size] / 2
        assert np.all(np.abs(out[key].reshape(-1) - flat) <= bound + np.spacing(np.abs(flat)))
        assert out[key].shape == value.shape and out[key].dtype == np.float32
        assert encoded[f"{key}::q4"].dtype == np.uint8
        blocks = -(-flat.size // block)
        expected = (blocks * block + 1) // 2 + 4 * blocks + 4 * (1 + value.ndim)  # codes, scales, header
        assert sum(encoded[f"{key}::{p}"].nbytes for p in ("q4", "scale4", "shape4")) == expected
    if block == 64:  # on a realistic tensor: 0.5 byte per element + a float32 scale per 64 = 0.141 of fp32
        big = np.ones((4096, 16), np.float32)
        assert encoded_nbytes(encode_upload({KEY_B: big}, "int4")) / big.nbytes == pytest.approx(0.1406, abs=1e-3)


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e.__setitem__(f"{KEY_A}::q4", e[f"{KEY_A}::q4"][:-1]), "do not fit"),
    (lambda e: e.__setitem__(f"{KEY_A}::scale4", np.ones(3, np.float32)), "do not fit"),
    (lambda e: e.__setitem__(f"{KEY_A}::shape4", np.array([0, 8, 64], np.int32)), "block >= 1"),
    (lambda e: e.__setitem__(f"{KEY_A}::q4", e[f"{KEY_A}::q4"].astype(np.int8)), "dtype int8"),
])
def test_decode_rejects_malformed_int4(mutate, message):
    encoded = encode_upload(delta(), "int4")
    mutate(encoded)
    with pytest.raises(ValueError, match=message):
        decode_upload(encoded)


def test_int8_of_zeros_is_zeros():
    out = decode_upload(encode_upload({KEY_A: np.zeros((2, 3), np.float32)}, "int8"))
    np.testing.assert_array_equal(out[KEY_A], np.zeros((2, 3)))


def test_topk_keeps_exactly_k_largest_entries():
    x = np.array([[0.5, -3.0, 0.1, 2.0], [-0.25, 1.0, -4.0, 0.0]], np.float32)
    encoded = encode_upload({KEY_A: x}, UploadCodec("topk", topk_fraction=0.375))  # ceil(0.375 * 8) = 3
    np.testing.assert_array_equal(encoded[f"{KEY_A}::idx"], [1, 3, 6])
    np.testing.assert_array_equal(encoded[f"{KEY_A}::shape"], [2, 4])
    out = decode_upload(encoded)[KEY_A]
    np.testing.assert_array_equal(out, [[0, -3.0, 0, 2.0], [0, 0, -4.0, 0]])
    assert topk_count(8, 0.375) == 3 and topk_count(10, 0.01) == 1


def test_topk_size_at_most_a_quarter():
    d = delta()
    for values in ("fp16", "bf16"):
        encoded = encode_upload(d, UploadCodec("topk", topk_fraction=0.1, topk_values=values))
        k = topk_count(8 * 64, 0.1) + topk_count(32 * 8, 0.1)
        assert encoded_nbytes(encoded) == 6 * k + 4 * 2 * 2  # int32 idx + 16-bit value, plus 2 int32 shapes
        assert encoded_nbytes(encoded) <= FP32_BYTES / 4


def test_error_feedback_tracks_the_cumulative_update():
    codec = UploadCodec("topk", topk_fraction=0.1)
    ef = ErrorFeedback()
    true_sum = {k: np.zeros_like(v, dtype=np.float64) for k, v in delta().items()}
    sent_sum = {k: np.zeros_like(v, dtype=np.float64) for k, v in true_sum.items()}
    rounds = 40
    for r in range(rounds):
        d = delta(100 + r)
        decoded = decode_upload(ef.encode(d, codec))
        for key in d:
            true_sum[key] += d[key]
            sent_sum[key] += decoded[key]
            # EF invariant: everything sent so far plus the residual is everything there was to send
            np.testing.assert_allclose(sent_sum[key] + ef.residual[key], true_sum[key], atol=1e-6)
    for key in true_sum:
        gap = np.linalg.norm(sent_sum[key] - true_sum[key])
        # the residual stays bounded (a few rounds' worth) while the cumulative update grows like sqrt(rounds)
        assert gap < 0.5 * np.linalg.norm(true_sum[key])
    # without error feedback the dropped 90% is lost for good
    no_ef = {k: sum(decode_upload(encode_upload(delta(100 + r), codec))[k].astype(np.float64) for r in range(rounds))
             for k in true_sum}
    for key in true_sum:
        assert np.linalg.norm(no_ef[key] - true_sum[key]) > 2 * np.linalg.norm(sent_sum[key] - true_sum[key])


def test_error_feedback_state_round_trips():
    codec = UploadCodec("int8")
    ef = ErrorFeedback()
    ef.encode(delta(0), codec)
    restored = ErrorFeedback()
    restored.load_state_dict(ef.state_dict())
    a, b = ef.encode(delta(1), codec), restored.encode(delta(1), codec)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert ErrorFeedback().state_dict() == {}
    with pytest.raises(ValueError, match="different keys"):
        ef.encode({KEY_A: delta()[KEY_A]}, codec)


def test_error_feedback_with_fp32_keeps_no_residual():
    ef = ErrorFeedback()
    d = delta()
    encoded = ef.encode(d, "fp32")
    np.testing.assert_array_equal(encoded[KEY_A], d[KEY_A])
    assert ef.residual == {}


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def special_delta(seed: int) -> dict[str, np.ndarray]:
    """A delta whose first entries are the values bf16 rounding gets wrong most easily; the rest random."""
    d = delta(seed)
    specials = np.concatenate([
        # ties (low 16 bits 0x8000) of both parities, just below and above them, a bf16 subnormal tie, float32 max
        np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x3F808001, 0x00008000, 0x80018000, 0x7F7FFFFF],
                 dtype=np.uint32).view(np.float32),
        # zeros, infinities, NaNs with payloads and sign, float32 subnormals
        np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0xFFA00000, 0x7F800001, 0x00000001,
                  0x807FFFFF], dtype=np.uint32).view(np.float32),
    ])
    if seed % 2:  # every other round: specials where the residual holds the last ones' leftovers
        d[KEY_A].reshape(-1)[:specials.size] = specials
    else:
        d[KEY_B].reshape(-1)[-specials.size:] = specials
    return d


def assert_same_floats(got: np.ndarray, expected: np.ndarray) -> None:
    """Bit for bit, except a NaN's payload: that is the arithmetic's (numpy's and torch's CPU subtractions, and a
    GPU's, pick different ones), and never reaches the wire, where every NaN is BF16_QUIET_NAN."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("restarts", [False, True])
def test_bf16_on_device_is_the_host_encoding_and_residual_bit_for_bit_over_rounds(device, restarts):
    """The residual stays on the device from round to round (DeviceArrays); with restarts, every other round starts
    from its host copy instead (what a restarted site reads from its file)."""
    host = ErrorFeedback()
    residual = {}
    for r in range(6):
        d = special_delta(r)
        with np.errstate(invalid="ignore"):  # inf - inf and NaN arithmetic: on purpose
            expected = host.encode(d, "bf16")
        if restarts and r % 2:
            residual = {k: v.copy() for k, v in residual.to_host().items()}
        encoded, residual = bf16_on_device({k: torch.from_numpy(v).to(device) for k, v in d.items()}, residual)
        assert list(encoded) == list(expected)
        assert all(encoded[k].dtype == np.uint16 and encoded[k].tobytes() == expected[k].tobytes() for k in expected)
        assert isinstance(residual, DeviceArrays) and residual.flat.device.type == device
        on_host = residual.to_host()
        assert list(on_host) == list(host.residual)
        for key in on_host:
            assert_same_floats(on_host[key], host.residual[key])
    assert np.isnan(on_host[KEY_A]).any() and np.isnan(on_host[KEY_B]).any()  # the specials were in there
    # without feedback: the plain bf16 encoding, and no residual
    d = special_delta(7)
    plain, none = bf16_on_device({k: torch.from_numpy(v).to(device) for k, v in d.items()})
    assert none is None and {k: v.tobytes() for k, v in plain.items()} == \
        {k: v.tobytes() for k, v in encode_upload(d, "bf16").items()}


def test_bf16_on_device_refuses_a_residual_of_other_keys_or_shapes():
    d = {k: torch.from_numpy(v) for k, v in delta().items()}
    with pytest.raises(ValueError, match="different keys"):
        bf16_on_device(d, {KEY_A: delta()[KEY_A]})
    with pytest.raises(ValueError, match="vs residual"):
        bf16_on_device(d, {KEY_A: delta()[KEY_A], KEY_B: np.zeros((8, 32), np.float32)})
    with pytest.raises(ValueError, match="vs residual"):
        bf16_on_device(d, DeviceArrays.of(torch.zeros(8 * 64 + 8 * 32), {KEY_A: (8, 64), KEY_B: (8, 32)}))


def test_a_device_residual_in_another_key_order_is_added_key_by_key():
    d = {k: torch.from_numpy(v) for k, v in delta(1).items()}
    _, residual = bf16_on_device({k: torch.from_numpy(v) for k, v in delta(0).items()}, {})
    host = residual.to_host()
    reordered = DeviceArrays.of(torch.cat([torch.from_numpy(host[k]).reshape(-1) for k in (KEY_B, KEY_A)]),
                                {KEY_B: host[KEY_B].shape, KEY_A: host[KEY_A].shape})
    expected, expected_residual = bf16_on_device(d, residual)
    got, got_residual = bf16_on_device(d, reordered)
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in expected.items()}
    assert torch.equal(got_residual.flat, expected_residual.flat)


def test_error_feedback_continues_on_the_host_from_a_residual_kept_on_the_device(monkeypatch):
    import federation.compression as compression

    # CPU tensors take the path of a GPU's (on_device decides that for CUDA only)
    monkeypatch.setattr(compression, "on_device", lambda d, codec: codec.name == "bf16" and
                        all(isinstance(v, torch.Tensor) for v in d.values()))
    host, mixed = ErrorFeedback(), ErrorFeedback()
    for r, as_tensors in enumerate([True, True, False, True]):
        d = delta(r)
        expected = host.encode(d, "bf16")
        got = mixed.encode({k: torch.from_numpy(v) for k, v in d.items()} if as_tensors else d, "bf16")
        assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in expected.items()}
        assert isinstance(mixed.residual, DeviceArrays) == as_tensors
        assert {k: v.tobytes() for k, v in mixed.state_dict().items()} == \
            {k: v.tobytes() for k, v in host.state_dict().items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codec", [UploadCodec(name) for name in ("fp32", "bf16", "fp16", "int8", "int4")]
                         + [UploadCodec("topk", topk_values="bf16")])
def test_only_bf16_of_gpu_tensors_is_encoded_on_the_device_and_every_codec_gives_the_host_bytes(codec, device,
                                                                                                 monkeypatch):
    import federation.compression as compression

    calls = []
    real = compression.bf16_on_device
    monkeypatch.setattr(compression, "bf16_on_device", lambda *args: calls.append(1) or real(*args))
    host, tensors = ErrorFeedback(), ErrorFeedback()
    for r in range(3):
        d = delta(r)
        torch_delta = {k: torch.from_numpy(v).to(device) for k, v in d.items()}
        assert on_device(torch_delta, codec) == (codec.name == "bf16" and device == "cuda")
        assert not on_device(d, codec)
        expected = host.encode(d, codec)
        got = tensors.encode(torch_delta, codec)
        assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in expected.items()}
        assert {k: v.tobytes() for k, v in tensors.state_dict().items()} == \
            {k: v.tobytes() for k, v in host.residual.items()}
        assert {k: v.tobytes() for k, v in codec.encode(torch_delta).items()} == \
            {k: v.tobytes() for k, v in codec.encode(d).items()}
    assert len(calls) == (6 if on_device(torch_delta, codec) else 0)


def test_error_feedback_starts_from_a_residual_as_given():
    residual = {k: np.full_like(v, 0.5) for k, v in delta().items()}
    ef = ErrorFeedback(residual)
    assert all(ef.residual[k] is residual[k] for k in residual)
    restored = ErrorFeedback()
    restored.load_state_dict(residual)
    a, b = ef.encode(delta(1), "int8"), restored.encode(delta(1), "int8")
    assert {k: v.tobytes() for k, v in a.items()} == {k: v.tobytes() for k, v in b.items()}
    assert np.all(residual[KEY_A] == 0.5)  # encoding replaced the residual, it did not write into the caller's arrays


@pytest.mark.parametrize("codec", ["bf16", "fp16", "int8", "int4", "topk"])
def test_decode_names_the_key_of_a_missing_part(codec):
    encoded = encode_upload(delta(), codec)
    victim = sorted(k for k in encoded if k.startswith(KEY_B))[-1]
    del encoded[victim]
    if codec in ("bf16", "fp16"):  # the only part is gone: the key vanishes, which validate_update catches
        assert KEY_B not in decode_upload(encoded)
        return
    with pytest.raises(ValueError, match=KEY_B):
        decode_upload(encoded)


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e.__setitem__(f"{KEY_A}::q", e[f"{KEY_A}::q"].astype(np.int16)), "dtype int16"),
    (lambda e: e.__setitem__(f"{KEY_A}::scale", np.ones(3, np.float32)), "scale"),
    (lambda e: e.__setitem__(f"{KEY_A}::zip", np.ones(3, np.float32)), "unknown encoded part"),
    (lambda e: e.__setitem__(f"{KEY_A}::bf16", np.ones(3, np.uint16)), "several codecs"),
    (lambda e: e.__setitem__(KEY_A, np.ones(3, np.int32)), "several codecs"),
])
def test_decode_rejects_malformed_int8(mutate, message):
    encoded = encode_upload(delta(), "int8")
    mutate(encoded)
    with pytest.raises(ValueError, match=message):
        decode_upload(encoded)


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e.__setitem__(f"{KEY_A}::idx", np.array([5, 5], np.int32)), "idx"),
    (lambda e: e.__setitem__(f"{KEY_A}::idx", np.array([0, 10**6], np.int32)), "increasing"),
    (lambda e: e.__setitem__(f"{KEY_A}::val", np.ones(2, np.float32)), "dtype float32"),
])
def test_decode_rejects_malformed_topk(mutate, message):
    encoded = encode_upload({KEY_A: np.arange(8, dtype=np.float32).reshape(2, 4)}, UploadCodec("topk", 0.25))
    mutate(encoded)
    with pytest.raises(ValueError, match=message):
        decode_upload(encoded)


def test_codec_is_readable_from_keys_and_fp32_plain_keys_decode():
    encoded = {**encode_upload({KEY_A: delta()[KEY_A]}, "int8"), **encode_upload({KEY_B: delta()[KEY_B]}, "fp32")}
    assert upload_codecs(encoded) == {KEY_A: "int8", KEY_B: "fp32"}
    with pytest.raises(ValueError, match="expected a float"):
        decode_upload({KEY_A: np.ones(2, np.int32)})


def test_lossy_codecs_refuse_non_finite_and_bad_params():
    with pytest.raises(ValueError, match=KEY_A):
        encode_upload({KEY_A: np.array([np.nan, 1.0], np.float32)}, "int8")
    assert np.isnan(decode_upload(encode_upload({KEY_A: np.array([np.nan], np.float32)}, "bf16"))[KEY_A][0])
    with pytest.raises(ValueError, match="unknown upload codec"):
        UploadCodec("zstd")
    with pytest.raises(ValueError, match="topk_fraction"):
        UploadCodec("topk", topk_fraction=0.0)
    with pytest.raises(ValueError, match=KEY_A):
        encode_upload({KEY_A: np.array([np.inf, 1.0], np.float32)}, "int4")
    with pytest.raises(ValueError, match="int4_block"):
        UploadCodec("int4", int4_block=0)


def test_encoded_upload_survives_a_flower_array_record():
    from flwr.app import Array, ArrayRecord

    encoded = encode_upload(delta(), UploadCodec("topk", topk_values="bf16"))
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in encoded.items()})
    back = decode_upload({k: v.numpy() for k, v in record.items()})
    for key, value in decode_upload(encoded).items():
        np.testing.assert_array_equal(back[key], value)
