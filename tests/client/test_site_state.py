"""The site's round state (client/site_state.py): durable, keyed by federation run id and round, bounded; what the
process saved is read back from memory, and a background save is waited for by every later use."""

from __future__ import annotations

import io
import logging
import os
import threading
import time

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from client import site_state as site_state_module
from client.site_state import (ContextState, NODE_STATE_DIR_KEY, SiteStateStore, site_state,
                               site_state_dir, wait_for_background_writes)
from federation.compression import DeviceArrays
from federation.store import FEDERATION_RUN_ID_KEY, atomic_write_bytes
from tests.flower_messages import instruction

RUN = "0123456789abcdef0123456789abcdef"
NAME = "fedtune.error-feedback"


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {"a": np.full((2, 3), value, np.float32), "c": np.full((3,), value, np.float64)}


def _files(store: SiteStateStore, name: str = NAME) -> list[str]:
    return sorted(os.listdir(store.run_dir / name))


def test_state_entering_a_round_is_the_newest_saved_up_to_it(tmp_path):
    store = SiteStateStore(tmp_path, RUN)
    assert store.load_arrays(NAME, 1) is None  # nothing before the first round
    store.save_arrays(NAME, 2, _arrays(2.0))  # after training round 1
    store.save_arrays(NAME, 4, _arrays(4.0))  # after training round 3 (the site sat out round 2)
    assert store.load_arrays(NAME, 1) is None
    assert store.load_arrays(NAME, 2)["a"][0, 0] == 2.0
    assert store.load_arrays(NAME, 3)["a"][0, 0] == 2.0
    assert store.load_arrays(NAME, 4)["a"][0, 0] == 4.0
    assert store.load_arrays(NAME, 9)["a"][0, 0] == 4.0
    loaded = store.load_arrays(NAME, 4)
    assert {k: v.dtype for k, v in loaded.items()} == {"a": np.float32, "c": np.float64}  # dtypes kept


def test_rerun_of_a_round_starts_from_the_same_state_and_replaces_what_the_first_attempt_saved(tmp_path):
    store = SiteStateStore(tmp_path, RUN)
    store.save_arrays(NAME, 3, _arrays(3.0))
    entering_3 = store.load_arrays(NAME, 3)
    store.save_arrays(NAME, 4, _arrays(4.0))  # round 3 trained, then the coordinator died before its checkpoint
    again = store.load_arrays(NAME, 3)  # the resumed run re-runs round 3
    assert all(np.array_equal(again[k], entering_3[k]) for k in entering_3)
    store.save_arrays(NAME, 4, _arrays(40.0))
    assert store.load_arrays(NAME, 4)["a"][0, 0] == 40.0


def test_saving_a_round_drops_later_rounds_of_an_abandoned_attempt(tmp_path):
    store = SiteStateStore(tmp_path, RUN)
    for server_round in (2, 3, 4):
        store.save_arrays(NAME, server_round, _arrays(server_round))
    store.save_arrays(NAME, 3, _arrays(30.0))  # a resume went back to round 2: rounds 3.. are redone
    assert _files(store) == ["round-0002.npz", "round-0003.npz"]
    assert store.load_arrays(NAME, 9)["a"][0, 0] == 30.0


def test_only_the_newest_rounds_are_kept(tmp_path):
    store = SiteStateStore(tmp_path, RUN, keep_rounds=3)
    for server_round in range(2, 12):
        store.save_arrays(NAME, server_round, _arrays(server_round))
    assert _files(store) == ["round-0009.npz", "round-0010.npz", "round-0011.npz"]
    with pytest.raises(ValueError, match="keep_rounds"):
        SiteStateStore(tmp_path, RUN, keep_rounds=1)


def test_writes_are_atomic_a_failed_write_keeps_the_old_state_and_leaves_no_temp_file(tmp_path, monkeypatch):
    store = SiteStateStore(tmp_path, RUN)
    store.save_arrays(NAME, 2, _arrays(2.0))

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.save_arrays(NAME, 2, _arrays(99.0))
    monkeypatch.undo()
    assert store.load_arrays(NAME, 2)["a"][0, 0] == 2.0
    assert _files(store) == ["round-0002.npz"]


def test_run_ids_isolate_runs_and_must_be_safe_path_names(tmp_path):
    one, other = SiteStateStore(tmp_path, RUN), SiteStateStore(tmp_path, "f" * 32)
    one.save_arrays(NAME, 2, _arrays(1.0))
    assert other.load_arrays(NAME, 2) is None
    other.save_arrays(NAME, 2, _arrays(7.0))
    assert one.load_arrays(NAME, 2)["a"][0, 0] == 1.0
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="not a safe name"):
            SiteStateStore(tmp_path, bad)
    with pytest.raises(ValueError, match="not a safe name"):
        one.load_arrays("../x", 1)


def test_json_state_round_trips_and_kinds_are_not_mixed_up(tmp_path):
    store = SiteStateStore(tmp_path, RUN)
    store.save_json("fedtune.dp-sgd", 2, {"history": [[1.1, 0.5, 4]]})
    assert store.load_json("fedtune.dp-sgd", 5) == {"history": [[1.1, 0.5, 4]]}
    with pytest.raises(ValueError, match="saved as JSON"):
        store.load_arrays("fedtune.dp-sgd", 5)
    store.save_arrays(NAME, 2, _arrays(1.0))
    with pytest.raises(ValueError, match="saved as arrays"):
        store.load_json(NAME, 2)


def _train_message(run_id: str | None, server_round: int = 3):
    config = {"server-round": server_round, **({FEDERATION_RUN_ID_KEY: run_id} if run_id else {})}
    return instruction(RecordDict({"config": ConfigRecord(config)}), dst_node_id=1)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_where_a_site_keeps_its_state(tmp_path):
    deployment = {"data-path": "/data/site-a", NODE_STATE_DIR_KEY: str(tmp_path / "round-state")}
    assert site_state_dir(deployment, "runs/x") == tmp_path / "round-state"
    assert site_state_dir({"partition-id": 2, "num-partitions": 4}, str(tmp_path)) == tmp_path / "sites" / "partition-2"
    assert site_state_dir({"data-path": "/data/site-a"}, "runs/x") is None

    store = site_state(_train_message(RUN), _context(deployment), "runs/x")
    assert isinstance(store, SiteStateStore) and store.run_dir == tmp_path / "round-state" / RUN


def test_without_a_run_id_or_a_directory_state_stays_in_context_state_with_one_warning(tmp_path, caplog,
                                                                                      monkeypatch):
    import client.site_state

    monkeypatch.setattr(client.site_state, "_FALLBACK_LOGGED", set())
    context = _context({"data-path": "/data/site-a"})
    with caplog.at_level(logging.WARNING, logger="fedtune.client"):
        first = site_state(_train_message(RUN), context, str(tmp_path))
        site_state(_train_message(RUN), context, str(tmp_path))
    assert isinstance(first, ContextState)
    assert caplog.text.count("will not be bit-identical") == 1  # once per process and reason
    assert "no 'round-state-dir' in its node config" in caplog.text
    first.save_arrays(NAME, 4, _arrays(4.0))
    first.save_json("fedtune.dp-sgd", 4, {"k": 1})
    again = site_state(_train_message(None), context, str(tmp_path))
    assert again.load_arrays(NAME, 1)["a"][0, 0] == 4.0  # Context.state has no rounds: the newest value
    assert again.load_json("fedtune.dp-sgd", 1) == {"k": 1}


def _written_file(store: SiteStateStore, server_round: int) -> dict[str, np.ndarray]:
    """What the file holds (as another process would read it), bypassing this process's copy."""
    wait_for_background_writes()
    with np.load(store.run_dir / NAME / f"round-{server_round:04d}.npz") as data:
        return {key: data[key] for key in data.files}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return {k: (v.dtype, v.shape, v.tobytes()) for k, v in a.items()} == \
        {k: (v.dtype, v.shape, v.tobytes()) for k, v in b.items()}


def test_a_background_save_lands_on_disk_bit_for_bit_and_later_uses_wait_for_it(tmp_path, monkeypatch):
    import client.site_state

    real_write = client.site_state.atomic_write_bytes

    def slow_write(*args, **kwargs):
        time.sleep(0.3)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(client.site_state, "atomic_write_bytes", slow_write)
    store = SiteStateStore(tmp_path, RUN)
    arrays = _arrays(2.5)
    started = time.perf_counter()
    store.save_arrays(NAME, 2, arrays, background=True)
    assert time.perf_counter() - started < 0.2  # the caller does not wait for the file
    assert store.rounds(NAME) == [2]  # ... but every later use of the name does
    assert _same(store.load_arrays(NAME, 2), arrays)
    assert _same(_written_file(store, 2), arrays)


def test_the_process_reads_back_what_it_saved_from_memory_and_callers_cannot_change_it(tmp_path, monkeypatch):
    store = SiteStateStore(tmp_path, RUN)
    arrays = _arrays(3.0)
    store.save_arrays(NAME, 2, arrays, background=True)
    wait_for_background_writes()

    def no_disk_read(*args, **kwargs):
        raise AssertionError("read from disk")

    monkeypatch.setattr(np, "load", no_disk_read)
    loaded = SiteStateStore(tmp_path, RUN).load_arrays(NAME, 3)  # any store of the same directory and run
    assert _same(loaded, arrays)
    loaded["a"][0, 0] = 99.0
    assert store.load_arrays(NAME, 2)["a"][0, 0] == 3.0


def test_a_file_replaced_by_another_process_is_read_from_disk_not_from_memory(tmp_path):
    store = SiteStateStore(tmp_path, RUN)
    store.save_arrays(NAME, 2, _arrays(1.0), background=True)
    wait_for_background_writes()
    other = io.BytesIO()  # another worker of a simulation trained this partition since, and re-ran round 1
    np.savez(other, **_arrays(7.0))
    atomic_write_bytes(store.run_dir / NAME / "round-0002.npz", other.getvalue())
    assert store.load_arrays(NAME, 2)["a"][0, 0] == 7.0


def test_a_half_written_file_is_never_read(tmp_path):
    store = SiteStateStore(tmp_path, RUN)
    store.save_arrays(NAME, 2, _arrays(2.0), background=True)
    wait_for_background_writes()
    (store.run_dir / NAME / ".round-0003.npz.tmp-crashed").write_bytes(b"PK\x03\x04 cut off")  # a crash mid-write
    assert store.rounds(NAME) == [2]
    assert store.load_arrays(NAME, 3)["a"][0, 0] == 2.0


def test_a_failed_background_write_fails_the_next_use_once_and_keeps_the_old_state(tmp_path, monkeypatch, caplog):
    store = SiteStateStore(tmp_path, RUN)
    store.save_arrays(NAME, 2, _arrays(2.0))

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with caplog.at_level(logging.ERROR, logger="fedtune.client"):
        store.save_arrays(NAME, 3, _arrays(3.0), background=True)  # returns: the write fails later
        wait_for_background_writes()
    monkeypatch.undo()
    assert "disk gone" in caplog.text
    with pytest.raises(OSError, match="disk gone"):
        store.load_arrays(NAME, 3)
    assert store.load_arrays(NAME, 3)["a"][0, 0] == 2.0
    assert _files(store) == ["round-0002.npz"]


def _device_arrays() -> DeviceArrays:
    return DeviceArrays.of(torch.arange(9, dtype=torch.float32), {"a": (2, 3), "c": (3,)})


def test_device_arrays_stay_in_memory_and_reach_the_file_in_the_writer_thread(tmp_path, monkeypatch):
    copied_in = []
    real_to_host = DeviceArrays.to_host
    monkeypatch.setattr(DeviceArrays, "to_host",
                        lambda self: copied_in.append(threading.current_thread().name) or real_to_host(self))
    store = SiteStateStore(tmp_path, RUN)
    saved = _device_arrays()
    store.save_arrays(NAME, 2, saved, background=True)
    assert _same(_written_file(store, 2), real_to_host(saved))
    assert len(copied_in) == 1 and copied_in[0].startswith("site-state-writer")  # not the caller's thread
    loaded = store.load_arrays(NAME, 3)
    assert isinstance(loaded, DeviceArrays) and loaded.shapes == saved.shapes and torch.equal(loaded.flat, saved.flat)
    loaded.flat.zero_()  # callers may change what they loaded ...
    assert torch.equal(store.load_arrays(NAME, 3).flat, torch.arange(9, dtype=torch.float32))  # ... not the state
    assert len(copied_in) == 1  # nothing came to the host for the loads

    site_state_module._SAVED.clear()  # a restarted site: the file's numpy arrays
    restarted = SiteStateStore(tmp_path, RUN).load_arrays(NAME, 3)
    assert not isinstance(restarted, DeviceArrays) and _same(restarted, real_to_host(saved))


def test_context_state_keeps_device_arrays_as_numpy_arrays():
    state = ContextState(_context({}))
    state.save_arrays(NAME, 2, _device_arrays())
    assert _same(state.load_arrays(NAME, 2), _device_arrays().to_host())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_arrays_reach_the_file_after_the_kernels_that_compute_them(tmp_path):
    """The writer thread copies on a stream of its own: it must wait for the stream that computed the values."""
    store = SiteStateStore(tmp_path, RUN)
    computing = torch.cuda.Stream()
    with torch.cuda.stream(computing):
        flat = torch.zeros(1 << 22, device="cuda")
        torch.cuda._sleep(1 << 28)  # a slow kernel queued before the values are written
        flat += 1.0
        saved = DeviceArrays.of(flat, {"a": (1 << 22,)})
    store.save_arrays(NAME, 2, saved, background=True)
    assert np.all(_written_file(store, 2)["a"] == 1.0)
    assert torch.equal(store.load_arrays(NAME, 3).flat.cpu(), torch.ones(1 << 22))
