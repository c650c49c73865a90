"""eval.gold_set: the coordinator scores every round's global adapter on a set it holds."""

import json

import pytest

from federation.compose import compose_config

pytestmark = pytest.mark.timeout(600)


def test_gold_set_of_the_union_held_out_data_reproduces_the_sites_union_scores(tmp_path):
    """The gold set is exactly the union of the sites' held-out examples, so its scores equal the federated ones."""
    from federation.data import _load_pools, _partition_pools
    from simulations.simulate import simulate

    overrides = [f"model.cache_dir={tmp_path / 'models'}", "federation.num_clients=2", "federation.rounds=2",
                 "train.local_steps=3", "data.demo.examples_per_skill=8", "data.demo.eval_examples_per_skill=4",
                 "eval.max_examples=0"]
    cfg = compose_config(overrides)
    train, held_out = _load_pools(cfg.data)
    _, eval_parts = _partition_pools(train, held_out, 2, cfg.data)
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps(held_out[i]) + "\n" for part in eval_parts for i in part))
    cfg = compose_config([*overrides, f"eval.gold_set={gold}", f"output_dir={tmp_path / 'run'}"])
    rows = simulate(cfg, engine="inprocess")
    for row in rows:
        assert row["gold_examples"] == 16 and row["gold_generated"] == 16
        assert row["gold_loss"] == pytest.approx(row["eval_loss"], rel=1e-5)
        assert row["gold_exact_match"] == pytest.approx(row["eval_exact_match"])
        assert row["gold_rouge_l"] == pytest.approx(row["eval_rouge_l"])


def test_unreadable_gold_set_is_one_config_line(tmp_path, capsys):
    from simulations.cli import main

    bad = tmp_path / "gold.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    assert main(["simulate", f"eval.gold_set={bad}", f"model.cache_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == f"config error: eval.gold_set: {bad}:1: missing required field 'output'"
