"""federation.validation: every user-controlled mistake is one ConfigError naming the key (and the valid choices)."""

from __future__ import annotations

import json

import pytest

from federation.config import group_options, run_config_to_json
from federation.compose import compose_config, run_config_from_json
from federation.validation import ConfigError, check_secagg_params, validate_simulation_data
from strategies.aggregators import MixedRanksError, valid_aggregator_names

GOOD_RECORD = {"instruction": "reverse: abc", "input": "", "output": "cba", "source": "reverse"}


def _error(*overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        compose_config(list(overrides))
    assert "\n" not in str(caught.value)  # one line
    return caught.value


@pytest.mark.parametrize("overrides, key, text", [
    # numeric ranges
    (["federation.rounds=0"], "federation.rounds", "federation.rounds must be >= 1, got 0"),
    (["federation.num_clients=0"], "federation.num_clients", "must be >= 1, got 0"),
    (["strategy.fraction_train=0"], "strategy.fraction_train", "in (0, 1], got 0.0"),
    (["strategy.fraction_train=1.5"], "strategy.fraction_train", "in (0, 1], got 1.5"),
    (["strategy.min_train_clients=5", "federation.num_clients=4"], "strategy.min_train_clients",
     "(5) must be <= federation.num_clients (4)"),
    (["federation.min_completed_clients=3", "federation.num_clients=4", "strategy.fraction_train=0.5"],
     "federation.min_completed_clients", "sites sampled per round (2"),
    (["train.lr=0"], "train.lr", "train.lr must be > 0, got 0.0"),
    (["train.batch_size=0"], "train.batch_size", ">= 1"),
    (["lora.r=0"], "lora.r", "lora.r must be >= 1"),
    (["lora.alpha=0"], "lora.alpha", "> 0"),
    (["lora.dropout=1.0"], "lora.dropout", "in [0, 1)"),
    (["data.max_seq_len=1"], "data.max_seq_len", ">= 2"),
    (["data.eval_fraction=1.0"], "data.eval_fraction", "in [0, 1)"),
    (["data.alpha=0"], "data.alpha", "> 0"),
    (["data.classes_per_site=0"], "data.classes_per_site", ">= 1"),
    (["data=hf"], "data.source", "a directory of parquet/arrow/json files, one such file, or a hub id"),
    (["data=hf", "data.source=x", "data.columns.output="], "data.columns.output", "data.columns.output is empty"),
    (["data=hf", "data.source=x", "data.eval_path=y", "data.eval_split=test"], "data.eval_split", "set one of"),
    (["federation.round_timeout_s=0"], "federation.round_timeout_s", "> 0"),
    (["federation.max_failed_rounds=0"], "federation.max_failed_rounds", ">= 1"),
    (["federation.clients_per_batch=0"], "federation.clients_per_batch", ">= 1"),
    (["model.preset.num_attention_heads=5"], "model.preset.hidden_size",
     "multiple of model.preset.num_attention_heads"),
    (["privacy=central_dp", "privacy.central.delta=1.0"], "privacy.central.delta", "in (0, 1), got 1.0"),
    (["privacy=central_dp", "privacy.central.clip_norm=0"], "privacy.central.clip_norm", "> 0"),
    (["privacy=central_dp", "privacy.central.noise_multiplier=-1"], "privacy.central.noise_multiplier", ">= 0"),
    (["privacy=dp_sgd", "privacy.local_dp_sgd.max_grad_norm=0"], "privacy.local_dp_sgd.max_grad_norm", "> 0"),
    (["privacy=secagg", "privacy.secagg.num_shares=4"], "privacy.secagg.num_shares", "odd integer >= 3"),
    (["strategy=trimmed_mean", "strategy.params.trim_fraction=0.5"], "strategy.params.trim_fraction",
     "in [0, 0.5), got 0.5"),
    (["strategy=norm_bound", "strategy.params.max_norm=0"], "strategy.params.max_norm", "> 0"),
    (["strategy=fedavgm", "strategy.params.momentum=1.0"], "strategy.params.momentum", "in [0, 1)"),
    (["strategy=multi_krum", "strategy.params.multi_k=5"], "strategy.params.multi_k", "<= the sites sampled"),
    (["federation.upload_codec=topk", "+federation.upload_codec_params.topk_fraction=0"],
     "federation.upload_codec_params", "topk_fraction must be in (0, 1]"),
    # combinations
    (["strategy=flora", "privacy=secagg"], "privacy", "privacy.secagg and privacy.central are not supported"),
    (["strategy=scaffold", "privacy.local_dp_sgd.enabled=true"], "privacy.local_dp_sgd", "control-variate"),
    (["strategy=fedex_lora", "strategy.aggregator=fedavg"], "strategy.aggregator", "must be empty or 'fedex_lora'"),
    (["strategy=median", "strategy.params.inner=fedex_lora"], "strategy.aggregator",
     "runs only as strategy=fedex_lora"),
    (["strategy=median", "privacy=secagg"], "privacy.secagg", "needs individual site updates"),
    (["privacy=secagg_dp", "privacy.secagg.clipping_range=0.1"], "privacy.secagg.clipping_range",
     "must be >= privacy.central.clip_norm"),
    (["privacy=secagg", "strategy.min_train_clients=1"], "strategy.min_train_clients", "at least 2 sites"),
    (["privacy=secagg", "privacy.central.enabled=true", "privacy.central.adaptive_clipping=true"],
     "privacy.central.adaptive_clipping", "SecAgg+ hides"),
    (["strategy=ffa_lora", "strategy.freeze_lora_a=false"], "strategy.freeze_lora_a", "needs strategy.freeze_lora_a"),
    (["strategy=flora", "+strategy.params.mu=1"], "strategy.params", "unknown ['mu']"),
    (["strategy=fedadam", "+strategy.params.lr=1"], "strategy.params", "'fedadam' takes"),
    (["strategy=scaffold", "strategy.params.control_variate=other"], "strategy.params.control_variate",
     "valid: gradient, displacement"),
    (["+strategy.params.site_ranks=[4,0]", "strategy=flora"], "strategy.params.site_ranks", "integers >= 1"),
    (["privacy=central_dp", "privacy.central.target_epsilon=0.0001", "privacy.central.max_noise_multiplier=5"],
     "privacy.central.target_epsilon", "privacy target unreachable"),
    (["data=jsonl"], "data.source", "data.source is required"),
    (["data.eval_path=/x/eval.jsonl"], "data.eval_path", "only read with a JSONL data.source"),
    (["lora.target_modules=[q_prj]"], "lora.target_modules", "not found in the base model"),
    (["data.prompt_template='Q: {instruction} {answer}'"], "data.prompt_template", "field {answer} unknown"),
])
def test_numeric_ranges_and_combinations_name_the_key(overrides, key, text):
    error = _error(*overrides)
    assert error.key == key
    assert text in str(error)


@pytest.mark.parametrize("overrides, key, choices", [
    (["strategy.name=fedavgg"], "strategy.name", group_options("strategy")),
    (["strategy=fedavg", "strategy.aggregator=fedavgg"], "strategy.aggregator", valid_aggregator_names()),
    (["strategy=median", "strategy.params.inner=fedavgg"], "strategy.params.inner", valid_aggregator_names()),
    (["federation.upload_codec=int3"], "federation.upload_codec", ["fp32", "bf16", "fp16", "int8", "int4", "topk"]),
    (["data.partitioner=random"], "data.partitioner", ["source", "iid", "dirichlet", "pathological",
                                                         "natural_id", "linear", "square", "exponential"]),
    (["data.loader=csv"], "data.loader", ["jsonl", "hf"]),
    (["data=hf", "data.source=x", "data.format=sharegpt"], "data.format", ["auto", "chat", "alpaca", "plain"]),
    (["data.partitioner=pathological", "data.class_assignment=fixed"], "data.class_assignment",
     ["first-deterministic", "deterministic", "random"]),
    (["privacy=central_dp", "privacy.central.accountant=gdp2"], "privacy.central.accountant", ["rdp", "prv"]),
    (["model.quantization=8bit"], "model.quantization", ["auto", "4bit", "none"]),
    (["model.compute_dtype=float8"], "model.compute_dtype", ["bfloat16", "float16", "float32"]),
    (["model.preset_name=llama-70b"], "model.preset_name", ["tiny", "llama-1b", "llama-3b", "llama-8b"]),
])
def test_unknown_names_list_the_valid_choices(overrides, key, choices):
    error = _error(*overrides)
    assert error.key == key
    assert "unknown; valid: " + ", ".join(choices) in str(error)


@pytest.mark.parametrize("override, key, text", [
    ("strategy=fedavgg", "strategy", "strategy 'fedavgg' unknown; valid: " + ", ".join(group_options("strategy"))),
    ("privacy=centraldp", "privacy", "privacy 'centraldp' unknown; valid: central_dp, central_dp_adaptive"),
    ("federation.roundz=3", "federation.roundz", "unknown key federation.roundz; valid keys of federation: "
                                                 "num_clients, rounds,"),
    ("+federation.roundz=3", "federation.roundz", "unknown key federation.roundz"),
    ("foo=1", "foo", "unknown key foo; valid keys: model, lora, data"),
    ("federation.rounds=abc", "federation.rounds", "federation.rounds must be an integer, got 'abc'"),
    ("lora.dropout=high", "lora.dropout", "lora.dropout must be a number, got 'high'"),
    ("federation.resume=maybe", "federation.resume", "federation.resume must be true or false, got 'maybe'"),
    ("federation.rounds", "federation.rounds", "override 'federation.rounds' is not key=value"),
    ("strategy.params={a:1", "strategy.params", "override 'strategy.params={a:1' cannot be parsed"),
    ("+federation.rounds=3", "federation.rounds", "exists already: set it without '+'"),
    ("strategy.params.inner=median", "strategy.params.inner", "add one with +strategy.params.inner=VALUE"),
])
def test_hydra_composition_errors_become_one_line(override, key, text):
    error = _error(override)
    assert error.key == key
    assert text in str(error)


def test_mixed_site_ranks_are_a_rank_plan_error_that_is_also_a_mixed_ranks_error():
    error = _error("+strategy.params.site_ranks=[4,8]")
    assert isinstance(error, MixedRanksError) and error.key == "strategy.params.site_ranks"
    assert compose_config(["strategy=flexlora", "strategy.params.site_ranks=[4,8]"]).strategy.params["site_ranks"] \
        == [4, 8]


def test_the_wire_config_is_checked_too():
    text = json.loads(run_config_to_json(compose_config([])))
    text["federation"]["rounds"] = 0
    with pytest.raises(ConfigError, match="federation.rounds must be >= 1, got 0"):
        run_config_from_json(json.dumps(text))
    text["federation"]["rounds"] = 2
    text["federation"]["roundz"] = 2
    with pytest.raises(ConfigError, match="unknown key federation.roundz"):
        run_config_from_json(json.dumps(text))


def test_valid_configs_compose():
    for name in group_options("strategy"):
        assert compose_config([f"strategy={name}"]).strategy.name == name
    for name in group_options("privacy"):
        compose_config([f"privacy={name}"])
    assert compose_config(["federation.max_failed_rounds=3"]).federation.max_failed_rounds == 3


def test_secagg_params_share_the_config_checks():
    from server.secagg import SecAggParams

    with pytest.raises(ConfigError, match="quantization_range must be an integer in"):
        SecAggParams(quantization_range=2**31)
    check_secagg_params(SecAggParams())


def _pool(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_simulation_data_names_file_and_line(tmp_path):
    good = [json.dumps({**GOOD_RECORD, "source": s}) for s in "abcd" * 3]
    pool = _pool(tmp_path / "pool.jsonl", good[:5] + ['{"instruction": "x", '] + good[5:])
    cfg = compose_config(["data=jsonl", f"data.source={pool}"])  # the config alone is fine
    with pytest.raises(ConfigError) as caught:
        validate_simulation_data(cfg)
    assert caught.value.key == "data.source"
    assert str(caught.value).startswith(f"data.source: {pool}:6: invalid JSON")
    fixed = _pool(tmp_path / "fixed.jsonl", good)
    bad_eval = _pool(tmp_path / "eval.jsonl", [good[0], json.dumps({"text": 3})])
    with pytest.raises(ConfigError, match=f"data.eval_path: {bad_eval}:2: field 'text' must be a string"):
        validate_simulation_data(compose_config(["data=jsonl", f"data.source={fixed}", f"data.eval_path={bad_eval}"]))
    validate_simulation_data(compose_config(["data=jsonl", f"data.source={fixed}", "data.partitioner=iid"]))
    with pytest.raises(ConfigError, match="data.partitioner=iid over federation.num_clients=20 sites: cannot give"):
        validate_simulation_data(compose_config(["data=jsonl", f"data.source={fixed}", "data.partitioner=iid",
                                                 "federation.num_clients=20"]))
    with pytest.raises(ConfigError, match="data.demo: unknown demo skill"):
        validate_simulation_data(compose_config(["data.demo.skills=[reverse,spell]"]))


def test_evaluate_and_query_timeouts_default_to_the_round_timeout_and_can_be_shorter():
    from federation.compose import compose_config

    cfg = compose_config(["federation.round_timeout_s=300"])
    assert cfg.federation.evaluate_timeout() == 300 and cfg.federation.query_timeout() == 300
    cfg = compose_config(["federation.round_timeout_s=300", "federation.evaluate_timeout_s=30",
                          "federation.query_timeout_s=45"])
    assert cfg.federation.evaluate_timeout() == 30 and cfg.federation.query_timeout() == 45
    with pytest.raises(ConfigError, match="federation.evaluate_timeout_s"):
        compose_config(["federation.evaluate_timeout_s=-1"])


# ------------------------------------------------------------------- training defaults a practitioner expects


def test_real_model_presets_get_qlora_lr_and_the_tiny_demo_keeps_its_own():
    from federation.compose import compose_config

    assert compose_config([]).train.lr == 5e-3
    assert compose_config(["model=llama-1b-random"]).train.lr == 2e-4
    hub = compose_config(["model=hub", "model.name=/models/x"])
    assert hub.train.lr == 2e-4 and hub.model.name == "/models/x"
    assert compose_config(["model=hub", "train.lr=1e-3"]).train.lr == 1e-3  # the command line still wins


def test_fast_path_auto_means_cuda_only_and_true_false_force_it():
    from federation.compose import compose_config
    from federation.config import fast_path_on

    auto = compose_config([]).train
    assert fast_path_on(auto, "cuda") and not fast_path_on(auto, "cpu")
    forced = compose_config(["train.fast_path=true"]).train  # hydra hands the str field a bool
    assert fast_path_on(forced, "cpu") and fast_path_on(forced, "cuda")
    assert not fast_path_on(compose_config(["train.fast_path=false"]).train, "cuda")


@pytest.mark.parametrize("override,key", [("train.fast_path=sometimes", "train.fast_path"),
                                          ("train.lr_schedule=step", "train.lr_schedule"),
                                          ("train.kernels=unsloth", "train.kernels"),
                                          ("train.attention=flash", "train.attention"),
                                          ("train.cudnn_attention=always", "train.cudnn_attention")])
def test_unknown_fast_path_or_schedule_names_the_key_and_choices(override, key):
    from federation.compose import compose_config

    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert err.value.key == key and "valid:" in str(err.value)


@pytest.mark.parametrize("value", ["5", "yes", "0", "on"])
def test_true_false_settings_take_only_true_or_false(value):
    from federation.compose import compose_config

    with pytest.raises(ConfigError) as err:
        compose_config([f"train.offload_checkpoints={value}"])
    assert err.value.key == "train.offload_checkpoints"
    assert str(err.value) == f"train.offload_checkpoints must be true or false, got '{value}'"
    assert compose_config(["train.offload_checkpoints=FALSE"]).train.offload_checkpoints is False


def test_a_run_config_off_the_wire_with_a_number_for_a_true_false_setting_is_refused():
    import json

    from federation.compose import compose_config, run_config_from_json
    from federation.config import run_config_to_json

    wire = json.loads(run_config_to_json(compose_config([])))
    wire["federation"]["evaluate_before_training"] = 2
    with pytest.raises(ConfigError) as err:
        run_config_from_json(json.dumps(wire))
    assert err.value.key == "federation.evaluate_before_training"
