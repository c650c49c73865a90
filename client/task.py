"""What a site does with a message, without Flower's routing: the shared pieces every ClientApp handler uses.

client/app.py registers the handlers (one ClientApp); the method-specific ones (client/scaffold.py,
client/fedsa.py, client/flora.py, client/fedex.py, client/secagg.py) build on the functions here:
receive the global adapter, train locally, and reply with the LoRA delta (``train_reply``), or hand
the raw float delta to SecAgg+ (``train_update``); evaluate (``evaluate_reply``); this site's rank and
local steps (``site_settings``, ``for_this_site``).

The base model is loaded once per process and stays resident; every round only the LoRA tensors
are copied in (``set_adapter_arrays``). The run config travels from the coordinator inside the
message, so every site trains the model and adapter shape the coordinator chose; the only
site-local input is where the data is (``data-path`` in the node config, or the simulation's
partition id).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.fast_train import FastLocalTrainer, FastPathSettings
from client.privacy_ledger import SitePrivacyLedger
from client.site_policy import SiteRefusal, policy_of
from client.site_settings import SiteSettings, site_settings, site_settings_of  # noqa: F401  (re-exported)
from client.site_state import server_round_of, site_state
from client.trainer import LocalTrainer
from federation.adapter import from_array_record, lora_parameters, set_adapter_arrays, trained_delta
from federation.compression import ErrorFeedback, UploadCodec
from federation.config import RunConfig, fast_path_on
from federation.compose import run_config_from_json
from federation.packing import pack_arrays
from federation.data import EVAL_FILE, TRAIN_FILE, SiteDataset, load_site_files, load_site_split
from federation.model import LoadInfo, build_lora_model, resolve_device, wants_qlora
from federation.protocol import DATA_FINGERPRINT_RECORD, FEDERATION_RUN_ID_KEY, RUN_CONFIG_KEY
from strategies.aggregators import MixedRanksError

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


# The attribute of the "outside the training loop" log record that holds its figures as numbers, {phase: seconds}
# (simulations/bench/site_overhead.py reads them).
PHASE_SECONDS_FIELD = "phase_seconds"

# Tokenized (train, eval) datasets a process keeps, least recently used dropped first. A deployed site has one; a
# simulation process serves many virtual clients (1,000 in a federation, 100 a round), whose datasets would otherwise
# stay in RAM for every client ever sampled. A dropped one is tokenized again from the shared partitioned pool
# (federation/data.py partitioned_pools) when its client is next sampled: the same examples, the same fingerprint.
SITE_DATASETS_KEPT = 256


@dataclass
class SiteData:
    """One site's tokenized (train, eval) datasets and, once computed, its data fingerprint."""

    train: SiteDataset
    eval: SiteDataset
    fingerprint: dict | None = None


@dataclass
class SiteRuntime:
    """Everything a site keeps between rounds: the resident model and its (recently used) datasets."""

    model_key: str
    model: object
    tokenizer: object
    info: LoadInfo
    # The model's LoRA parameters by saved key (federation.adapter.lora_parameters walks every module to find
    # them; they are fixed once the model is built).
    lora_params: dict
    datasets: OrderedDict[str, SiteData] = field(default_factory=OrderedDict)  # least recently used first
    # The newest trainer and its key (make_trainer): later messages with the same train settings reuse it, and
    # with it its setup (the fast path's model preparation walks the whole model and hooks its embeddings).
    trainer: tuple[str, LocalTrainer] | None = None


_RUNTIME: SiteRuntime | None = None


def _model_key(cfg: RunConfig) -> str:
    blob = json.dumps({"model": asdict(cfg.model), "lora": asdict(cfg.lora)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def get_runtime(cfg: RunConfig) -> SiteRuntime:
    """The process-wide runtime; the base model is (re)loaded only if model/LoRA config changed."""
    global _RUNTIME
    key = _model_key(cfg)
    if _RUNTIME is None or _RUNTIME.model_key != key:
        # A model this process cannot load at all (4-bit without CUDA) is refused before the resident one is
        # dropped: a run with an impossible config must not cost the next honest run a reload.
        wants_qlora(cfg.model, resolve_device(cfg.model))
        _RUNTIME = None  # the replaced model is freed before the next one loads ...
        gc.unfreeze()  # ... and whatever of it freeze_resident_objects froze can be collected again
        model, tokenizer, info = build_lora_model(cfg.model, cfg.lora)
        _RUNTIME = SiteRuntime(key, model, tokenizer, info, lora_parameters(model))
        # One line per load: the deployment tests count them (one per site daemon).
        log.info("base model loaded (%s, pid %d)", cfg.model.name, os.getpid())
    return _RUNTIME


_FROZEN_RUNTIME: weakref.ref | None = None  # the runtime whose objects freeze_resident_objects froze last


def freeze_resident_objects() -> None:
    """Once per base model load, after a reply has left: leave the objects alive now (the resident model, the
    libraries) out of later garbage collections.

    A full collection walks every object the collector tracks: with llama-1b resident, ~570k objects and 0.2-0.4 s
    on a 2-core CPU, at a random point of a round (1 round in 10 measured). Frozen, collections walk only what came
    later. Collected first (~0.2 s, hence after the reply), so no garbage is frozen; get_runtime unfreezes when it
    replaces the model. The resident worker (client/worker.py) calls this; a simulation process, whose model may be
    reloaded every message (sites of other ranks), does not.
    """
    global _FROZEN_RUNTIME
    if _RUNTIME is None or (_FROZEN_RUNTIME is not None and _FROZEN_RUNTIME() is _RUNTIME):
        return
    gc.collect()
    gc.freeze()
    _FROZEN_RUNTIME = weakref.ref(_RUNTIME)


def _dataset_key(cfg: RunConfig, context: Context) -> str:
    node = context.node_config
    if "data-path" in node:
        return f"path:{node['data-path']}"
    pid, n = int(node["partition-id"]), int(node["num-partitions"])
    return f"partition:{pid}/{n}:{hashlib.sha256(json.dumps(asdict(cfg.data), sort_keys=True).encode()).hexdigest()}"


def _site_data(runtime: SiteRuntime, cfg: RunConfig, context: Context) -> SiteData:
    """This node's SiteData from the runtime's LRU (at most SITE_DATASETS_KEPT), loaded and tokenized if absent."""
    node = context.node_config
    key = _dataset_key(cfg, context)
    entry = runtime.datasets.get(key)
    if entry is None:
        if "data-path" in node:
            train_ds, eval_ds = load_site_files(str(node["data-path"]), cfg.data, runtime.tokenizer)
        else:
            train_ds, eval_ds = load_site_split(cfg.data, runtime.tokenizer, int(node["partition-id"]),
                                                int(node["num-partitions"]))
        entry = runtime.datasets[key] = SiteData(train_ds, eval_ds)
        while len(runtime.datasets) > max(1, SITE_DATASETS_KEPT):
            runtime.datasets.popitem(last=False)
    else:
        runtime.datasets.move_to_end(key)
    return entry


def site_datasets(runtime: SiteRuntime, cfg: RunConfig, context: Context) -> tuple[SiteDataset, SiteDataset]:
    """(train, eval) for this node: node config `data-path` in deployment, partition id in simulation."""
    entry = _site_data(runtime, cfg, context)
    return entry.train, entry.eval


def data_fingerprint(runtime: SiteRuntime, cfg: RunConfig, context: Context) -> dict[str, str | int]:
    """{"sha256", "examples"} of this site's training data, computed once per dataset.

    Deployment: sha256 over the data files' bytes (train.jsonl [+ eval.jsonl], or the one file, names included);
    simulation (no file per site): over the site's tokenized training examples. `examples` counts training examples.
    """
    entry = _site_data(runtime, cfg, context)
    if entry.fingerprint is None:
        digest = hashlib.sha256()
        if "data-path" in context.node_config:
            path = Path(str(context.node_config["data-path"])).expanduser()
            files = sorted(p for p in path.glob("*.jsonl") if p.name in (TRAIN_FILE, EVAL_FILE)) if path.is_dir() \
                else [path]
            for file in files:
                digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
        else:
            for example in entry.train.examples:
                digest.update(example["input_ids"].numpy().tobytes() + example["labels"].numpy().tobytes())
        entry.fingerprint = {"sha256": digest.hexdigest(), "examples": len(entry.train)}
    return entry.fingerprint


def make_trainer(runtime: SiteRuntime, cfg: RunConfig, label: str = "site") -> LocalTrainer:
    """The fast path (packing + chunked loss) when train.fast_path selects it; DP-SGD needs one example per row.

    The runtime's newest trainer when its train settings are the same (a trainer keeps no state between rounds).
    `label` names the trainer's progress bars ("site 2")."""
    device_type = next(runtime.model.parameters()).device.type
    fast = fast_path_on(cfg.train, device_type) and not cfg.privacy.local_dp_sgd.enabled
    key = json.dumps({"fast": fast, "train": asdict(cfg.train)}, sort_keys=True)
    if runtime.trainer is None or runtime.trainer[0] != key:
        if fast:
            trainer = FastLocalTrainer(runtime.model, runtime.tokenizer.pad_token_id, cfg.train,
                                       FastPathSettings(checkpoint_every=cfg.train.checkpoint_every,
                                                        kernels=str(cfg.train.kernels).lower(),
                                                        attention=str(cfg.train.attention).lower(),
                                                        offload_checkpoints=bool(cfg.train.offload_checkpoints),
                                                        cudnn_attention=str(cfg.train.cudnn_attention).lower()))
        else:
            trainer = LocalTrainer(runtime.model, runtime.tokenizer.pad_token_id, cfg.train)
        runtime.trainer = (key, trainer)
    trainer = runtime.trainer[1]
    trainer.label = label
    return trainer


def progress_label(context: Context) -> str:
    """'site <partition id>' in a simulation, 'site' at a deployed site (its log is its own)."""
    partition = _site_label(context)
    return "site" if partition < 0 else f"site {partition}"


def _site_label(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))


def configure_trainable(model, cfg: RunConfig, params: dict | None = None) -> None:
    """LoRA params train, except lora_A under FFA-LoRA; checkpointing off for DP-SGD (Opacus needs per-example grads).

    params: lora_parameters(model), where the caller keeps it.
    """
    for key, param in (lora_parameters(model) if params is None else params).items():
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
    configure_trainable(runtime.model, cfg, runtime.lora_params)
    if cfg.privacy.local_dp_sgd.enabled:
        runtime.trainer = None  # checkpointing may be off now: a fast-path trainer must set it up again
    # The global adapter as float32 tensors on the model's device: the delta is taken there after training.
    global_tensors = set_adapter_arrays(runtime.model, from_array_record(msg.content["arrays"]), runtime.lora_params)
    train_ds, eval_ds = site_datasets(runtime, cfg, context)
    return cfg, runtime, global_tensors, train_ds, eval_ds


def site_seed(cfg: RunConfig, server_round: int, context: Context) -> int:
    """The seed of a site's data order in a round: a function of (seed, round, site) only, so reruns reproduce it."""
    return cfg.train.seed * 1_000_003 + server_round * 1009 + _site_label(context)


@dataclass
class LocalUpdate:
    """One round of local training: the run config it ran under, the trainer's result, the raw float delta."""

    cfg: RunConfig
    result: object  # client.trainer.TrainResult
    # float32 tensors on the model's device (federation.adapter.trained_delta): the upload codec decides what of
    # them is copied to the host (federation.adapter.host_arrays copies all).
    delta: dict[str, torch.Tensor]
    extra_metrics: dict = field(default_factory=dict)
    # Seconds of the handler's steps outside the training loop ("prepare", "train-setup", "delta"): logged with the
    # reply, so an operator sees where a round's site time goes besides training.
    seconds: dict = field(default_factory=dict)


def train_reply(msg: Message, context: Context, before_step=None) -> Message:
    """The train reply: the encoded delta and metrics; `before_step(params)` runs before every optimizer step."""
    update = train_update(msg, context, before_step)
    return build_train_reply(msg, context, update.cfg, update.result, update.delta, update.extra_metrics,
                             update.seconds)


def train_update(msg: Message, context: Context, before_step=None) -> LocalUpdate:
    """Train on local data from the global adapter; the raw float delta (SecAgg+ masks it without any codec)."""
    started = time.perf_counter()
    cfg, runtime, global_tensors, train_ds, _ = _prepare(msg, context)
    prepared = time.perf_counter()
    server_round = int(msg.content["config"].get("server-round", 0))
    trainer = make_trainer(runtime, cfg, progress_label(context))
    seed = site_seed(cfg, server_round, context)
    extra_metrics = {}
    if cfg.privacy.local_dp_sgd.enabled:
        result, extra_metrics["dp-sgd-epsilon"] = _train_dp_sgd(trainer, train_ds, cfg, msg, context)
    else:
        result = trainer.train(train_ds, seed=seed, proximal_mu=cfg.strategy.proximal_mu, before_step=before_step)
    trained = time.perf_counter()
    delta = trained_delta(runtime.lora_params, global_tensors)
    seconds = {"prepare": prepared - started, "train-setup": trained - prepared - result.seconds,
               "delta": time.perf_counter() - trained}
    return LocalUpdate(cfg, result, delta, extra_metrics, seconds)


def build_train_reply(msg: Message, context: Context, cfg: RunConfig, result, delta: dict,
                      extra_metrics: dict | None = None, seconds: dict | None = None) -> Message:
    """The reply to a train message: the encoded delta and the round's metrics (logged on the site).

    delta: float32 numpy arrays, or torch tensors on the model's device (LocalUpdate.delta).
    """
    server_round = int(msg.content["config"].get("server-round", 0))
    started = time.perf_counter()
    record = encode_delta(delta, cfg, msg, context)
    seconds = {**(seconds or {}), "encode+state": time.perf_counter() - started}
    log.info("round %d: trained on %d examples (%d steps, %d tokens, loss %.4f, %.0f tok/s); uploading %d bytes",
             server_round, result.num_examples, result.steps, result.input_tokens, result.train_loss,
             result.tokens_per_second, record.count_bytes())
    log.info("round %d: outside the %.2f s training loop: %s", server_round, result.seconds,
             ", ".join(f"{name} {value:.3f} s" for name, value in seconds.items()),
             extra={PHASE_SECONDS_FIELD: {**seconds, "training-loop": result.seconds}})
    metrics = train_metrics(context, result, extra_metrics)
    fingerprint = ConfigRecord(data_fingerprint(get_runtime(cfg), cfg, context))
    return Message(content=RecordDict({"arrays": record, "metrics": metrics, DATA_FINGERPRINT_RECORD: fingerprint}),
                   reply_to=msg)


def train_metrics(context: Context, result, extra_metrics: dict | None = None) -> MetricRecord:
    """The metrics of a train reply (federation/protocol.py names them)."""
    return MetricRecord({
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


def encode_delta(delta: dict, cfg: RunConfig, msg: Message, context: Context) -> ArrayRecord:
    """The delta as federation.upload_codec encodes it; the error-feedback residual is round state of the site.

    delta: float32 numpy arrays, or torch tensors (on a GPU, bf16 is encoded there: federation.compression.on_device).
    """
    codec = UploadCodec(cfg.federation.upload_codec, **dict(cfg.federation.upload_codec_params))
    if codec.lossless or not cfg.federation.upload_error_feedback:
        return pack_arrays(codec.encode(delta))
    site, server_round = site_state(msg, context, cfg.output_dir), server_round_of(msg)
    # load_arrays gives arrays of our own, and the feedback is dropped after this round: neither is copied again.
    # On a GPU (bf16) the residual stays there from round to round (federation.compression.DeviceArrays).
    feedback = ErrorFeedback(site.load_arrays(ERROR_FEEDBACK_KEY, server_round))
    record = pack_arrays(feedback.encode(delta, codec))
    # Written in the background, last (the write, and a device residual's copy to the host, compete for the
    # interpreter with whatever runs meanwhile): the next round reads the residual from memory; a crash before the
    # file lands loses one round's residual (the round before's is used then), which costs accuracy, not correctness.
    site.save_arrays(ERROR_FEEDBACK_KEY, server_round + 1, feedback.residual, background=True)
    return record


def _train_dp_sgd(trainer: LocalTrainer, train_ds: SiteDataset, cfg: RunConfig, msg: Message, context: Context):
    """DP-SGD round whose accountant history is round state of the site, so epsilon accumulates across rounds.

    No seed: the site's sampling and noise come from OS entropy, so the coordinator cannot replay them.
    """
    site, server_round = site_state(msg, context, cfg.output_dir), server_round_of(msg)
    previous = site.load_json(DP_STATE_KEY, server_round)
    result, state, epsilon = trainer.train_dp_sgd(train_ds, cfg.privacy.local_dp_sgd, cfg.federation.rounds, previous,
                                                  before_training=_privacy_ledger_charge(msg, context))
    site.save_json(DP_STATE_KEY, server_round + 1, state)
    log.info("DP-SGD: epsilon %.4f at delta %.1e after this round", epsilon, cfg.privacy.local_dp_sgd.delta)
    return result, float(epsilon)


def _privacy_ledger_charge(msg: Message, context: Context):
    """The site's lifetime-budget charge for a DP-SGD round (client/privacy_ledger.py), or None without a budget."""
    policy = policy_of(context)
    if policy is None or policy.privacy_budget is None:
        return None
    if not policy.privacy_ledger:
        raise SiteRefusal("this site has a privacy budget but no ledger file (its daemon sets one from state_dir)")
    ledger = SitePrivacyLedger(policy.privacy_ledger, policy.privacy_budget)
    run = msg.content["config"].get(FEDERATION_RUN_ID_KEY, msg.metadata.run_id)

    def charge(noise_multiplier: float, sample_rate: float, steps: int) -> None:
        ledger.charge(noise_multiplier, sample_rate, steps, run=str(run), server_round=server_round_of(msg))

    return charge


def evaluate_reply(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this site's held-out data: loss, perplexity, and in generation
    rounds (eval.every_n_rounds) exact match / token F1 / ROUGE-L of greedy answers; only aggregates leave."""
    from federation.evaluation import evaluate_generation, generation_due
    from federation.text_metrics import perplexity

    cfg, runtime, _, _, eval_ds = _prepare(msg, context)
    result = make_trainer(runtime, cfg, progress_label(context)).evaluate(eval_ds)
    metrics = {
        "num-examples": result.num_examples,
        "eval-loss": result.loss,
        "eval-perplexity": perplexity(result.loss),
        "eval-tokens": result.num_tokens,
        "partition-id": _site_label(context),
    }
    server_round = server_round_of(msg)
    if generation_due(cfg.eval, server_round, cfg.federation.rounds):
        generation = evaluate_generation(runtime.model, runtime.tokenizer, eval_ds, cfg.eval,
                                         label=progress_label(context))
        if generation.scores.count:
            means = generation.scores.means()
            metrics.update({"eval-generated": generation.scores.count, "eval-exact-match": means["exact_match"],
                            "eval-token-f1": means["token_f1"], "eval-rouge-l": means["rouge_l"],
                            "eval-generated-tokens": generation.generated_tokens,
                            "eval-generation-seconds": generation.seconds})
            log.info("round %d: generated %d answers (%d tokens, %.0f tok/s): exact match %.3f, token F1 %.3f, "
                     "ROUGE-L %.3f", server_round, generation.scores.count, generation.generated_tokens,
                     generation.tokens_per_second, means["exact_match"], means["token_f1"], means["rouge_l"])
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def site_run_config(run_config: Mapping, settings: SiteSettings, own_rank: bool) -> dict:
    """The run config (as the JSON dict on the wire) with this site's local steps and (own_rank) its LoRA rank.

    With its own rank (FLoRA/FlexLoRA) the site's LoRA is re-initialised or replaced every round, so an
    upload codec's error-feedback residual (in the coordinates of last round's factors) would add noise
    to the next delta: the codec still compresses each upload, without feedback.
    """
    site = copy.deepcopy(dict(run_config))
    site["train"]["local_steps"] = settings.local_steps
    if own_rank:
        site["lora"]["r"] = settings.rank
        site["federation"]["upload_error_feedback"] = False
    return site


def for_this_site(msg: Message, context: Context, *, own_rank: bool = False, site_steps: bool = True) -> Message:
    """`msg` with this site's run config: its local steps (site_steps) and, own_rank (FLoRA/FlexLoRA), its LoRA rank.

    A site configured for another rank than the run's is refused unless the strategy trains own ranks.
    """
    # Plain JSON, not run_config_from_json: the schema validation (~70 ms) runs once, in the handler.
    run_config = json.loads(str(msg.content["config"][RUN_CONFIG_KEY]))
    name, run_rank = run_config["strategy"]["name"], int(run_config["lora"]["r"])
    settings = site_settings_of(run_config, context.node_config)
    if not own_rank and settings.rank != run_rank:
        raise MixedRanksError(f"this site is configured for LoRA rank {settings.rank}, but strategy {name!r} "
                              f"trains rank {run_rank} at every site; use strategy=flora or strategy=flexlora")
    if not (own_rank or site_steps):
        return msg  # plain strategies run exactly as configured
    site_config = site_run_config(run_config, settings, own_rank=own_rank)
    return with_run_config(msg, json.dumps(site_config, sort_keys=True))


def message_with(msg: Message, **records) -> Message:
    """A copy of `msg` (same metadata, so replies still answer it) with `records` replaced or added."""
    content = RecordDict(dict(msg.content.items()))
    for key, record in records.items():
        content[key] = record
    return Message(metadata=copy.copy(msg.metadata), content=content)


def with_run_config(msg: Message, run_config_json: str) -> Message:
    """A copy of `msg` whose config record carries another run config (site-specific rank / local steps)."""
    return message_with(msg, config=ConfigRecord({**dict(msg.content["config"]), RUN_CONFIG_KEY: run_config_json}))
