"""Build a validated RunConfig: compose conf/ with hydra overrides, or read one off the wire.

Kept apart from federation/config.py (the schema) so the schema imports nothing of the project and
federation/validation.py (which reads the schema) does not import it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from federation.config import CONF_DIR, RunConfig
from federation.validation import check_schema, config_error_from_hydra, validate_run_config


def to_run_config(cfg: DictConfig | dict[str, Any] | None) -> RunConfig:
    """Check a (hydra) config against the schema and validate it (federation.validation); raises ConfigError."""
    run_config = check_schema(cfg or {}, RunConfig)
    validate_run_config(run_config)
    return run_config


def run_config_from_json(text: str) -> RunConfig:
    """Inverse of run_config_to_json (validated like every composed config)."""
    return to_run_config(json.loads(text))


def compose_config(overrides: list[str] | None = None, config_dir: str | Path = CONF_DIR) -> RunConfig:
    """Compose conf/config.yaml with hydra overrides (``strategy=fedavg federation.rounds=3``) into a RunConfig.

    Every mistake (hydra's own: unknown group option or key, wrong type, unparsable override; and
    federation.validation's) is a ConfigError naming the key.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    # The schema is the base of conf/config.yaml, so every field can be overridden without '+'.
    ConfigStore.instance().store(name="fedtune_schema", node=RunConfig)

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=overrides)
        except Exception as exc:  # hydra/omegaconf raise assorted types; each becomes one ConfigError line
            raise config_error_from_hydra(exc, overrides, config_dir) from exc
        return to_run_config(cfg)
