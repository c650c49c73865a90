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
from federation.validation import check_bool_overrides, check_schema, config_error_from_hydra, validate_run_config


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
    overrides = typed_param_overrides(list(overrides or []), config_dir)
    check_bool_overrides(overrides, RunConfig)
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=overrides)
        except Exception as exc:  # hydra/omegaconf raise assorted types; each becomes one ConfigError line
            raise config_error_from_hydra(exc, overrides, config_dir) from exc
        return to_run_config(cfg)


def _chosen(overrides: list[str], key: str) -> str | None:
    """The value the last plain `key=value` override gives (None if none does)."""
    values = [o.split("=", 1)[1] for o in overrides if "=" in o and o.split("=", 1)[0] == key]
    return values[-1] if values else None


def typed_param_overrides(overrides: list[str], config_dir: str | Path = CONF_DIR) -> list[str]:
    """`strategy.params.<key>=V` as hydra's add-or-set `++` when <key> is in the chosen strategy's typed params.

    conf/strategy/*.yaml hold only what differs from the defaults in strategies/params.py, so a documented key may
    be absent from the composed mapping, where hydra would want '+'; any other key keeps hydra's own answer.
    """
    from omegaconf import OmegaConf

    from strategies.registry import STRATEGIES, params_schema

    name = _chosen(overrides, "strategy") or _chosen(overrides, "strategy.name")
    if name is None:
        defaults = OmegaConf.to_container(OmegaConf.load(Path(config_dir) / "config.yaml")).get("defaults", [])
        name = next((entry["strategy"] for entry in defaults if isinstance(entry, dict) and "strategy" in entry), "")
    if name not in STRATEGIES:
        return overrides
    schema = params_schema(name, _chosen(overrides, "strategy.aggregator") or "")
    prefix = "strategy.params."
    return [f"++{o}" if o.startswith(prefix) and "=" in o and o[len(prefix):].split("=", 1)[0] in schema else o
            for o in overrides]
