import json

import numpy as np
import pytest

from federation.adapter import get_adapter_arrays
from federation.model import initial_adapter, load_base_model, peft_lora_config
from federation.store import GlobalAdapterStore, MetricsLog, sha256_file


def _arrays(cfg, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in initial_adapter(cfg.model, cfg.lora).items()}


def test_saved_round_is_a_peft_adapter_directory(make_cfg, tmp_path):
    from peft import PeftModel

    cfg = make_cfg()
    store = GlobalAdapterStore(tmp_path / "run")
    arrays = _arrays(cfg, 1)
    path = store.save(1, arrays, peft_lora_config(cfg.lora))
    assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()
    base, _, _ = load_base_model(cfg.model)
    model = PeftModel.from_pretrained(base, str(store.global_adapter_dir))
    loaded = get_adapter_arrays(model)
    assert sorted(loaded) == sorted(arrays)
    for key in arrays:
        np.testing.assert_array_equal(loaded[key], arrays[key])
    state = json.loads((path / "server_state.json").read_text())
    assert state["adapter_sha256"] == sha256_file(path / "adapter_model.safetensors")


def test_crash_during_save_keeps_previous_global_adapter(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg()
    store = GlobalAdapterStore(tmp_path / "run")
    first = _arrays(cfg, 1)
    store.save(1, first, peft_lora_config(cfg.lora))
    before = sha256_file(store.global_adapter_dir / "adapter_model.safetensors")

    import safetensors.numpy

    def exploding_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        store.save(2, _arrays(cfg, 2), peft_lora_config(cfg.lora))
    assert store.latest()[0] == 1
    assert sha256_file(store.global_adapter_dir / "adapter_model.safetensors") == before
    assert not any(p.name.startswith(".") for p in store.checkpoints.iterdir()), "temp dir left behind"
    arrays, _ = store.load()
    assert all(np.array_equal(arrays[k], first[k]) for k in first)


def test_load_detects_corruption(make_cfg, tmp_path):
    cfg = make_cfg()
    store = GlobalAdapterStore(tmp_path / "run")
    path = store.save(1, _arrays(cfg, 1), peft_lora_config(cfg.lora))
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        store.load()


def test_keep_last_prunes_old_rounds(make_cfg, tmp_path):
    cfg = make_cfg()
    store = GlobalAdapterStore(tmp_path / "run", keep_last=2)
    for rnd in range(4):
        store.save(rnd, _arrays(cfg, rnd), peft_lora_config(cfg.lora))
    assert sorted(p.name for p in store.checkpoints.iterdir()) == ["round-0002", "round-0003"]


def test_metrics_log_appends_rows(tmp_path):
    log = MetricsLog(tmp_path / "m" / "metrics.jsonl")
    log.append({"round": 1, "eval_loss": 2.5})
    log.append({"round": 2, "eval_loss": 2.0})
    assert [r["round"] for r in log.rows()] == [1, 2]
