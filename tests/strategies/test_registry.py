"""The strategy registry: one entry per strategy a run can name, and its capability flags as the checks read them."""

import pytest

from federation.compose import compose_config
from federation.config import group_options
from federation.validation import ConfigError
from strategies.aggregators import AGGREGATORS, ROBUST_METHOD_PARAMS, sum_only_aggregator_names
from strategies.registry import STRATEGIES, strategy_spec


def test_every_strategy_yaml_has_exactly_one_registry_entry():
    assert sorted(STRATEGIES) == group_options("strategy")


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="strategy 'fedavgg' unknown; valid: fedadagrad, fedadam"):
        strategy_spec("fedavgg")


def test_sum_only_aggregators_are_the_ones_secagg_accepts():
    assert sum_only_aggregator_names() == ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "ffa_lora"]
    assert "fedex_lora" in AGGREGATORS and "fedex_lora" not in sum_only_aggregator_names()
    assert not set(ROBUST_METHOD_PARAMS) & set(sum_only_aggregator_names())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_capability_flags_decide_the_privacy_combinations(name, tmp_path):
    spec = strategy_spec(name)
    base = [f"strategy={name}", f"output_dir={tmp_path}"] + (["strategy.freeze_lora_a=true"] if name == "ffa_lora"
                                                               else [])
    robust = name in ROBUST_METHOD_PARAMS  # needs each delta: the aggregator check refuses SecAgg+
    for overrides, allowed in ((["privacy=secagg"], spec.secagg and not robust),
                               (["privacy=central_dp"], spec.central_dp),
                               (["privacy=dp_sgd"], spec.dp_sgd)):
        if allowed:
            compose_config(base + overrides)
        else:
            with pytest.raises(ConfigError):
                compose_config(base + overrides)


def test_server_optimizer_variant_is_checked_with_the_config(tmp_path):
    cfg = compose_config(["strategy=fedadam", "+strategy.params.variant=paper", f"output_dir={tmp_path}"])
    assert cfg.strategy.params["variant"] == "paper"
    with pytest.raises(ConfigError, match=r"variant must be one of \['flower', 'paper'\], got 'reddi'"):
        compose_config(["strategy=fedyogi", "+strategy.params.variant=reddi", f"output_dir={tmp_path}"])
