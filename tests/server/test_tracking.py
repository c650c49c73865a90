"""tracking=mlflow | tensorboard: a simulated run is read back with MLflow's own client and TensorBoard's reader."""

import subprocess
import sys
from pathlib import Path

import pytest

from federation.compose import compose_config

pytestmark = pytest.mark.timeout(600)


def _run(tmp_path, *overrides):
    from simulations.simulate import simulate

    cfg = compose_config([f"model.cache_dir={tmp_path / 'models'}", f"output_dir={tmp_path / 'run'}",
                          "federation.num_clients=2", "federation.rounds=2", "train.local_steps=2",
                          "data.demo.examples_per_skill=8", "data.demo.eval_examples_per_skill=4", *overrides])
    return cfg, simulate(cfg, engine="inprocess")


def test_mlflow_run_has_config_params_round_metrics_and_the_adapter(tmp_path):
    pytest.importorskip("mlflow")  # installed by the test extra; skipped only where it genuinely is not
    from mlflow.tracking import MlflowClient

    cfg, rows = _run(tmp_path, "tracking=mlflow")
    client = MlflowClient((Path(cfg.output_dir) / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("fedtune").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.local_steps"] == "2" and run.data.params["strategy.name"] == "fedavg"
    history = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (r["round"], pytest.approx(r["eval_loss"])) for r in rows]
    exact = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_exact_match")}
    assert exact == {r["round"]: pytest.approx(r["eval_exact_match"]) for r in rows}
    assert "site/0/eval-loss" in run.data.metrics
    fingerprints = {k: v for k, v in run.data.tags.items() if k.startswith("data_fingerprint.")}
    assert sorted(fingerprints.values()) == sorted(f"{fp['sha256']} ({fp['examples']} examples)"
                                                   for fp in rows[-1]["data_fingerprints"].values())
    assert len(fingerprints) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "global_adapter")}
    assert {"global_adapter/adapter_model.safetensors", "global_adapter/adapter_config.json"} <= artifacts


def test_tensorboard_event_files_hold_every_round(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, rows = _run(tmp_path, "tracking=tensorboard")
    events = EventAccumulator(str(Path(cfg.output_dir) / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("eval_loss")]
    assert loss == [(r["round"], pytest.approx(r["eval_loss"])) for r in rows]
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]


def test_missing_tracker_package_is_one_config_line(tmp_path):
    """With the package hidden, `fedtune simulate tracking=mlflow` exits 2 naming the key and the install."""
    code = ("import sys; sys.modules['mlflow'] = None; import importlib.util as u; "
            "u.find_spec = (lambda f: lambda name, *a: None if name == 'mlflow' else f(name, *a))(u.find_spec); "
            "from simulations.cli import main; "
            f"sys.exit(main(['simulate', 'tracking=mlflow', 'model.cache_dir={tmp_path}', 'output_dir={tmp_path}/r']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("config error: tracking=mlflow needs the mlflow-skinny")
