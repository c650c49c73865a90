"""The wire protocol between coordinator and sites: every message type, record name, config key and metric name.

Both sides import these names from here (as Flower's client mod and server workflow both import
``flwr.common.secure_aggregation.secaggplus_constants``), so neither side imports the other. Values are
the strings on the wire: changing one breaks compatibility with sites running an older fedtune.
"""

from __future__ import annotations

import hashlib

# ------------------------------------------------------------------ message types
# Flower routes "<category>.<action>" to the ClientApp handler registered as @app.<category>("<action>")
# (flwr/clientapp/client_app.py); a bare "<category>" goes to the default handler.
TRAIN = "train"
EVALUATE = "evaluate"
QUERY = "query"


def message_type(category: str, action: str | None) -> str:
    """The message type that routes to the handler `action` of `category` ("train", "train.flora", ...)."""
    return category if not action else f"{category}.{action}"


# ------------------------------------------------------------------ config record "config" (coordinator -> site)
CONFIG_RECORD = "config"
ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"
RUN_CONFIG_KEY = "fedtune.run-config"  # the run config as JSON (federation.config.run_config_to_json)
# The run config travels once per (coordinator process, site): every message names it by the sha256 of its JSON and
# only messages to a site that has not yet answered one carry the JSON itself (server/run_config_once.py); the site
# keeps it in its Context.state (client/run_config_cache.py).
RUN_CONFIG_SHA256_KEY = "fedtune.run-config-sha256"
# Error code of a site's reply to a message naming a run config the site does not hold (it restarted, so its
# Context.state is new); the coordinator sends the full config with its next message to that site.
UNKNOWN_RUN_CONFIG_ERROR = 4101
# Error code of a site's refusal under its own policy (client/site_policy.py): the reason says which limit.
SITE_POLICY_REFUSED_ERROR = 4102
SERVER_ROUND_KEY = "server-round"
FEDERATION_RUN_ID_KEY = "fedtune.federation-run-id"  # keys the sites' round state (client/site_state.py)

# ------------------------------------------------------------------ node config keys (set at a site)
NODE_RANK_KEY = "lora-r"  # this site's LoRA rank (FLoRA / FlexLoRA)
NODE_LOCAL_STEPS_KEY = "local-steps"  # this site's local steps per round
REQUIRE_SECAGG_NODE_KEY = "require-secagg"  # "true": refuse plain (unmasked) uploads

# ------------------------------------------------------------------ frozen global update (FLoRA, FlexLoRA, FedEx-LoRA)
FROZEN_RECORD = "fedtune.frozen-update"  # stacked factors (ArrayRecord)
FROZEN_MODE_KEY = "fedtune.frozen-mode"
FROZEN_ACCUMULATE = "accumulate"  # FLoRA / FedEx-LoRA: append to the site's stored update (from 0: replace it)
FROZEN_TRANSIENT = "transient"  # FlexLoRA evaluation: use for this message only
FROZEN_FROM_KEY = "fedtune.frozen-from"
FROZEN_TO_KEY = "fedtune.frozen-to"

# ------------------------------------------------------------------ SCAFFOLD
C_GLOBAL_RECORD = "fedtune.scaffold.c-global"  # server -> site: c
DELTA_C_RECORD = "fedtune.scaffold.delta-c"  # site -> server: delta_c
# Controls travel and are stored in float64: they are differences of near-equal adapters divided by K * lr.
CONTROL_DTYPE = "float64"

# ------------------------------------------------------------------ SecAgg+ (FitIns config keys; legacy layout)
# Legacy Parameters have no names, so the adapter's key order travels as JSON next to them.
ADAPTER_KEYS_KEY = "fedtune.adapter-keys"
MAX_WEIGHT_KEY = "fedtune.secagg.max-weight"
CLIPPING_RANGE_KEY = "fedtune.secagg.clipping-range"
DP_CLIP_NORM_KEY = "fedtune.secagg.dp-clip-norm"  # 0.0: no DP clipping
MASK_SCHEME_KEY = "fedtune.secagg.mask-scheme"
MASK_SCHEME = "chacha20-sha256-v1"
LEGACY_FIT_PARAMETERS = "fitins.parameters"

# ------------------------------------------------------------------ reply metrics (site -> coordinator)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_TOKENS = "train-tokens"
INPUT_TOKENS = "input-tokens"
TRAIN_STEPS = "train-steps"
TRAIN_SECONDS = "train-seconds"
TOKENS_PER_SECOND = "tokens-per-second"
PEAK_MEMORY_BYTES = "peak-memory-bytes"
# Simulation: how many virtual clients this one was trained together with, itself included (client/multi_adapter.py).
TRAINED_TOGETHER = "trained-together"
PARTITION_ID = "partition-id"
DP_SGD_EPSILON = "dp-sgd-epsilon"
EVAL_LOSS = "eval-loss"
EVAL_TOKENS = "eval-tokens"
# Optional evaluate metrics: perplexity every round; in generation rounds the mean scores of the greedy answers
# (federation/text_metrics.py), over EVAL_GENERATED answers, and what generating them cost.
EVAL_PERPLEXITY = "eval-perplexity"
EVAL_GENERATED = "eval-generated"
EVAL_EXACT_MATCH = "eval-exact-match"
EVAL_TOKEN_F1 = "eval-token-f1"
EVAL_ROUGE_L = "eval-rouge-l"
EVAL_GENERATED_TOKENS = "eval-generated-tokens"
EVAL_GENERATION_SECONDS = "eval-generation-seconds"
GENERATION_SCORES = (EVAL_EXACT_MATCH, EVAL_TOKEN_F1, EVAL_ROUGE_L)
# The train reply's ConfigRecord with the site's data fingerprint (provenance: sha256 and example count, never content).
DATA_FINGERPRINT_RECORD = "data-fingerprint"
CLIPPED_VALUES_METRIC = "secagg-clipped-values"
# Site profile (query reply) and the merged-rounds count that train / evaluate replies add under a frozen update.
METRIC_RANK = "lora-r"
METRIC_LOCAL_STEPS = "local-steps"
METRIC_FROZEN_COUNT = "frozen-updates"


def run_config_sha256(run_config_json: str) -> str:
    """The hex sha256 of a run config's JSON text: the name a message gives the run config it runs under."""
    return hashlib.sha256(run_config_json.encode()).hexdigest()
