"""One check of everything a user controls, before any work starts; every mistake is one ConfigError line.

``validate_run_config(cfg)`` runs wherever a config is composed or received (federation.config
``to_run_config``, so ``compose_config`` and ``run_config_from_json``): unknown names (each error lists the
valid choices, taken from where they are defined), numeric ranges, and the model/LoRA/strategy/privacy
combinations the coordinator or the sites would otherwise refuse only once the run is under way.
``validate_simulation_data(cfg)`` reads every line of the data a simulation will partition (the JSONL pool
and eval file, the data=hf files or hub split, or the demo task) and checks that every simulated site gets examples.
``check_schema`` and ``config_error_from_hydra`` turn OmegaConf's and hydra's own errors (unknown key or
group option, wrong type, unparsable override) into the same one-line ConfigError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import string
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from federation.config import (ATTENTION_CHOICES, CONF_DIR, FAST_PATH_CHOICES, FOLD_ORDERS, KERNEL_CHOICES, LR_SCHEDULES,
                               PARAM_SITE_LOCAL_STEPS, PARAM_SITE_RANKS,
                               SECAGG_MAX_MODULUS_RANGE, SECAGG_MAX_QUANTIZATION_RANGE, TRACKERS, RunConfig,
                               group_options, sites_per_round)
from strategies.aggregators import MixedRanksError
from strategies.params import AGGREGATOR_PARAMS, NoParams, is_required, param_fields
from strategies.registry import STRATEGIES, aggregator_of, params_schema


class ConfigError(ValueError):
    """A user-controlled setting is unusable; str() is one line that names the key (and the valid choices)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class RankPlanError(ConfigError, MixedRanksError):
    """strategy.params.site_ranks mixes LoRA ranks under a strategy that trains one rank."""


# --------------------------------------------------------------------------------------------- helpers

Rule = tuple[str, Callable[[Any], bool]]
AT_LEAST_1: Rule = (">= 1", lambda v: v >= 1)
POSITIVE: Rule = ("> 0", lambda v: v > 0)
NON_NEGATIVE: Rule = (">= 0", lambda v: v >= 0)
OPEN_UNIT: Rule = ("in (0, 1)", lambda v: 0 < v < 1)
FRACTION: Rule = ("in (0, 1]", lambda v: 0 < v <= 1)
HALF_OPEN_UNIT: Rule = ("in [0, 1)", lambda v: 0 <= v < 1)
CLOSED_UNIT: Rule = ("in [0, 1]", lambda v: 0 <= v <= 1)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(key: str, value: Any, rule: Rule) -> None:
    text, ok = rule
    if not _is_number(value) or not math.isfinite(value) or not ok(value):
        raise ConfigError(key, f"{key} must be {text}, got {value!r}")


def _check_ranges(cfg: Any, rules: Mapping[str, Rule], prefix: str = "") -> None:
    for key, rule in rules.items():
        _check(prefix + key, _get(cfg, key), rule)


def _check_choice(key: str, value: Any, valid: Sequence[str], what: str | None = None) -> None:
    if value not in valid:
        raise ConfigError(key, f"{what or key} {value!r} unknown; valid: {', '.join(map(str, valid))}")


@contextlib.contextmanager
def _quiet():
    """No warnings or log lines below ERROR inside: libraries' side notes while a check runs are not the user's."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


# ----------------------------------------------------------------------------------------- the config

RUN_RANGES: dict[str, Rule] = {
    "lora.r": AT_LEAST_1,
    "lora.alpha": POSITIVE,
    "lora.dropout": HALF_OPEN_UNIT,
    "data.max_seq_len": (">= 2", lambda v: v >= 2),
    "data.alpha": POSITIVE,
    "data.min_partition_size": NON_NEGATIVE,
    "data.classes_per_site": AT_LEAST_1,
    "data.eval_fraction": HALF_OPEN_UNIT,
    "train.local_steps": AT_LEAST_1,
    "train.local_epochs": NON_NEGATIVE,
    "train.lr": POSITIVE,
    "train.batch_size": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.warmup_ratio": HALF_OPEN_UNIT,
    "train.weight_decay": NON_NEGATIVE,
    "train.max_grad_norm": (">= 0 (0: no clipping)", lambda v: v >= 0),
    "train.eval_batch_size": AT_LEAST_1,
    "train.checkpoint_every": (">= 0 (0: no checkpointing)", lambda v: v >= 0),
    "strategy.proximal_mu": NON_NEGATIVE,
    "strategy.fraction_train": FRACTION,
    "strategy.fraction_evaluate": ("in [0, 1] (0: no federated evaluation)", CLOSED_UNIT[1]),
    "strategy.min_train_clients": AT_LEAST_1,
    "strategy.min_evaluate_clients": AT_LEAST_1,
    "strategy.min_available_clients": AT_LEAST_1,
    "federation.num_clients": AT_LEAST_1,
    "federation.rounds": AT_LEAST_1,
    "federation.round_timeout_s": POSITIVE,
    "federation.evaluate_timeout_s": (">= 0 (0: round_timeout_s)", lambda v: v >= 0),
    "federation.query_timeout_s": (">= 0 (0: round_timeout_s)", lambda v: v >= 0),
    "federation.client_num_cpus": POSITIVE,
    "federation.client_num_gpus": NON_NEGATIVE,
    "federation.keep_last_checkpoints": (">= 0 (0: keep all)", lambda v: v >= 0),
    "federation.min_completed_clients": AT_LEAST_1,
    "federation.clients_per_batch": AT_LEAST_1,
    "federation.max_failed_rounds": AT_LEAST_1,
    "eval.every_n_rounds": AT_LEAST_1,
    "eval.max_examples": (">= 0 (0: all held-out examples)", lambda v: v >= 0),
    "eval.max_new_tokens": AT_LEAST_1,
    "eval.batch_size": AT_LEAST_1,
}
TINY_PRESET_RANGES: dict[str, Rule] = {
    "hidden_size": AT_LEAST_1, "intermediate_size": AT_LEAST_1, "num_hidden_layers": AT_LEAST_1,
    "num_attention_heads": AT_LEAST_1, "num_key_value_heads": AT_LEAST_1,
    "vocab_size": (">= 0 (0: the local tokenizer's)", lambda v: v >= 0), "max_position_embeddings": AT_LEAST_1,
    "rope_theta": POSITIVE, "initializer_range": POSITIVE,
}
CENTRAL_DP_RANGES: dict[str, Rule] = {
    "clip_norm": POSITIVE, "noise_multiplier": NON_NEGATIVE, "target_epsilon": (">= 0 (0: use noise_multiplier)",
                                                                                  lambda v: v >= 0),
    "delta": OPEN_UNIT, "max_noise_multiplier": POSITIVE,
}
ADAPTIVE_CLIPPING_RANGES: dict[str, Rule] = {
    "target_unclipped_quantile": CLOSED_UNIT, "clip_norm_lr": POSITIVE,
    "clipped_count_stddev": (">= 0 (0: the paper's default)", lambda v: v >= 0),
}
LOCAL_DP_SGD_RANGES: dict[str, Rule] = {
    "max_grad_norm": POSITIVE, "noise_multiplier": NON_NEGATIVE,
    "target_epsilon": (">= 0 (0: use noise_multiplier)", lambda v: v >= 0), "delta": OPEN_UNIT,
}
# Numeric strategy.params (and strategy.params.inner_params) of the aggregators in strategies/aggregators.py.
AGGREGATOR_PARAM_RANGES: dict[str, Rule] = {
    "server_lr": POSITIVE, "momentum": HALF_OPEN_UNIT, "eta": POSITIVE, "beta_1": HALF_OPEN_UNIT,
    "beta_2": HALF_OPEN_UNIT, "tau": POSITIVE, "a_atol": NON_NEGATIVE, "scaling": POSITIVE,
    "max_norm": POSITIVE, "trim_fraction": ("in [0, 0.5)", lambda v: 0 <= v < 0.5),
    "num_malicious": ("an integer >= 0", lambda v: v >= 0 and v == int(v)),
    "multi_k": ("an integer >= 1", lambda v: v >= 1 and v == int(v)),
}


def validate_run_config(cfg: RunConfig) -> RunConfig:
    """Raise ConfigError for the first unusable setting of cfg; returns cfg. Reads no data files."""
    _check_ranges(cfg, RUN_RANGES)
    _check_federation(cfg)
    _check_model(cfg)
    _check_data(cfg)
    _check_strategy(cfg)
    _check_privacy(cfg)
    _check_adapter_fits_model(cfg)
    _check_choice("tracking.name", cfg.tracking.name, TRACKERS, "tracker")
    _check_choice("train.fast_path", str(cfg.train.fast_path).lower(), FAST_PATH_CHOICES)
    _check_choice("train.kernels", str(cfg.train.kernels).lower(), KERNEL_CHOICES)
    _check_choice("train.attention", str(cfg.train.attention).lower(), ATTENTION_CHOICES)
    _check_choice("train.cudnn_attention", str(cfg.train.cudnn_attention).lower(), FAST_PATH_CHOICES)
    _check_choice("train.lr_schedule", cfg.train.lr_schedule, LR_SCHEDULES)
    return cfg


# The package each tracker needs (optional dependencies: pip install -e ".[tracking]").
TRACKER_PACKAGES = {"mlflow": ("mlflow", "mlflow-skinny"), "tensorboard": ("tensorboard", "tensorboard")}


def validate_coordinator_setup(cfg: RunConfig) -> None:
    """What only the coordinator needs (sites never check it): the tracker's package and a readable eval.gold_set."""
    import importlib.util

    if cfg.tracking.name in TRACKER_PACKAGES:
        module, package = TRACKER_PACKAGES[cfg.tracking.name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError("tracking.name", f"tracking={cfg.tracking.name} needs the {package} package, which is "
                              f"not installed: pip install {package} (or pip install -e \".[tracking]\")")
    if cfg.eval.gold_set:
        check_jsonl_files([cfg.eval.gold_set], "eval.gold_set")


def _check_federation(cfg: RunConfig) -> None:
    from federation.compression import CODECS, UploadCodec

    f, s = cfg.federation, cfg.strategy
    for key in ("min_train_clients", "min_evaluate_clients", "min_available_clients"):
        if getattr(s, key) > f.num_clients:
            raise ConfigError(f"strategy.{key}", f"strategy.{key} ({getattr(s, key)}) must be <= "
                              f"federation.num_clients ({f.num_clients}): Flower would wait for sites that never come")
    per_round = sites_per_round(cfg)
    if f.min_completed_clients > per_round:
        raise ConfigError("federation.min_completed_clients",
                          f"federation.min_completed_clients ({f.min_completed_clients}) must be <= the sites sampled "
                          f"per round ({per_round}, from federation.num_clients and strategy.fraction_train / "
                          "min_train_clients): no round could ever be aggregated")
    _check_choice("federation.upload_codec", f.upload_codec, CODECS, "upload codec")
    _check_choice("federation.fold_order", f.fold_order, FOLD_ORDERS, "fold order")
    codec_params = [field.name for field in dataclasses.fields(UploadCodec) if field.name != "name"]
    unknown = sorted(set(f.upload_codec_params) - set(codec_params))
    if unknown:
        raise ConfigError("federation.upload_codec_params", f"federation.upload_codec_params: unknown {unknown}; "
                          f"valid: {', '.join(codec_params)}")
    try:
        UploadCodec(f.upload_codec, **dict(f.upload_codec_params))  # its own range checks
    except (TypeError, ValueError) as exc:
        raise ConfigError("federation.upload_codec_params", f"federation.upload_codec_params: {exc}") from None


def _check_model(cfg: RunConfig) -> None:
    from federation.model import FLOAT_DTYPES, PRESET_NAMES, QUANTIZATION_MODES

    m = cfg.model
    if not m.name:
        raise ConfigError("model.name", "model.name is empty: a hub id, a local directory, or 'preset'")
    _check_choice("model.quantization", m.quantization, QUANTIZATION_MODES)
    _check_choice("model.compute_dtype", m.compute_dtype, FLOAT_DTYPES)
    if m.device != "auto":
        import torch

        try:
            torch.device(m.device)
        except RuntimeError:
            raise ConfigError("model.device", f"model.device {m.device!r} unknown; valid: auto, cpu, cuda, "
                              "cuda:N or another torch device") from None
    if m.name != "preset":
        return
    _check_choice("model.preset_name", m.preset_name, PRESET_NAMES, "model preset")
    if m.preset_name != "tiny":
        return
    _check_ranges(m.preset, TINY_PRESET_RANGES, "model.preset.")
    _check_choice("model.preset.dtype", m.preset.dtype, FLOAT_DTYPES)
    for big, small in (("hidden_size", "num_attention_heads"), ("num_attention_heads", "num_key_value_heads")):
        if getattr(m.preset, big) % getattr(m.preset, small):
            raise ConfigError(f"model.preset.{big}", f"model.preset.{big} ({getattr(m.preset, big)}) must be a "
                              f"multiple of model.preset.{small} ({getattr(m.preset, small)})")


def _check_data(cfg: RunConfig) -> None:
    from federation.data import CHAT_TEMPLATE_NAME, CLASS_ASSIGNMENTS, PARTITIONERS, POOL_READERS, PROMPT_FIELDS

    d = cfg.data
    _check_choice("data.loader", d.loader, list(POOL_READERS), "data loader")
    if not d.source:
        what = ("a directory of parquet/arrow/json files, one such file, or a hub id (data=hf data.source=/path/dir)"
                if d.loader == "hf" else "'demo' or the path of a JSONL file (data=jsonl data.source=/path/pool.jsonl)")
        raise ConfigError("data.source", f"data.source is required: {what}")
    if d.eval_path and d.source == "demo" and d.loader == "jsonl":
        raise ConfigError("data.eval_path", "data.eval_path is only read with a JSONL data.source; the demo task "
                          "holds out its own eval examples")
    if d.loader == "hf":
        from federation.hf_data import FORMATS

        _check_choice("data.format", d.format, FORMATS, "record format")
        for name, column in dataclasses.asdict(d.columns).items():
            if not column:
                raise ConfigError(f"data.columns.{name}", f"data.columns.{name} is empty: the dataset column of "
                                  f"the record's {name!r} field")
        if d.eval_path and d.eval_split:
            raise ConfigError("data.eval_split", "data.eval_path and data.eval_split both name the eval pool; "
                              "set one of them")
        if not d.split:
            raise ConfigError("data.split", "data.split is empty: the split to train on (e.g. train)")
    _check_choice("data.partitioner", d.partitioner, list(PARTITIONERS), "partitioner")
    if d.partitioner == "pathological":
        _check_choice("data.class_assignment", d.class_assignment, CLASS_ASSIGNMENTS, "class assignment")
    if not d.partition_by:
        raise ConfigError("data.partition_by", "data.partition_by is empty: the record field / column that labels "
                          "an example (its source, category or natural id)")
    if d.prompt_template == CHAT_TEMPLATE_NAME:
        return
    valid = ", ".join("{" + name + "}" for name in PROMPT_FIELDS) + f" (or the value '{CHAT_TEMPLATE_NAME}')"
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(d.prompt_template) if name is not None]
    except ValueError as exc:
        raise ConfigError("data.prompt_template", f"data.prompt_template is not a str.format template ({exc}); "
                          f"valid fields: {valid}") from None
    unknown = [name for name in fields if name not in PROMPT_FIELDS]
    if unknown:
        raise ConfigError("data.prompt_template", f"data.prompt_template field {{{unknown[0]}}} unknown; valid: "
                          f"{valid}")


# ------------------------------------------------------------------------------------------- strategy


def mixed_ranks_message(strategy_name: str, rank: int, asked: Mapping[str, int]) -> str:
    """Why a one-rank strategy cannot serve sites that ask for other LoRA ranks (and what can)."""
    listing = ", ".join(f"{site} r={r}" for site, r in asked.items())
    return (f"strategy {strategy_name!r} needs the same LoRA rank (lora.r={rank}) at every site, but {listing}; "
            "use strategy=flora (stacking) or strategy=flexlora (SVD redistribution) for mixed ranks, "
            "or give every site the same rank")


def check_rank_plan(cfg: RunConfig) -> None:
    """strategy.params.site_ranks / site_local_steps: lists of integers >= 1; mixed ranks only under flora/flexlora."""
    params = cfg.strategy.params or {}
    for name in (PARAM_SITE_RANKS, PARAM_SITE_LOCAL_STEPS):
        values = params.get(name) or []
        if not isinstance(values, (list, tuple)) or not all(
                _is_number(v) and v == int(v) and v >= 1 for v in values):
            raise ConfigError(f"strategy.params.{name}", f"strategy.params.{name} must be a list of integers >= 1 "
                              f"(one per simulation partition), got {values!r}")
    ranks = [int(r) for r in params.get(PARAM_SITE_RANKS) or []]
    if not STRATEGIES[cfg.strategy.name].mixed_ranks and any(r != cfg.lora.r for r in ranks):
        raise RankPlanError(f"strategy.params.{PARAM_SITE_RANKS}", mixed_ranks_message(
            cfg.strategy.name, cfg.lora.r, {f"partition {i}": r for i, r in enumerate(ranks)}))


def _check_strategy(cfg: RunConfig) -> None:
    """strategy.*: the name, the privacy combinations its registry flags allow, its aggregator and typed params."""
    s, privacy = cfg.strategy, cfg.privacy
    _check_choice("strategy.name", s.name, group_options("strategy"), "strategy")
    spec = STRATEGIES[s.name]  # tests/strategies/test_registry.py: every conf/strategy YAML has an entry
    check_rank_plan(cfg)
    params = dict(s.params or {})
    if (privacy.secagg.enabled and not spec.secagg) or (privacy.central.enabled and not spec.central_dp):
        raise ConfigError("privacy", f"strategy {s.name!r} needs each site's own update (FLoRA/FlexLoRA/FedEx: "
                          "factors; SCAFFOLD: delta_c; FedSA-LoRA: B-free uploads): privacy.secagg and "
                          "privacy.central are not supported with it")
    if privacy.local_dp_sgd.enabled and not spec.dp_sgd:
        raise ConfigError("privacy.local_dp_sgd", f"strategy {s.name!r} cannot run with "
                          "privacy.local_dp_sgd: the DP-SGD step does not apply the control-variate correction")
    aggregator = aggregator_of(s.name, s.aggregator)
    if spec.aggregator is None and s.aggregator not in ("", s.name):
        raise ConfigError("strategy.aggregator", f"strategy {s.name!r} aggregates by itself; "
                          f"strategy.aggregator must be empty or {s.name!r}, got {s.aggregator!r}")
    key = "strategy.aggregator" if s.aggregator else "strategy.name"
    if aggregator is not None:
        from strategies.aggregators import valid_aggregator_names

        if "fedex_lora" in (aggregator, str(params.get("inner", ""))):
            raise ConfigError("strategy.aggregator", "aggregator 'fedex_lora' runs only as "
                              "strategy=fedex_lora (its residual is applied there)")
        _check_choice(key, aggregator, valid_aggregator_names(), "aggregator")
    _check_typed_params(s.name, params, params_schema(s.name, s.aggregator))
    if aggregator is not None:  # numeric ranges and the aggregator's own checks, on its share of the params
        takes = param_fields(AGGREGATOR_PARAMS.get(aggregator, NoParams))
        _check_aggregator(cfg, aggregator, {name: value for name, value in params.items() if name in takes}, key)


# strategies/params.py annotation -> (what the error says, the check)
_PARAM_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "float": ("a number", _is_number),
    "int": ("an integer", lambda v: _is_number(v) and v == int(v)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "list[int]": ("a list", lambda v: isinstance(v, (list, tuple))),
    "dict[str, Any]": ("a mapping", lambda v: isinstance(v, Mapping)),
}


def _check_typed_params(name: str, params: Mapping[str, Any], schema: Mapping[str, dataclasses.Field]) -> None:
    """strategy.params against the strategy's typed schema (strategies/params.py): known keys, required ones given,
    types and choices. Numeric ranges and the aggregator's own checks follow in _check_aggregator."""
    unknown = sorted(set(params) - set(schema))
    if unknown:
        raise ConfigError("strategy.params", f"strategy {name!r} takes params "
                          f"{', '.join(schema) if schema else 'none'}; unknown {unknown}")
    for key, f in schema.items():
        full = f"strategy.params.{key}"
        if key not in params:
            if is_required(f):
                raise ConfigError(full, f"{full} is required by strategy {name!r} ({f.metadata['help']})")
            continue
        what, ok = _PARAM_TYPES[str(f.type)]
        if not ok(params[key]):
            raise ConfigError(full, f"{full} must be {what}, got {params[key]!r}")
        if f.metadata.get("choices"):
            _check_choice(full, params[key], f.metadata["choices"])


def _check_aggregator(cfg: RunConfig, name: str, params: dict[str, Any], key: str) -> None:
    """The aggregator strategies.aggregators.build_aggregator would build from (name, params), and its params."""
    from strategies.aggregators import ROBUST_METHOD_PARAMS, build_aggregator, valid_aggregator_names

    valid = valid_aggregator_names()
    _check_choice(key, name, valid, "aggregator")
    if name in ROBUST_METHOD_PARAMS:
        _check_choice("strategy.params.inner", params.get("inner", "fedavg"), valid, "inner aggregator")
    for prefix, values in (("strategy.params.", params),
                           ("strategy.params.inner_params.", params.get("inner_params") or {})):
        if not isinstance(values, Mapping):
            raise ConfigError(prefix[:-1], f"{prefix[:-1]} must be a mapping, got {values!r}")
        for param, value in values.items():
            if param in AGGREGATOR_PARAM_RANGES:
                _check(prefix + param, value, AGGREGATOR_PARAM_RANGES[param])
    try:
        # Unknown / missing parameters and impossible robust+inner pairs: the registry's own checks.
        build_aggregator(name, params)
    except (TypeError, ValueError) as exc:
        raise ConfigError("strategy.params", f"strategy.params: {exc}") from None
    effective = params.get("inner", "fedavg") if name in ROBUST_METHOD_PARAMS else name
    if effective == "ffa_lora" and not cfg.strategy.freeze_lora_a:
        raise ConfigError("strategy.freeze_lora_a", "aggregator 'ffa_lora' needs strategy.freeze_lora_a=true: it "
                          "rejects every site whose lora_A moved")
    if name in ("krum", "multi_krum"):
        multi_k = int(params.get("multi_k", 1))
        if multi_k > sites_per_round(cfg):
            raise ConfigError("strategy.params.multi_k", f"strategy.params.multi_k ({multi_k}) must be <= the sites "
                              f"sampled per round ({sites_per_round(cfg)})")
    if cfg.privacy.secagg.enabled:
        check_secagg_aggregator(name)


# -------------------------------------------------------------------------------------------- privacy


def check_secagg_aggregator(aggregator_name: str) -> None:
    """ConfigError unless the aggregator needs only the weighted mean of the deltas (all SecAgg+ reveals)."""
    from strategies.aggregators import sum_only_aggregator_names

    if aggregator_name not in sum_only_aggregator_names():
        raise ConfigError("privacy.secagg", f"aggregator {aggregator_name!r} needs individual site updates, which "
                          f"SecAgg+ hides; with privacy.secagg use one of {sum_only_aggregator_names()}")


def check_secagg_params(params: Any, prefix: str = "privacy.secagg.") -> None:
    """Ranges of SecAgg+ settings (federation.config.SecAggConfig or server.secagg.SecAggParams)."""
    num_shares, threshold = params.num_shares, params.reconstruction_threshold
    if not num_shares > 0:
        raise ConfigError(prefix + "num_shares", f"{prefix}num_shares must be > 0, got {num_shares}")
    if num_shares > 1 and (num_shares != int(num_shares) or num_shares < 3 or int(num_shares) % 2 == 0):
        # Flower bumps an even count after it has already sent it to the sites (1.41): keep it odd.
        raise ConfigError(prefix + "num_shares", f"{prefix}num_shares as a count must be an odd integer >= 3 "
                          f"(or a fraction <= 1 of the sampled sites), got {num_shares}")
    if not threshold > 0:
        raise ConfigError(prefix + "reconstruction_threshold",
                          f"{prefix}reconstruction_threshold must be > 0, got {threshold}")
    if threshold > 1 and threshold != int(threshold):
        raise ConfigError(prefix + "reconstruction_threshold",
                          f"{prefix}reconstruction_threshold as a count must be an integer, got {threshold}")
    if num_shares > 1 and threshold > 1 and threshold >= num_shares:
        raise ConfigError(prefix + "reconstruction_threshold", f"{prefix}reconstruction_threshold ({threshold}) "
                          f"must be below {prefix}num_shares ({num_shares})")
    _check(prefix + "clipping_range", params.clipping_range, POSITIVE)
    q, modulus = params.quantization_range, params.modulus_range
    if int(q) != q or not 1 < q <= SECAGG_MAX_QUANTIZATION_RANGE:
        raise ConfigError(prefix + "quantization_range", f"{prefix}quantization_range must be an integer in "
                          f"(1, {SECAGG_MAX_QUANTIZATION_RANGE}], got {q}")
    _check(prefix + "max_weight", params.max_weight, POSITIVE)
    if bin(int(modulus)).count("1") != 1 or not q < modulus or modulus > SECAGG_MAX_MODULUS_RANGE:
        raise ConfigError(prefix + "modulus_range", f"{prefix}modulus_range must be a power of two in "
                          f"(quantization_range, 2**32], got {modulus}")
    _check(prefix + "timeout", params.timeout, NON_NEGATIVE)


def _check_privacy(cfg: RunConfig) -> None:
    central, local, secagg = cfg.privacy.central, cfg.privacy.local_dp_sgd, cfg.privacy.secagg
    if central.enabled or local.enabled:
        from federation.privacy import ACCOUNTANTS  # imports Opacus: only when DP is on
    if central.enabled:
        _check_ranges(central, CENTRAL_DP_RANGES, "privacy.central.")
        _check_choice("privacy.central.accountant", central.accountant, ACCOUNTANTS, "accountant")
        if central.adaptive_clipping:
            _check_ranges(central, ADAPTIVE_CLIPPING_RANGES, "privacy.central.")
    if local.enabled:
        _check_ranges(local, LOCAL_DP_SGD_RANGES, "privacy.local_dp_sgd.")
        _check_choice("privacy.local_dp_sgd.accountant", local.accountant, ACCOUNTANTS, "accountant")
    if secagg.enabled:
        check_secagg_params(secagg)
        if central.enabled and central.adaptive_clipping:
            raise ConfigError("privacy.central.adaptive_clipping", "privacy.central.adaptive_clipping needs each "
                              "site's clipped/unclipped bit, which SecAgg+ hides; use a fixed clip norm with "
                              "privacy.secagg")
        if central.enabled and secagg.clipping_range < central.clip_norm:
            raise ConfigError("privacy.secagg.clipping_range", f"privacy.secagg.clipping_range "
                              f"({secagg.clipping_range}) must be >= privacy.central.clip_norm ({central.clip_norm})")
        if cfg.federation.num_clients * secagg.quantization_range >= secagg.modulus_range:
            raise ConfigError("privacy.secagg.quantization_range", f"{cfg.federation.num_clients} sites x "
                              f"privacy.secagg.quantization_range {secagg.quantization_range} would wrap around "
                              f"privacy.secagg.modulus_range {secagg.modulus_range}; lower quantization_range")
        if cfg.strategy.min_train_clients < 2:
            raise ConfigError("strategy.min_train_clients", "SecAgg+ needs at least 2 sites per round: set "
                              "strategy.min_train_clients >= 2")
    if central.enabled and central.target_epsilon > 0:
        from federation.privacy import calibrate_noise_multiplier

        try:  # the noise that reaches the target is calibrated again when the run starts (server/privacy.py)
            with _quiet():  # Opacus' notes on the accountant's order range
                calibrate_noise_multiplier(central.target_epsilon, central.delta,
                                           sites_per_round(cfg) / cfg.federation.num_clients,
                                           cfg.federation.rounds, central.accountant, central.max_noise_multiplier)
        except ValueError as exc:
            raise ConfigError("privacy.central.target_epsilon", f"privacy.central.target_epsilon: {exc}") from None


def _check_adapter_fits_model(cfg: RunConfig) -> None:
    """lora.target_modules exist in a preset model (built on the meta device; hub models are checked at run start)."""
    if not cfg.lora.target_modules or not all(cfg.lora.target_modules):
        raise ConfigError("lora.target_modules", f"lora.target_modules must name modules (or [all-linear]), "
                          f"got {list(cfg.lora.target_modules)}")
    if cfg.model.name != "preset":
        return
    from federation.model import lora_shapes

    try:
        with _quiet():  # peft imports bitsandbytes, whose notices about optional kernels are not about this config
            lora_shapes(cfg.model, cfg.lora)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError("lora.target_modules", f"lora.target_modules {list(cfg.lora.target_modules)} do not "
                          f"fit model preset {cfg.model.preset_name!r}: {_first_line(exc)}") from None


# ------------------------------------------------------------------------------------------ site data


def check_jsonl_files(files: Sequence[str | Path], key: str) -> dict[str, int]:
    """Read every line of every file (federation.records' parser); examples per file, or ConfigError file:line."""
    from federation.records import DataFormatError, read_jsonl_records

    counts = {}
    for file in files:
        try:
            counts[str(file)] = len(read_jsonl_records(file))
        except DataFormatError as exc:
            raise ConfigError(key, f"{key}: {exc}") from None
        except OSError as exc:
            raise ConfigError(key, f"{key}: {file}: {exc.strerror}") from None
    return counts


def validate_simulation_data(cfg: RunConfig) -> None:
    """Every line of the data the simulation will read is valid, and every simulated site gets examples."""
    from federation.data import _load_pools, _partition_pools
    from federation.records import DataFormatError

    try:
        # What every simulated site loads (federation.data.load_site_split), read once here.
        train, held_out = _load_pools(cfg.data)
    except DataFormatError as exc:  # its message starts with the file's path
        in_eval = cfg.data.eval_path and str(exc).startswith(f"{cfg.data.eval_path}:")
        key = "data.eval_path" if in_eval else "data.source"
        raise ConfigError(key, f"{key}: {exc}") from None
    except OSError as exc:
        raise ConfigError("data.source", f"data.source: {exc.filename}: {exc.strerror}") from None
    except ValueError as exc:  # the demo task's own checks (skills, counts)
        raise ConfigError("data.demo", f"data.demo: {exc}") from None
    try:
        _partition_pools(train, held_out, cfg.federation.num_clients, cfg.data)
    except ValueError as exc:
        raise ConfigError("data.partitioner", f"data.partitioner={cfg.data.partitioner} over "
                          f"federation.num_clients={cfg.federation.num_clients} sites: {exc}") from None


# ------------------------------------------------------------------------ OmegaConf's and hydra's errors


def _field_types(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}


def _node_type(schema: type, key: str) -> Any:
    """The schema type at a dotted key (None past a dict-typed field or an unknown key)."""
    node: Any = schema
    for part in key.split("."):
        node = _field_types(node).get(part) if dataclasses.is_dataclass(node) else None
        if node is None:
            return None
    return node


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp) or tp
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
            dict: "a mapping"}.get(origin, getattr(origin, "__name__", str(origin)))


def _unknown_key(key: str, schema: type) -> ConfigError:
    parent, _, leaf = key.rpartition(".")
    parent_type = _node_type(schema, parent) if parent else schema
    if dataclasses.is_dataclass(parent_type):
        where = f" of {parent}" if parent else ""
        return ConfigError(key, f"unknown key {key}; valid keys{where}: {', '.join(_field_types(parent_type))}")
    return ConfigError(key, f"{key}: {parent} has no key {leaf!r} here; add one with +{key}=VALUE")


def _not_a_bool(key: str, value: Any) -> ConfigError:
    return ConfigError(key, f"{key} must be true or false, got {value!r}")


def check_bool_overrides(overrides: list[str], schema: type) -> None:
    """ConfigError for a `key=value` override of a true/false setting whose value is not true or false.

    OmegaConf would turn `train.offload_checkpoints=5` (or `=yes`, `=0`) into a bool before check_schema sees it:
    a typo would silently switch a setting on.
    """
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and _node_type(schema, key) is bool and value.strip().lower() not in ("true", "false"):
            raise _not_a_bool(key, value)


def check_schema(cfg: Any, schema: type) -> Any:
    """cfg (a DictConfig or plain dict) as an instance of the dataclass `schema`; unknown keys and wrong types are
    ConfigErrors (OmegaConf would drop a key added with hydra's '+')."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg

    def walk(node: Mapping, node_type: type, prefix: str) -> None:
        types = _field_types(node_type)
        for key, value in node.items():
            if key not in types:
                raise _unknown_key(prefix + str(key), schema)
            if types[key] is bool and not isinstance(value, bool):
                raise _not_a_bool(prefix + str(key), value)
            if dataclasses.is_dataclass(types[key]) and isinstance(value, Mapping):
                walk(value, types[key], f"{prefix}{key}.")

    if not isinstance(tree, Mapping):
        raise ConfigError("config", f"a config must be a mapping, got {type(tree).__name__}")
    walk(tree, schema, "")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    except OmegaConfBaseException as exc:
        raise config_error_from_omegaconf(exc, schema) from None


def config_error_from_omegaconf(exc: Exception, schema: type = RunConfig) -> ConfigError:
    """One ConfigError line from an OmegaConf error (wrong type, unknown key, missing value, bad interpolation)."""
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, ValidationError)

    key = str(getattr(exc, "full_key", "") or "config")
    message = _first_line(getattr(exc, "msg", "") or str(exc))
    if isinstance(exc, (ConfigAttributeError, ConfigKeyError)) and ("not in" in message or "not in struct" in message):
        return _unknown_key(key, schema)
    if isinstance(exc, MissingMandatoryValue):
        return ConfigError(key, f"{key} is required (no value given)")
    if isinstance(exc, ValidationError):
        expected = _node_type(schema, key)
        value = re.search(r"Value '(.*)' (?:of type|is not)", message)
        got = f"got {value.group(1)!r}" if value else message
        if expected is not None:
            return ConfigError(key, f"{key} must be {_describe(expected)}, {got}")
    return ConfigError(key, f"{key}: {message}")


def _unparsable_override(overrides: Sequence[str]) -> tuple[str, str] | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except Exception as exc:  # hydra's OverrideParseException and its lexer's errors
            return override, _first_line(str(exc).replace(f"Error parsing override '{override}'", ""))
    return None


def config_error_from_hydra(exc: Exception, overrides: Sequence[str], config_dir: str | Path = CONF_DIR
                            ) -> ConfigError:
    """One ConfigError line from whatever hydra's compose raised for `overrides`."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, ConfigError):
        return exc
    text = str(exc)
    bad = _unparsable_override(overrides)
    if bad is not None:
        override, reason = bad
        if "=" not in override:
            return ConfigError(override, f"override {override!r} is not key=value")
        return ConfigError(override.split("=", 1)[0].lstrip("+~"), f"override {override!r} cannot be parsed: {reason}")
    group = re.search(r"Could not (?:find|load) '([^'/]+)/([^']*)'", text)
    if group:
        name, option = group.groups()
        return ConfigError(name, f"{name} {option!r} unknown; valid: {', '.join(group_options(name, config_dir))}")
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return config_error_from_omegaconf(cause)
    if isinstance(exc, OmegaConfBaseException):
        return config_error_from_omegaconf(exc)
    exists = re.search(r"An item is already at '([^']+)'", text)
    if exists:
        key = exists.group(1)
        return ConfigError(key, f"{key} exists already: set it without '+' ({key}=VALUE)")
    if "Config group override must be" in text:
        return ConfigError("overrides", f"{_first_line(text)}: give a group option, e.g. strategy=fedavg")
    return ConfigError("overrides", _first_line(text))
