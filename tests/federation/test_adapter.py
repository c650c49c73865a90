import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict

from federation.adapter import (AdapterMismatch, adapter_delta, from_array_record, get_adapter_arrays, host_arrays,
                                lora_parameters, set_adapter_arrays, split_flat, to_array_record, trained_delta)
from federation.model import initial_adapter, lora_shapes


def test_codec_round_trip_through_array_record(tiny_lora):
    _, model, _, _ = tiny_lora
    arrays = get_adapter_arrays(model)
    back = from_array_record(to_array_record(arrays))
    assert sorted(back) == sorted(arrays)
    for key in arrays:
        np.testing.assert_array_equal(back[key], arrays[key])


def test_keys_are_peft_saved_keys_and_only_lora(tiny_lora):
    _, model, _, _ = tiny_lora
    arrays = get_adapter_arrays(model)
    assert sorted(arrays) == sorted(get_peft_model_state_dict(model))
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in arrays)


def test_set_then_get_is_identity_and_delta_is_exact(tiny_lora):
    _, model, _, _ = tiny_lora
    rng = np.random.default_rng(0)
    target = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in get_adapter_arrays(model).items()}
    versions = {k: p._version for k, p in lora_parameters(model).items()}
    set_adapter_arrays(model, target)
    # Written in place, each parameter's version counter moved: what client/fused_lora.LoRACopies watches.
    assert all(p._version > versions[k] for k, p in lora_parameters(model).items())
    got = get_adapter_arrays(model)
    for key in target:
        np.testing.assert_array_equal(got[key], target[key])
    zero = adapter_delta(got, target)
    assert all(not np.any(v) for v in zero.values())


def test_trained_delta_is_adapter_delta_bit_for_bit_and_shares_no_memory_with_the_model(tiny_lora):
    _, model, _, _ = tiny_lora
    rng = np.random.default_rng(1)
    start = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in get_adapter_arrays(model).items()}
    trained = {k: v + rng.normal(scale=1e-3, size=v.shape).astype(np.float32) for k, v in start.items()}
    params = lora_parameters(model)
    placed = set_adapter_arrays(model, start, params)
    assert all(placed[k].dtype == torch.float32 and placed[k].device == params[k].device for k in start)
    set_adapter_arrays(model, trained, params)
    expected = adapter_delta(get_adapter_arrays(model), start)
    delta = host_arrays(trained_delta(params, placed))
    assert list(delta) == list(expected)
    assert all(delta[k].dtype == np.float32 and delta[k].tobytes() == expected[k].tobytes() for k in expected)
    set_adapter_arrays(model, start, params)  # the model trains on: the delta stays what it was
    assert all(delta[k].tobytes() == expected[k].tobytes() for k in expected)


def test_host_arrays_of_tensors_are_their_values_with_shapes_in_order():
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([7.0]),
               "c": torch.ones(1, 4, dtype=torch.bfloat16)}
    got = host_arrays(tensors)
    assert list(got) == ["b", "a", "c"]
    assert all(got[k].dtype == np.float32 and got[k].shape == tuple(t.shape) for k, t in tensors.items())
    assert all(np.array_equal(got[k], t.float().numpy()) for k, t in tensors.items())
    flat = np.arange(10, dtype=np.float32)
    assert [v.tolist() for v in split_flat(flat, [(2, 2), (0,), (3, 2)])] == \
        [[[0, 1], [2, 3]], [], [[4, 5], [6, 7], [8, 9]]]


def test_set_refuses_wrong_keys_and_shapes(tiny_lora):
    _, model, _, _ = tiny_lora
    arrays = get_adapter_arrays(model)
    key = next(iter(arrays))
    with pytest.raises(AdapterMismatch, match="missing"):
        set_adapter_arrays(model, {k: v for k, v in arrays.items() if k != key})
    bad = dict(arrays)
    bad[key] = np.zeros((3, 3), np.float32)
    with pytest.raises(AdapterMismatch, match="shape"):
        set_adapter_arrays(model, bad)


def test_coordinator_template_matches_site_model(tiny_lora):
    cfg, model, _, _ = tiny_lora
    site = get_adapter_arrays(model)
    shapes = lora_shapes(cfg.model, cfg.lora)
    fresh = initial_adapter(cfg.model, cfg.lora)
    assert {k: v.shape for k, v in site.items()} == shapes == {k: v.shape for k, v in fresh.items()}
    # PEFT's init: B is zero, A ~ U(-1/sqrt(in), 1/sqrt(in)); same seed -> identical adapter.
    for key, value in fresh.items():
        if ".lora_B." in key:
            assert not np.any(value)
        else:
            assert np.abs(value).max() <= 1 / np.sqrt(value.shape[1])
            assert np.std(value) > 0
    again = initial_adapter(cfg.model, cfg.lora)
    assert all(np.array_equal(again[k], fresh[k]) for k in fresh)
    # The fresh adapter is a no-op on the base model output (B = 0).
    set_adapter_arrays(model, fresh)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    torch.testing.assert_close(base, adapted)
