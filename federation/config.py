"""The one structured config schema. Hydra YAML in conf/ fills it; code reads only these fields."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any



@dataclass
class TinyModelConfig:
    """Shape of a random-init Llama-style model built locally (no download)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # 0 means: the locally built tokenizer's vocabulary size.
    vocab_size: int = 0
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    # Larger than HF's 0.02: with a frozen random lm_head and hidden 64, 0.02 caps logits near +-1 and
    # no adapter could make a confident prediction.
    initializer_range: float = 0.1
    dtype: str = "float32"


@dataclass
class ModelConfig:
    """Which base model, and how to load it."""

    # A hub id / local directory, or "preset" to build the `preset` shape from a seed.
    name: str = "preset"
    preset: TinyModelConfig = field(default_factory=TinyModelConfig)
    preset_name: str = "tiny"
    seed: int = 0
    # auto: QLoRA 4-bit on CUDA when bitsandbytes works, fp32 LoRA otherwise; "4bit" | "none" force it.
    quantization: str = "auto"
    compute_dtype: str = "bfloat16"
    gradient_checkpointing: bool = True
    # Where built presets are cached as real HF directories (then loaded with from_pretrained).
    cache_dir: str = "~/.cache/fedtune/models"
    device: str = "auto"


@dataclass
class LoraSettings:
    """LoRA adapter hyperparameters (maps onto peft.LoraConfig)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    init_seed: int = 0


@dataclass
class DemoTaskConfig:
    """The built-in offline task: each source is a different skill."""

    # One source per skill (federation/demo_task.py SKILLS); also: reverse, uppercase, add, vowels.
    skills: list[str] = field(default_factory=lambda: ["length", "parity", "sign", "compare"])
    examples_per_skill: int = 96
    eval_examples_per_skill: int = 32
    seed: int = 0


@dataclass
class ColumnMapConfig:
    """Which dataset column fills each record field (data.loader=hf); data.format picks the fields a record needs."""

    # alpaca records: instruction + output, and input when that column exists (else empty).
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    # chat records: a list of {role, content} whose last message is the assistant's answer.
    messages: str = "messages"
    # plain records: the whole text is the target (no prompt).
    text: str = "text"


@dataclass
class DataConfig:
    """Where a site's examples come from and how they become tokens."""

    # How data.source is read: "jsonl" ("demo" or a JSONL file) | "hf" (Hugging Face datasets: a directory of
    # parquet/arrow/json(l)/csv files, one such file, a save_to_disk directory, or a hub id).
    loader: str = "jsonl"
    # "demo" (generated offline), a JSONL path, or (loader=hf) a path or hub id. Deployment: node config `data-path`.
    source: str = "demo"
    # A separate eval pool, read like source (empty: hold out eval_fraction of source, stratified by partition_by).
    eval_path: str = ""
    demo: DemoTaskConfig = field(default_factory=DemoTaskConfig)
    # loader=hf with a hub id (or a save_to_disk DatasetDict): the split to train on, the split to evaluate on
    # (empty: hold out eval_fraction), and the dataset's config name (empty: its default).
    split: str = "train"
    eval_split: str = ""
    subset: str = ""
    # loader=hf: record format (auto: chat if the messages column exists, else alpaca if the instruction and
    # output columns do, else plain text) and the columns that fill each field.
    format: str = "auto"
    columns: ColumnMapConfig = field(default_factory=ColumnMapConfig)
    # loader=hf: where `datasets` keeps its Arrow cache (empty: its default, ~/.cache/huggingface/datasets).
    cache_dir: str = ""
    # "chat_template" uses the tokenizer's template; otherwise a str.format template with {instruction} {input}.
    prompt_template: str = "chat_template"
    max_seq_len: int = 96
    # Simulation: how the pool is split over sites (federation.data.PARTITIONERS; all but "source" are flwr-datasets
    # partitioners): source | iid | dirichlet | pathological | natural_id | linear | square | exponential.
    partitioner: str = "source"
    # The record field / dataset column the label-based partitioners (source, dirichlet, pathological, natural_id)
    # group by; the held-out eval split is stratified by it too.
    partition_by: str = "source"
    # dirichlet: concentration (small: each site holds few labels; large: near IID).
    alpha: float = 0.5
    # dirichlet: redraw until every site has at least this many examples (flwr-datasets tries 10 times).
    min_partition_size: int = 1
    # pathological: labels per site, and how they are assigned: first-deterministic (site k gets label k mod L,
    # the rest at random) | deterministic (labels k .. k+n-1) | random.
    classes_per_site: int = 1
    class_assignment: str = "first-deterministic"
    eval_fraction: float = 0.2
    seed: int = 0


@dataclass
class TrainConfig:
    """Local training at a site, per round."""

    local_steps: int = 8
    # When > 0, train this many epochs instead of local_steps.
    local_epochs: float = 0.0
    # Peak AdamW learning rate. conf/train/default.yaml's 5e-3 suits the tiny demo model (its adapter starts
    # from nothing on a random base); the real-model presets (conf/model/llama-1b-random.yaml, hub.yaml) set
    # QLoRA's usual 2e-4, since 5e-3 diverged on llama-1b (eval loss 7.3 -> 17.8 in a second round, issue 14).
    lr: float = 3e-3
    batch_size: int = 8
    grad_accum: int = 1
    # Share of a round's steps spent warming the learning rate up linearly from 0 (each round starts afresh).
    warmup_ratio: float = 0.1
    # After the warm-up: cosine (to 0 at the round's last step) | linear (to 0) | constant (transformers' schedulers).
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 16
    seed: int = 0
    # Packed sequences + chunked cross-entropy + bf16 frozen weights (client/fast_train.py); same losses.
    # auto: on where the model runs on CUDA (2-8x the plain path's tokens/s there, BENCHMARKS.md), off on a CPU
    # (short demo rows are CPU-bound and gain nothing); true / false force it. DP-SGD always trains unpacked.
    fast_path: str = "auto"
    # Fast path: gradient-checkpoint every k-th decoder layer (1: least memory, 2: usually faster, 0: none).
    checkpoint_every: int = 1
    # Fast path: kernel set (client/kernels.py). none: HF modules + our pure-torch chunked cross-entropy;
    # liger: Liger-Kernel's Triton RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (needs CUDA, the
    # liger-kernel package: the gpu extra, and a model type Liger supports); auto: liger where liger-kernel is
    # installed and supports the model, on CUDA; else none (the site log says which and why). Same losses up to
    # bf16 rounding.
    kernels: str = "auto"
    # Fast path: attention over packed rows. sdpa: a block-diagonal mask (keeps SDPA off flash attention and
    # repeats K/V); varlen: torch's flash varlen_attn over the packed examples' boundaries, no mask (CUDA,
    # torch.nn.attention.varlen; plain causal attention: no sliding window, logit soft-capping or attention
    # dropout); auto: varlen where it can run the model, on CUDA; else sdpa (the site log says which and why).
    attention: str = "auto"
    # Fast path, checkpointed layers: their inputs wait in pinned host memory until backward instead of on the GPU
    # (client/offload_checkpoint.py; ~1.7 GB less at llama-8b with 8k tokens a step, copies overlap compute);
    # no effect without checkpointing or on a CPU.
    offload_checkpoints: bool = True
    # Fast path: rows that are each one whole sequence (full rows) try cuDNN's attention first (CUDA). auto: where
    # the model's head dim is >= 128 (llama-8b on an H200: attention 68.7 -> 37.5 ms a step, the step 1.03-1.05x;
    # at head dim 64, llama-1b, it was 0.95x: BENCHMARKS.md); true / false force it. Packed rows never use it.
    cudnn_attention: str = "auto"


FAST_PATH_CHOICES = ("auto", "true", "false")
# The choices of train.kernels / train.attention (client/kernels.py registers what each name runs).
KERNEL_CHOICES = ("none", "liger", "auto")
ATTENTION_CHOICES = ("sdpa", "varlen", "auto")
LR_SCHEDULES = ("cosine", "linear", "constant")


def fast_path_on(train: TrainConfig, device_type: str) -> bool:
    """Whether train.fast_path (auto | true | false; hydra may hand over a bool) selects the fast trainer on device_type."""
    value = str(train.fast_path).lower()
    return value == "true" or (value == "auto" and device_type == "cuda")


@dataclass
class StrategyConfig:
    """Aggregation choice and client sampling."""

    name: str = "fedavg"
    # Which strategies/ aggregator runs on the server (empty: same as name).
    aggregator: str = ""
    # FedProx: clients add mu/2 * ||w - w_global||^2 to their loss (0 disables).
    proximal_mu: float = 0.0
    # FFA-LoRA: sites keep every lora_A frozen at the shared init and train B only.
    freeze_lora_a: bool = False
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 2
    min_evaluate_clients: int = 2
    min_available_clients: int = 2
    # The strategy's and its aggregator's settings (server_lr, momentum, eta, tau, site_ranks, ...): typed per
    # strategy in strategies/params.py (hydra cannot type a field by strategy.name), checked by federation.validation.
    params: dict[str, Any] = field(default_factory=dict)


# strategy.params the sites read (per simulation partition); their schema is strategies/params.py.
PARAM_SITE_RANKS = "site_ranks"
PARAM_SITE_LOCAL_STEPS = "site_local_steps"


@dataclass
class CentralDPConfig:
    """Site-level DP-FedAvg on the coordinator: clip each site's delta to C, add N(0, (sigma*C)^2) to the sum."""

    enabled: bool = False
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    # > 0: calibrate noise_multiplier to reach this epsilon after federation.rounds rounds (refuse if impossible).
    target_epsilon: float = 0.0
    delta: float = 1e-5
    accountant: str = "rdp"
    max_noise_multiplier: float = 100.0
    # Adaptive clipping toward a quantile of the update norms (Andrew et al. 2021).
    adaptive_clipping: bool = False
    target_unclipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    # Std of the noise on the unclipped count; 0 means the paper's m/20 (m = expected sites per round).
    clipped_count_stddev: float = 0.0
    # No seed on purpose: the noise comes from OS entropy (federation/secure_random.py), never reproducible.


@dataclass
class LocalDPSGDConfig:
    """Record-level DP-SGD at each site with Opacus (per-example clipping + Gaussian noise)."""

    enabled: bool = False
    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    # > 0: calibrate noise to reach this epsilon after rounds x local_steps steps.
    target_epsilon: float = 0.0
    delta: float = 1e-5
    accountant: str = "rdp"


@dataclass
class SecAggConfig:
    """Flower SecAgg+ of the (weighted, quantized) deltas: the coordinator sees only the sum."""

    enabled: bool = False
    num_shares: int = 3
    reconstruction_threshold: int = 2
    # Per-coordinate clip of the weighted delta before quantization; under central DP must be >= clip_norm.
    clipping_range: float = 0.125
    quantization_range: int = 4194304
    # Largest example count a site may weigh with; a power of two <= quantization_range keeps weights exact.
    max_weight: float = 1024.0
    modulus_range: int = 4294967296
    timeout: float = 600.0


# Flower quantizes SecAgg+ vectors into int32 (values reach Q inclusive), and sums them modulo at most 2**32.
SECAGG_MAX_QUANTIZATION_RANGE = 2**31 - 1
SECAGG_MAX_MODULUS_RANGE = 2**32


@dataclass
class PrivacyConfig:
    """Upload protection (see conf/privacy): central DP, local DP-SGD and SecAgg+, alone or together."""

    name: str = "none"
    central: CentralDPConfig = field(default_factory=CentralDPConfig)
    local_dp_sgd: LocalDPSGDConfig = field(default_factory=LocalDPSGDConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)


FOLD_ORDERS = ("fixed", "arrival")


@dataclass
class FederationConfig:
    """Shape of the federation and the round loop."""

    def evaluate_timeout(self) -> float:
        """Seconds a federated evaluation waits for replies."""
        return self.evaluate_timeout_s or self.round_timeout_s

    def query_timeout(self) -> float:
        """Seconds the sites' profile query waits for replies."""
        return self.query_timeout_s or self.round_timeout_s

    num_clients: int = 3
    rounds: int = 3
    # Seconds a training round waits for replies: the slowest site's local training plus both transfers (a site's
    # resident worker adds well under a second; its very first message also loads the base model).
    round_timeout_s: float = 600.0
    # Seconds a federated evaluation waits (0: round_timeout_s); it has no training, so it can be far shorter.
    evaluate_timeout_s: float = 0.0
    # Seconds the sites' profile query (rank, local steps; FLoRA/FlexLoRA and mixed-rank checks) waits
    # (0: round_timeout_s); it is a site's first message when a run starts, so it may include loading the base.
    query_timeout_s: float = 0.0
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0
    # Resume from this PEFT adapter directory instead of a fresh seeded adapter.
    initial_adapter: str = ""
    evaluate_before_training: bool = True
    # Keep only the newest N round checkpoints (0 keeps all).
    keep_last_checkpoints: int = 0
    # How sites encode their delta for upload: fp32 | bf16 | fp16 | int8 | int4 | topk (federation/compression.py).
    upload_codec: str = "bf16"
    upload_codec_params: dict[str, Any] = field(default_factory=dict)
    # Lossy codecs carry what they dropped into the next round (error feedback), kept in the node's state.
    upload_error_feedback: bool = True
    # Continue from output_dir's newest checkpoint (adapter, strategy state, round, RNG) if there is one.
    resume: bool = False
    # A round whose accepted updates are fewer than this is not aggregated (global stays as it was).
    min_completed_clients: int = 1
    # Simulation: train up to N virtual clients of a round together, one forward/backward with each row routed
    # through its own client's LoRA factors (client/multi_adapter.py); 1 = one after another. On the Ray engine
    # the round's clients go to the actors (one per client_num_gpus share) in groups of <= N, >= 1 group per actor.
    clients_per_batch: int = 1
    # In which order the coordinator folds a round's train replies into the running sum: fixed (in the sampled
    # nodes' id order; the SuperLink holds replies that come early, the coordinator still one at a time: a re-run
    # or a resumed run gives the same adapter bit for bit) | arrival (as they come: the new global adapter is ready
    # soonest after the last reply, but float rounding then depends on arrival order, ~1e-7 of the mean).
    fold_order: str = "fixed"
    # Consecutive rounds that aggregate nothing (every site failed, was rejected or did not reply) before the run
    # stops with a non-zero exit code and a summary naming the first cause.
    max_failed_rounds: int = 1


@dataclass
class EvalConfig:
    """Federated evaluation beyond the loss: sites generate answers to held-out prompts and score them."""

    # Generate and score answers (exact match, token F1, ROUGE-L); the eval loss and perplexity come every round.
    generate: bool = True
    # Generate in rounds divisible by this (round 0 included) and in the last round.
    every_n_rounds: int = 1
    # Held-out examples per site that get an answer generated (a seeded sample, the same every round; 0: all).
    max_examples: int = 32
    # Greedy decoding stops at eos or after this many new tokens.
    max_new_tokens: int = 32
    batch_size: int = 16
    sample_seed: int = 0
    # A JSONL file the coordinator holds: each round's global adapter is also scored on it (coordinator-side).
    gold_set: str = ""


TRACKERS = ("none", "mlflow", "tensorboard")


@dataclass
class TrackingConfig:
    """Experiment tracking of a run: none | mlflow | tensorboard (conf/tracking)."""

    name: str = "none"
    # MLflow tracking URI; empty: a local file store at <output_dir>/mlruns.
    uri: str = ""
    experiment: str = "fedtune"


@dataclass
class RunConfig:
    """Everything one federation run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "runs/latest"
    seed: int = 0


def run_config_to_json(cfg: RunConfig) -> str:
    """Serialize for the wire (ConfigRecord values must be scalars)."""
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}} (Flower run_config keys are flat)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CONFIG_GROUPS = ("model", "lora", "data", "train", "strategy", "privacy", "federation", "eval", "tracking")


def group_options(group: str, config_dir: str | Path = CONF_DIR) -> list[str]:
    """The options of a hydra config group: the YAML files in conf/<group>/ (e.g. the strategy names)."""
    return sorted(path.stem for path in (Path(config_dir) / group).glob("*.yaml"))


def sites_per_round(cfg: RunConfig) -> int:
    """How many sites Flower's FedAvg sampling picks per round when all cfg.federation.num_clients are up."""
    n = cfg.federation.num_clients
    return min(n, max(int(n * cfg.strategy.fraction_train), cfg.strategy.min_train_clients))


def overrides_from_flat(flat: dict[str, Any]) -> list[str]:
    """Flower run_config (flat keys) -> hydra overrides: bare group names pick a group option."""
    out = []
    for key, value in flat.items():
        if isinstance(value, bool):
            value = str(value).lower()
        out.append(f"{key}={value}")
    return out
