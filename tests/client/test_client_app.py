"""The ClientApp's replies, inspected as the coordinator receives them."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

import client.app as client_app
from client import task
from federation.packing import is_packed, unpack_arrays
from federation.adapter import get_adapter_arrays, to_array_record
from federation.compression import decode_upload
from federation.config import run_config_to_json
from federation.model import initial_adapter
from tests.flower_messages import instruction


def _message(cfg, arrays, message_type=MessageType.TRAIN, server_round=1):
    content = RecordDict({"arrays": to_array_record(arrays),
                          "config": ConfigRecord({client_app.RUN_CONFIG_KEY: run_config_to_json(cfg),
                                                  "server-round": server_round})})
    return instruction(content, dst_node_id=7, message_type=message_type)


def _sent_delta(reply):
    return decode_upload(unpack_arrays(reply.content["arrays"]))


def _context(partition_id=0, num_partitions=3):
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition_id, "num-partitions": num_partitions},
                   state=RecordDict(), run_config={})


def test_train_reply_carries_only_the_lora_delta(make_cfg):
    cfg = make_cfg()
    global_adapter = initial_adapter(cfg.model, cfg.lora)
    reply = client_app.train(_message(cfg, global_adapter), _context())
    content = reply.content
    assert list(content.array_records) == ["arrays"]
    assert is_packed(content["arrays"]) and len(content["arrays"]) == 2  # one flat Array + its layout
    wire = unpack_arrays(content["arrays"])
    # Default transport is bf16 (16-bit words): half the bytes of the fp32 adapter.
    assert all(k.endswith("::bf16") and v.dtype == np.uint16 for k, v in wire.items())
    sent = decode_upload(wire)
    runtime = task.get_runtime(cfg)
    trainable = {n: p for n, p in runtime.model.named_parameters() if p.requires_grad}
    # Every key is a LoRA parameter, and the element count is exactly the adapter's trainable count.
    assert all(".lora_A." in k or ".lora_B." in k for k in sent)
    assert sum(v.size for v in sent.values()) == sum(p.numel() for p in trainable.values())
    base_names = [n for n, p in runtime.model.named_parameters() if not p.requires_grad]
    assert base_names and not any(n.replace(".base_layer", "") in sent for n in base_names)
    # It is the delta: local minus the global it started from.
    local = get_adapter_arrays(runtime.model)
    for key in sent:
        exact = local[key] - global_adapter[key]
        np.testing.assert_allclose(sent[key], exact, rtol=2**-8, atol=1e-30)  # bf16 rounding
    assert any(np.abs(v).max() > 0 for v in sent.values())
    metrics = content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["train-steps"] == cfg.train.local_steps
    assert np.isfinite(metrics["train-loss"])


def test_base_model_is_loaded_once_per_process(make_cfg, monkeypatch):
    cfg = make_cfg()
    adapter = initial_adapter(cfg.model, cfg.lora)
    client_app.train(_message(cfg, adapter), _context(0))
    first = task.get_runtime(cfg).model

    def no_reload(*a, **k):
        raise AssertionError("base model reloaded")

    monkeypatch.setattr(task, "build_lora_model", no_reload)
    client_app.train(_message(cfg, adapter, server_round=2), _context(1))
    client_app.evaluate(_message(cfg, adapter, MessageType.EVALUATE), _context(2))
    assert task.get_runtime(cfg).model is first


def test_evaluate_reports_token_loss_of_the_received_adapter(make_cfg):
    cfg = make_cfg()
    adapter = initial_adapter(cfg.model, cfg.lora)
    out = client_app.evaluate(_message(cfg, adapter, MessageType.EVALUATE), _context(1))
    metrics = out.content["metrics"]
    assert metrics["eval-tokens"] > 0 and np.isfinite(metrics["eval-loss"])
    assert len(out.content.array_records) == 0


def test_mismatched_adapter_is_refused(make_cfg):
    cfg = make_cfg()
    adapter = initial_adapter(cfg.model, cfg.lora)
    adapter.pop(next(iter(adapter)))
    with pytest.raises(ValueError, match="missing"):
        client_app.train(_message(cfg, adapter), _context())


def test_ffa_lora_site_sends_zero_delta_for_frozen_a(make_cfg):
    cfg = make_cfg("strategy=ffa_lora")
    adapter = initial_adapter(cfg.model, cfg.lora)
    sent = _sent_delta(client_app.train(_message(cfg, adapter), _context()))
    a_keys = [k for k in sent if ".lora_A." in k]
    b_keys = [k for k in sent if ".lora_B." in k]
    assert a_keys and all(not np.any(sent[k]) for k in a_keys)
    assert any(np.abs(sent[k]).max() > 0 for k in b_keys)
    # The next run without FFA trains A again (the resident model is reconfigured per message).
    sent = _sent_delta(client_app.train(_message(make_cfg(), adapter), _context()))
    assert any(np.abs(sent[k]).max() > 0 for k in a_keys)


def test_fedprox_term_keeps_the_site_closer_to_the_global_adapter(make_cfg):
    adapter = initial_adapter(make_cfg().model, make_cfg().lora)

    def delta_norm(*overrides):
        cfg = make_cfg("train.local_steps=6", *overrides)
        sent = _sent_delta(client_app.train(_message(cfg, adapter), _context()))
        return np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in sent.values()))

    plain = delta_norm("strategy=fedavg")
    proximal = delta_norm("strategy=fedprox", "strategy.proximal_mu=50.0")
    assert proximal < plain
