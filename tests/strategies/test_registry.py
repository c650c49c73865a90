"""The strategy registry: one entry per strategy a run can name, and its capability flags as the checks read them."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from federation.compose import compose_config
from federation.config import CONF_DIR, StrategyConfig, group_options
from federation.validation import ConfigError
from strategies.aggregators import AGGREGATORS, ROBUST_METHOD_PARAMS, sum_only_aggregator_names
from strategies.params import AGGREGATOR_PARAMS, ScaffoldParams, is_required, param_fields
from strategies.registry import STRATEGIES, markdown_table, params_schema, strategy_params, strategy_spec


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


README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_strategy_table_is_the_generated_one():
    text = README.read_text()
    start = text.index("<!-- strategy-table")
    table = text[text.index("\n", start) + 1:text.index("<!-- /strategy-table -->")].strip()
    assert table == markdown_table()
    assert len(table.splitlines()) == 2 + len(STRATEGIES)


def test_table_marks_what_the_checks_refuse():
    rows = {line.split("|")[1].strip(" `"): [cell.strip() for cell in line.split("|")[3:8]]
            for line in markdown_table().splitlines()[2:]}
    assert rows["fedavg"] == ["—", "✓", "✓", "✓", "✓"]
    assert rows["median"][1] == "—"  # the robust aggregator needs each delta (check_secagg_aggregator refuses it)
    assert rows["flora"] == ["✓", "—", "—", "✓", "—"]
    assert rows["scaffold"][3] == "—"


@pytest.mark.parametrize("aggregator", sorted(AGGREGATOR_PARAMS))
def test_params_dataclass_defaults_are_the_aggregators_own(aggregator):
    cls = AGGREGATORS.get(aggregator)
    fields = param_fields(AGGREGATOR_PARAMS[aggregator])
    if cls is None:  # a robust method: its own params plus the inner aggregator's name and params
        accepted = ROBUST_METHOD_PARAMS[aggregator]
        assert set(fields) == set(accepted) | {"inner", "inner_params"}
        for name, default in accepted.items():
            assert (fields[name].default if default is not None else None) in (default, dataclasses.MISSING)
            assert is_required(fields[name]) == (default is None)
        return
    signature = inspect.signature(cls).parameters
    assert list(fields) == list(signature)
    assert {name: f.default for name, f in fields.items()} == {name: p.default for name, p in signature.items()}
    assert all(f.metadata["help"] for f in fields.values())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_yaml_holds_only_what_differs_from_the_defaults(name):
    written = yaml.safe_load((CONF_DIR / "strategy" / f"{name}.yaml").read_text())
    schema_defaults = dataclasses.asdict(StrategyConfig())
    assert written.pop("name") == name
    assert all(written[key] != schema_defaults[key] for key in written if key != "params")
    fields = params_schema(name)
    for key, value in (written.get("params") or {}).items():
        assert is_required(fields[key]) or value != fields[key].default, key


@pytest.mark.parametrize("overrides, key, text", [
    (["strategy=fedadam", "strategy.params.eta=fast"], "strategy.params.eta", "must be a number, got 'fast'"),
    (["strategy=norm_bound", "~strategy.params.max_norm"], "strategy.params.max_norm", "is required by strategy"),
    (["strategy=flora", "strategy.params.site_ranks=4"], "strategy.params.site_ranks", "must be a list"),
    (["strategy=fedavg", "+strategy.params.momentum=0.5"], "strategy.params",
     "strategy 'fedavg' takes params none; unknown ['momentum']"),
    (["strategy=fedsa_lora", "strategy.aggregator=fedavgm", "strategy.params.momentum=1.5"], "strategy.params.momentum",
     "in [0, 1)"),
])
def test_typed_params_are_checked_with_the_config(overrides, key, text, tmp_path):
    with pytest.raises(ConfigError) as caught:
        compose_config(overrides + [f"output_dir={tmp_path}"])
    assert caught.value.key == key and text in str(caught.value) and "\n" not in str(caught.value)


def test_a_default_param_is_set_without_plus_and_read_typed(tmp_path):
    cfg = compose_config(["strategy=scaffold", "strategy.params.control_variate=displacement",
                          "strategy.aggregator=fedavgm", "strategy.params.momentum=0.5", f"output_dir={tmp_path}"])
    assert strategy_params(cfg.strategy) == ScaffoldParams(control_variate="displacement")
    assert cfg.strategy.params == {"control_variate": "displacement", "momentum": 0.5}
    assert strategy_params(compose_config([f"output_dir={tmp_path}", "strategy=scaffold"]).strategy).control_variate \
        == "gradient"
