"""Shared fixtures: a tiny offline config and a resident tiny LoRA model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

TINY_OVERRIDES = [
    "data.demo.examples_per_skill=24",
    "data.demo.eval_examples_per_skill=8",
    "train.local_steps=2",
    "train.batch_size=4",
]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    """One preset cache per test session (the tiny model is built once)."""
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture
def make_cfg(model_cache, tmp_path):
    """Compose the real hydra config with tiny, fast overrides."""
    from federation.compose import compose_config

    def _make(*overrides: str):
        return compose_config([*TINY_OVERRIDES, f"model.cache_dir={model_cache}", f"output_dir={tmp_path / 'run'}",
                               *overrides])

    return _make


@pytest.fixture
def tiny_lora(make_cfg):
    """(cfg, peft_model, tokenizer, info) for the tiny preset."""
    from federation.model import build_lora_model

    cfg = make_cfg()
    model, tokenizer, info = build_lora_model(cfg.model, cfg.lora)
    return cfg, model, tokenizer, info
