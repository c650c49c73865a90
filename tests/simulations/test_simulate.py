"""End to end: real Flower simulations (Ray backend) of the tiny model on the demo task."""

import json

import numpy as np
import pytest

from federation.compose import compose_config

pytestmark = pytest.mark.timeout(600)


def _cfg(tmp_path_factory, name, *overrides):
    cache = tmp_path_factory.getbasetemp() / "sim-model-cache"
    return compose_config([f"model.cache_dir={cache}", f"output_dir={tmp_path_factory.mktemp(name)}", *overrides])


@pytest.fixture(scope="module")
def three_site_run(tmp_path_factory):
    from simulations.simulate import simulate

    cfg = _cfg(tmp_path_factory, "e2e", "federation.num_clients=3", "federation.rounds=2",
               "data.demo.examples_per_skill=32", "data.demo.eval_examples_per_skill=12")
    return cfg, simulate(cfg)


def test_three_site_two_round_simulation_finishes_and_learns(three_site_run):
    cfg, rows = three_site_run
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_ok"] == 3 and r["missing"] == [] for r in rows[1:])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    for r in rows[1:]:
        assert r["bytes_up"] > 0 and r["bytes_down"] > r["bytes_up"]  # down: train + eval broadcast
        assert np.isfinite(r["train_loss"])
    from pathlib import Path

    run = Path(cfg.output_dir)
    assert (run / "loss.png").stat().st_size > 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((run / "global_adapter" / "server_state.json").read_text())["round"] == 2


def test_saved_adapter_loads_with_peft_and_reproduces_server_eval_loss(three_site_run):
    from peft import PeftModel

    from client.trainer import LocalTrainer
    from federation.data import load_union_eval
    from federation.model import load_base_model, load_tokenizer

    cfg, rows = three_site_run
    base, _, _ = load_base_model(cfg.model)
    model = PeftModel.from_pretrained(base, f"{cfg.output_dir}/global_adapter")
    tokenizer = load_tokenizer(cfg.model)
    union = load_union_eval(cfg.data, tokenizer, cfg.federation.num_clients)
    loss = LocalTrainer(model, tokenizer.pad_token_id, cfg.train).evaluate(union).loss
    assert loss == pytest.approx(rows[-1]["eval_loss"], rel=1e-4)


def test_federation_beats_isolation_on_demo_task(tmp_path_factory):
    """Each site holds one skill; the federated adapter must beat a site trained alone for as many steps."""
    from simulations.isolation import train_site_alone
    from simulations.simulate import simulate

    cfg = _cfg(tmp_path_factory, "fed-vs-iso", "federation.num_clients=4", "federation.rounds=3",
               "train.local_steps=10")
    rows = simulate(cfg)
    federated = rows[-1]["eval_loss"]
    alone = train_site_alone(cfg, partition_id=0)
    assert alone.steps == cfg.federation.rounds * cfg.train.local_steps
    assert federated < alone.union_eval_loss, (federated, alone)
