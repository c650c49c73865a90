"""client/task.py: the tokenized site datasets a process keeps are bounded (least recently used dropped first); what a
resident site reuses across messages (its trainer, its error-feedback residual) leaves its replies bit for bit."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

import client.app as client_app
from client import site_state, task
from client.site_state import NODE_STATE_DIR_KEY, wait_for_background_writes
from federation.adapter import to_array_record
from federation.compression import decode_upload
from federation.config import run_config_to_json
from federation.model import initial_adapter
from federation.packing import unpack_arrays
from federation.protocol import FEDERATION_RUN_ID_KEY, RUN_CONFIG_KEY
from tests.flower_messages import instruction

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _context(partition: int, partitions: int) -> Context:
    return Context(run_id=1, node_id=partition + 1, state=RecordDict(), run_config={},
                   node_config={"partition-id": partition, "num-partitions": partitions})


def _partitions(runtime) -> list[int]:
    """Partition ids of the cached datasets, least recently used first (keys 'partition:<id>/<n>:<hash>')."""
    return [int(key.split(":")[1].split("/")[0]) for key in runtime.datasets]


def _keys(dataset) -> list[tuple]:
    return [tuple(item["input_ids"].tolist()) + tuple(item["labels"].tolist()) for item in dataset]


def test_site_datasets_are_a_bounded_lru_and_a_dropped_one_comes_back_identical(make_cfg, monkeypatch):
    monkeypatch.setattr(task, "SITE_DATASETS_KEPT", 2)
    cfg = make_cfg("federation.num_clients=4", "data.partitioner=iid")
    runtime = task.get_runtime(cfg)
    runtime.datasets.clear()
    first_train, first_eval = task.site_datasets(runtime, cfg, _context(0, 4))
    first_fingerprint = dict(task.data_fingerprint(runtime, cfg, _context(0, 4)))
    task.site_datasets(runtime, cfg, _context(1, 4))
    task.site_datasets(runtime, cfg, _context(0, 4))  # used again: now the most recent
    task.site_datasets(runtime, cfg, _context(2, 4))  # drops 1, the least recently used
    assert _partitions(runtime) == [0, 2]
    task.data_fingerprint(runtime, cfg, _context(3, 4))  # the fingerprint goes through the same bounded cache
    assert _partitions(runtime) == [2, 3]
    again_train, again_eval = task.site_datasets(runtime, cfg, _context(0, 4))
    assert again_train is not first_train  # tokenized again ...
    assert (_keys(again_train), _keys(again_eval)) == (_keys(first_train), _keys(first_eval))  # ... to the same data
    assert task.data_fingerprint(runtime, cfg, _context(0, 4)) == first_fingerprint
    assert _partitions(runtime) == [3, 0]


def _train_message(cfg, arrays, server_round: int):
    config = ConfigRecord({RUN_CONFIG_KEY: run_config_to_json(cfg), "server-round": server_round,
                           FEDERATION_RUN_ID_KEY: "0123456789abcdef"})
    return instruction(RecordDict({"arrays": to_array_record(arrays), "config": config}), dst_node_id=1)


def _site_context(state_dir) -> Context:
    return Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                   node_config={"partition-id": 0, "num-partitions": 2, NODE_STATE_DIR_KEY: str(state_dir)})


def _wire(reply) -> dict[str, bytes]:
    return {key: value.tobytes() for key, value in unpack_arrays(reply.content["arrays"]).items()}


def test_a_resident_site_answers_with_the_bytes_a_restarted_site_answers_with(make_cfg, tmp_path):
    """The trainer reused across messages and the error-feedback residual read back from memory give the reply a
    site started afresh gives (its trainer built anew, its residual read from the file)."""
    cfg = make_cfg("train.fast_path=true")
    assert cfg.federation.upload_codec == "bf16" and cfg.federation.upload_error_feedback
    context = _site_context(tmp_path / "round-state")
    global_adapter = initial_adapter(cfg.model, cfg.lora)
    first = client_app.app(_train_message(cfg, global_adapter, 1), context)
    upload = decode_upload(unpack_arrays(first.content["arrays"]))
    global_adapter = {key: value + upload[key] for key, value in global_adapter.items()}
    resident = client_app.app(_train_message(cfg, global_adapter, 2), context)

    wait_for_background_writes()
    task._RUNTIME = None  # a restarted site: the base model loaded again, nothing of the last round in memory
    site_state._SAVED.clear()
    restarted = client_app.app(_train_message(cfg, global_adapter, 2), _site_context(tmp_path / "round-state"))
    assert _wire(restarted) == _wire(resident)


def test_the_bf16_upload_encoded_on_the_device_is_the_host_one_byte_for_byte(make_cfg, tmp_path, monkeypatch):
    """A GPU site encodes its bf16 upload where the delta is (forced here on the CPU tensors): round after round the
    same reply objects and the same error-feedback residual as the host encoding."""
    import torch

    from client.task import ERROR_FEEDBACK_KEY
    from federation import compression
    from federation.compression import on_host

    cfg = make_cfg("train.fast_path=true")

    def three_rounds(state_dir):
        context, adapter, replies = _site_context(state_dir), initial_adapter(cfg.model, cfg.lora), []
        for server_round in (1, 2, 3):
            reply = client_app.app(_train_message(cfg, adapter, server_round), context)
            replies.append((reply.content["arrays"].object_id, _wire(reply)))
            upload = decode_upload(unpack_arrays(reply.content["arrays"]))
            adapter = {key: value + upload[key] for key, value in adapter.items()}
        wait_for_background_writes()
        residual = site_state.SiteStateStore(state_dir, "0123456789abcdef").load_arrays(ERROR_FEEDBACK_KEY, 4)
        return replies, {key: value.tobytes() for key, value in on_host(residual).items()}

    host = three_rounds(tmp_path / "host")
    encoded_on_device = []
    monkeypatch.setattr(compression, "on_device", lambda delta, codec: encoded_on_device.append(codec.name) or (
        codec.name == "bf16" and all(isinstance(v, torch.Tensor) for v in delta.values())))
    device = three_rounds(tmp_path / "device")
    assert encoded_on_device == ["bf16"] * 3
    assert device == host


def test_the_trainer_and_its_model_preparation_are_reused_across_messages_of_one_run(make_cfg, tmp_path,
                                                                                    monkeypatch):
    from client import fast_train

    prepared = []
    real_prepare = fast_train.prepare_model_for_fast_training
    monkeypatch.setattr(fast_train, "prepare_model_for_fast_training",
                        lambda *args, **kwargs: prepared.append(1) or real_prepare(*args, **kwargs))
    cfg = make_cfg("train.fast_path=true")
    runtime = task.get_runtime(cfg)
    runtime.trainer = None
    embedding_hooks = runtime.model.get_input_embeddings()._forward_hooks
    hooks_before = len(embedding_hooks)
    context = _site_context(tmp_path / "round-state")
    adapter = initial_adapter(cfg.model, cfg.lora)
    for server_round in (1, 2, 3):
        client_app.app(_train_message(cfg, adapter, server_round), context)
    assert len(prepared) == 1
    assert len(embedding_hooks) == hooks_before + 1  # preparing per message hooked the embeddings once more each time

    client_app.app(_train_message(make_cfg("train.fast_path=true", "train.lr=0.001"), adapter, 4), context)
    assert len(prepared) == 2  # other train settings: a trainer of their own
    base = runtime.model.get_base_model()
    client_app.app(_train_message(make_cfg("train.fast_path=true", "privacy=dp_sgd"), adapter, 5), context)
    assert not base.is_gradient_checkpointing  # DP-SGD switched it off ...
    client_app.app(_train_message(cfg, adapter, 6), context)
    assert len(prepared) == 3 and base.is_gradient_checkpointing  # ... and the fast path set it up again


def test_the_resident_model_is_left_out_of_garbage_collections_once_per_load_and_freed_when_replaced(make_cfg,
                                                                                                     monkeypatch):
    import gc
    import weakref

    collections = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(1) or real_collect(*args))
    task._RUNTIME = None
    gc.unfreeze()
    first = weakref.ref(task.get_runtime(make_cfg()).model)
    assert gc.get_freeze_count() == 0  # loading freezes nothing: a simulation may reload at every message
    task.freeze_resident_objects()
    task.freeze_resident_objects()
    assert gc.get_freeze_count() > 0 and len(collections) == 1  # once per load: full collections skip the model
    task.get_runtime(make_cfg("lora.r=4"))  # another adapter shape: a reload ...
    assert first() is None and gc.get_freeze_count() == 0  # ... which neither keeps the replaced model alive
    task.freeze_resident_objects()
    assert len(collections) == 2


def test_a_model_this_process_cannot_load_leaves_the_resident_one_in_place(make_cfg):
    """A run asking for 4-bit on a CPU site fails its messages, and the next honest run needs no reload."""
    task._RUNTIME = None
    resident = task.get_runtime(make_cfg())
    with pytest.raises(RuntimeError, match="4bit needs a CUDA device"):
        task.get_runtime(make_cfg("model.quantization=4bit", "model.device=cpu"))
    assert task.get_runtime(make_cfg()) is resident



def _encode_rounds(cfg, state_dir, device: str, restart_before: int | None = None):
    """encode_delta over rounds 1-4 of seeded deltas (torch tensors on `device`): each round's wire bytes, the
    residual entering round 5 as this process holds it, and its bytes in memory and in its file."""
    import numpy as np
    import torch

    from client.task import ERROR_FEEDBACK_KEY
    from federation.compression import on_host

    shapes = {key: value.shape for key, value in initial_adapter(cfg.model, cfg.lora).items()}
    context, wire = _site_context(state_dir), []
    for server_round in (1, 2, 3, 4):
        if server_round == restart_before:
            wait_for_background_writes()
            site_state._SAVED.clear()  # nothing of the rounds before in memory: the residual comes from the file
        rng = np.random.default_rng(server_round)
        delta = {key: torch.from_numpy((1e-2 * rng.standard_normal(shape)).astype(np.float32)).to(device)
                 for key, shape in shapes.items()}
        record = task.encode_delta(delta, cfg, _train_message(cfg, {}, server_round), context)
        wire.append({key: value.tobytes() for key, value in unpack_arrays(record).items()})
    store = site_state.SiteStateStore(state_dir, "0123456789abcdef")
    held = store.load_arrays(ERROR_FEEDBACK_KEY, 5)  # waits for the background write
    with np.load(store.run_dir / ERROR_FEEDBACK_KEY / "round-0005.npz") as data:
        in_file = {key: data[key].tobytes() for key in data.files}
    return wire, held, {key: value.tobytes() for key, value in on_host(held).items()}, in_file



def _host_run(cfg, tmp_path) -> tuple[list, dict]:
    """The host path's wire bytes and residual (CPU tensors: on_device says no), its file equal to its memory."""
    from federation.compression import DeviceArrays

    assert cfg.federation.upload_codec == "bf16" and cfg.federation.upload_error_feedback
    wire, held, residual, in_file = _encode_rounds(cfg, tmp_path / "host", "cpu")
    assert not isinstance(held, DeviceArrays) and in_file == residual
    return wire, residual


def _check_device_runs(cfg, tmp_path, device: str, host_wire: list, host_residual: dict) -> None:
    """Uninterrupted, and restarted before round 3: the host path's bytes, the residual kept on `device`."""
    from federation.compression import DeviceArrays

    for restart_before in (None, 3):
        wire, held, residual, in_file = _encode_rounds(cfg, tmp_path / f"device-{restart_before}", device,
                                                       restart_before)
        assert isinstance(held, DeviceArrays) and held.flat.device.type == device  # kept there between rounds
        assert wire == host_wire and residual == host_residual and in_file == host_residual


def test_encode_delta_keeps_the_residual_on_the_device_with_the_host_paths_bytes_and_file(make_cfg, tmp_path,
                                                                                        monkeypatch):
    """A GPU site's path (forced here on CPU tensors): the error-feedback residual stays on the device between
    rounds, the uploads and the residual (in memory and in its file) are the host path's, also across a restart."""
    from federation import compression

    cfg = make_cfg()
    host_wire, host_residual = _host_run(cfg, tmp_path)
    monkeypatch.setattr(compression, "on_device", lambda delta, codec: codec.name == "bf16")
    _check_device_runs(cfg, tmp_path, "cpu", host_wire, host_residual)


def test_encode_delta_keeps_the_residual_on_the_cuda_device_with_the_host_paths_bytes_and_file(make_cfg, tmp_path):
    """The same on a GPU, as on_device decides it there."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = make_cfg()
    host_wire, host_residual = _host_run(cfg, tmp_path)
    _check_device_runs(cfg, tmp_path, "cuda", host_wire, host_residual)
