"""The site's Flower ClientApp (Message API): receive the global adapter, train locally, send back the LoRA delta.

The base model is loaded once per process and stays resident; every round only the LoRA tensors
are copied in (``set_adapter_arrays``). The run config travels from the coordinator inside the
message, so every site trains the model and adapter shape the coordinator chose; the only
site-local input is where the data is (``data-path`` in the node config, or the simulation's
partition id).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.fast_train import FastLocalTrainer, FastPathSettings
from client.site_state import server_round_of, site_state
from client.trainer import LocalTrainer
from federation.adapter import (adapter_delta, from_array_record, get_adapter_arrays, lora_parameters,
                                set_adapter_arrays)
from federation.compression import ErrorFeedback, UploadCodec
from federation.config import RunConfig
from federation.compose import run_config_from_json
from federation.data import SiteDataset, load_site_files, load_site_split
from federation.model import LoadInfo, build_lora_model
from federation.protocol import RUN_CONFIG_KEY  # noqa: F401 (re-exported)

log = logging.getLogger("fedtune.client")


def _log_in_deployment() -> None:
    """Show our INFO lines in a site daemon's output: Flower's ClientApp process sets up only the "flwr" logger."""
    level = os.environ.get("FEDTUNE_LOG_LEVEL")  # set by client/daemon.py (fedtune site)
    fedtune_log = logging.getLogger("fedtune")
    if level and not fedtune_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fedtune_log.addHandler(handler)
        fedtune_log.setLevel(level.upper())
        fedtune_log.propagate = False


_log_in_deployment()

# Site state that rounds advance (client/site_state.py, per federation run and round): the site's DP-SGD
# accountant history ...
DP_STATE_KEY = "fedtune.dp-sgd"
# ... and the upload codec's error-feedback residual (what lossy compression dropped so far).
ERROR_FEEDBACK_KEY = "fedtune.error-feedback"


@dataclass
class SiteRuntime:
    """Everything a site keeps between rounds: the resident model and its datasets."""

    model_key: str
    model: object
    tokenizer: object
    info: LoadInfo
    datasets: dict[str, tuple[SiteDataset, SiteDataset]] = field(default_factory=dict)


_RUNTIME: SiteRuntime | None = None


def _model_key(cfg: RunConfig) -> str:
    blob = json.dumps({"model": asdict(cfg.model), "lora": asdict(cfg.lora)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def get_runtime(cfg: RunConfig) -> SiteRuntime:
    """The process-wide runtime; the base model is (re)loaded only if model/LoRA config changed."""
    global _RUNTIME
    key = _model_key(cfg)
    if _RUNTIME is None or _RUNTIME.model_key != key:
        model, tokenizer, info = build_lora_model(cfg.model, cfg.lora)
        _RUNTIME = SiteRuntime(key, model, tokenizer, info)
        # One line per load: the deployment tests count them (one per site daemon).
        log.info("base model loaded (%s, pid %d)", cfg.model.name, os.getpid())
    return _RUNTIME


def site_datasets(runtime: SiteRuntime, cfg: RunConfig, context: Context) -> tuple[SiteDataset, SiteDataset]:
    """(train, eval) for this node: node config `data-path` in deployment, partition id in simulation."""
    node = context.node_config
    if "data-path" in node:
        key = f"path:{node['data-path']}"
        if key not in runtime.datasets:
            runtime.datasets[key] = load_site_files(str(node["data-path"]), cfg.data, runtime.tokenizer)
    else:
        pid, n = int(node["partition-id"]), int(node["num-partitions"])
        key = f"partition:{pid}/{n}:{hashlib.sha256(json.dumps(asdict(cfg.data), sort_keys=True).encode()).hexdigest()}"
        if key not in runtime.datasets:
            runtime.datasets[key] = load_site_split(cfg.data, runtime.tokenizer, pid, n)
    return runtime.datasets[key]


def make_trainer(runtime: SiteRuntime, cfg: RunConfig) -> LocalTrainer:
    """The fast path (packing + chunked loss) when asked for; DP-SGD needs one example per row, so plain."""
    if cfg.train.fast_path and not cfg.privacy.local_dp_sgd.enabled:
        return FastLocalTrainer(runtime.model, runtime.tokenizer.pad_token_id, cfg.train,
                                FastPathSettings(checkpoint_every=cfg.train.checkpoint_every))
    return LocalTrainer(runtime.model, runtime.tokenizer.pad_token_id, cfg.train)


def _site_label(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))


def configure_trainable(model, cfg: RunConfig) -> None:
    """LoRA params train, except lora_A under FFA-LoRA; checkpointing off for DP-SGD (Opacus needs per-example grads)."""
    for key, param in lora_parameters(model).items():
        param.requires_grad_(not (cfg.strategy.freeze_lora_a and ".lora_A." in key))
    base = model.get_base_model()
    if cfg.privacy.local_dp_sgd.enabled and getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()


_PARSED_RUN_CONFIGS: dict[str, RunConfig] = {}


def parse_run_config(text: str) -> RunConfig:
    """run_config_from_json, cached by text: its schema validation costs 20-60 ms and every message of a run repeats it."""
    if text not in _PARSED_RUN_CONFIGS:
        if len(_PARSED_RUN_CONFIGS) >= 8:  # a process serves one run at a time; keep the cache tiny
            _PARSED_RUN_CONFIGS.clear()
        _PARSED_RUN_CONFIGS[text] = run_config_from_json(text)
    return copy.deepcopy(_PARSED_RUN_CONFIGS[text])  # callers may adjust their copy


def _prepare(msg: Message, context: Context):
    cfg = parse_run_config(str(msg.content["config"][RUN_CONFIG_KEY]))
    runtime = get_runtime(cfg)
    configure_trainable(runtime.model, cfg)
    global_arrays = from_array_record(msg.content["arrays"])
    set_adapter_arrays(runtime.model, global_arrays)
    train_ds, eval_ds = site_datasets(runtime, cfg, context)
    return cfg, runtime, global_arrays, train_ds, eval_ds


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on local data from the global adapter; reply with the LoRA delta and metrics."""
    return train_reply(msg, context)


def site_seed(cfg: RunConfig, server_round: int, context: Context) -> int:
    """The seed of a site's data order in a round: a function of (seed, round, site) only, so reruns reproduce it."""
    return cfg.train.seed * 1_000_003 + server_round * 1009 + _site_label(context)


def train_reply(msg: Message, context: Context, before_step=None) -> Message:
    """The train handler; `before_step(params)` runs before every optimizer step (e.g. SCAFFOLD's correction)."""
    cfg, runtime, global_arrays, train_ds, _ = _prepare(msg, context)
    server_round = int(msg.content["config"].get("server-round", 0))
    trainer = make_trainer(runtime, cfg)
    seed = site_seed(cfg, server_round, context)
    extra_metrics = {}
    if cfg.privacy.local_dp_sgd.enabled:
        result, extra_metrics["dp-sgd-epsilon"] = _train_dp_sgd(trainer, train_ds, cfg, msg, context)
    else:
        result = trainer.train(train_ds, seed=seed, proximal_mu=cfg.strategy.proximal_mu, before_step=before_step)
    delta = adapter_delta(get_adapter_arrays(runtime.model), global_arrays)
    return build_train_reply(msg, context, cfg, result, delta, extra_metrics)


def build_train_reply(msg: Message, context: Context, cfg: RunConfig, result, delta: dict,
                      extra_metrics: dict | None = None) -> Message:
    """The reply to a train message: the encoded delta and the round's metrics (logged on the site)."""
    server_round = int(msg.content["config"].get("server-round", 0))
    record = encode_delta(delta, cfg, msg, context)
    log.info("round %d: trained on %d examples (%d steps, %d tokens, loss %.4f, %.0f tok/s); uploading %d bytes",
             server_round, result.num_examples, result.steps, result.input_tokens, result.train_loss,
             result.tokens_per_second, record.count_bytes())
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        "train-loss": result.train_loss,
        "train-tokens": result.target_tokens,
        "input-tokens": result.input_tokens,
        "train-steps": result.steps,
        "train-seconds": result.seconds,
        "tokens-per-second": result.tokens_per_second,
        "peak-memory-bytes": result.peak_memory_bytes,
        "partition-id": _site_label(context),
        **(extra_metrics or {}),
    })
    return Message(content=RecordDict({"arrays": record, "metrics": metrics}), reply_to=msg)


def encode_delta(delta: dict, cfg: RunConfig, msg: Message, context: Context) -> ArrayRecord:
    """The delta as federation.upload_codec encodes it; the error-feedback residual is round state of the site."""
    codec = UploadCodec(cfg.federation.upload_codec, **dict(cfg.federation.upload_codec_params))
    if codec.lossless or not cfg.federation.upload_error_feedback:
        encoded = codec.encode(delta)
    else:
        site, server_round = site_state(msg, context, cfg.output_dir), server_round_of(msg)
        feedback = ErrorFeedback()
        stored = site.load_arrays(ERROR_FEEDBACK_KEY, server_round)
        if stored is not None:
            feedback.load_state_dict(stored)
        encoded = feedback.encode(delta, codec)
        site.save_arrays(ERROR_FEEDBACK_KEY, server_round + 1, feedback.state_dict())
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in encoded.items()})


def _train_dp_sgd(trainer: LocalTrainer, train_ds: SiteDataset, cfg: RunConfig, msg: Message, context: Context):
    """DP-SGD round whose accountant history is round state of the site, so epsilon accumulates across rounds.

    No seed: the site's sampling and noise come from OS entropy, so the coordinator cannot replay them.
    """
    site, server_round = site_state(msg, context, cfg.output_dir), server_round_of(msg)
    previous = site.load_json(DP_STATE_KEY, server_round)
    result, state, epsilon = trainer.train_dp_sgd(train_ds, cfg.privacy.local_dp_sgd, cfg.federation.rounds, previous)
    site.save_json(DP_STATE_KEY, server_round + 1, state)
    log.info("DP-SGD: epsilon %.4f at delta %.1e after this round", epsilon, cfg.privacy.local_dp_sgd.delta)
    return result, float(epsilon)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this site's held-out data."""
    cfg, runtime, _, _, eval_ds = _prepare(msg, context)
    result = make_trainer(runtime, cfg).evaluate(eval_ds)
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        "eval-loss": result.loss,
        "eval-tokens": result.num_tokens,
        "partition-id": _site_label(context),
    })
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
