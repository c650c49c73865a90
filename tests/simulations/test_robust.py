"""One faulty or malicious site among five: robust aggregation keeps the union eval loss near the honest run."""

import pytest

from client.app import app as honest_app
from server.app import run_federation
from simulations.attacks import make_attacking_client_app
from simulations.inprocess import InProcessGrid

SITES = 5
# Robust aggregation assumes honest updates that resemble each other: IID sites (with one skill per site, the
# median of five sites drops the minority skills whether or not anyone attacks).
SETTING = ["data.partitioner=iid"]


@pytest.fixture(scope="module")
def run_loss(tmp_path_factory):
    from federation.compose import compose_config

    cache = tmp_path_factory.getbasetemp() / "robust-model-cache"
    done: dict = {}

    def _run(strategy: str, attack_scale: float | None) -> float:
        if (strategy, attack_scale) in done:
            return done[strategy, attack_scale]
        cfg = compose_config([f"model.cache_dir={cache}", f"output_dir={tmp_path_factory.mktemp('robust')}",
                              f"federation.num_clients={SITES}", "federation.rounds=3", f"strategy={strategy}",
                              *SETTING])
        app = honest_app if attack_scale is None else make_attacking_client_app({0}, attack_scale)
        done[strategy, attack_scale] = run_federation(InProcessGrid(app, SITES), cfg)[-1]["eval_loss"]
        return done[strategy, attack_scale]

    return _run


@pytest.mark.parametrize("robust", ["median", "trimmed_mean"])
@pytest.mark.parametrize("scale", [100.0, -1.0], ids=["x100", "sign-flip"])
def test_robust_aggregation_stays_within_10_percent_of_honest(run_loss, robust, scale):
    honest = run_loss("fedavg", None)
    attacked = run_loss(robust, scale)
    assert attacked <= 1.10 * honest, (robust, scale, attacked, honest)


def test_plain_fedavg_is_derailed_by_a_scaled_update(run_loss):
    honest = run_loss("fedavg", None)
    assert run_loss("fedavg", 100.0) > 1.10 * honest
