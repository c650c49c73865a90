"""This site's LoRA rank and local optimizer steps per round: the site's node config, else the run's per-partition
lists, else the run's own values. Torch-free: the site's policy (client/site_policy.py) plans steps with it too."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from federation.config import PARAM_SITE_LOCAL_STEPS, PARAM_SITE_RANKS, RunConfig
from federation.protocol import NODE_LOCAL_STEPS_KEY, NODE_RANK_KEY


@dataclass(frozen=True)
class SiteSettings:
    """This site's LoRA rank and local optimizer steps per round."""

    rank: int
    local_steps: int


def _per_partition(values, node_config: Mapping, what: str) -> int | None:
    if not values:
        return None
    if "partition-id" not in node_config:
        raise ValueError(f"strategy.params.{what} is given per simulation partition, but this node has no "
                         f"partition-id; set node config '{NODE_RANK_KEY}' / '{NODE_LOCAL_STEPS_KEY}' instead")
    return int(list(values)[int(node_config["partition-id"]) % len(values)])


def site_settings(cfg: RunConfig, node_config: Mapping) -> SiteSettings:
    """Rank and local steps of this site: node config, else params lists by partition id, else the run's."""
    return _settings(cfg.strategy.params or {}, cfg.lora.r, cfg.train.local_steps, node_config)


def site_settings_of(run_config: Mapping, node_config: Mapping) -> SiteSettings:
    """site_settings of a run config as the JSON dict on the wire (before its schema validation)."""
    return _settings(run_config["strategy"].get("params") or {}, int(run_config["lora"]["r"]),
                     int(run_config["train"]["local_steps"]), node_config)


def _settings(params: Mapping, run_rank: int, run_local_steps: int, node_config: Mapping) -> SiteSettings:
    rank = node_config.get(NODE_RANK_KEY)
    if rank is None:
        rank = _per_partition(params.get(PARAM_SITE_RANKS), node_config, PARAM_SITE_RANKS)
    steps = node_config.get(NODE_LOCAL_STEPS_KEY)
    if steps is None:
        steps = _per_partition(params.get(PARAM_SITE_LOCAL_STEPS), node_config, PARAM_SITE_LOCAL_STEPS)
    settings = SiteSettings(int(run_rank if rank is None else rank), int(run_local_steps if steps is None else steps))
    if settings.rank < 1 or settings.local_steps < 1:
        raise ValueError(f"site LoRA rank and local steps must be >= 1, got {settings}")
    return settings
