"""The `fedtune` CLI: a mistake is one `config error:` line and exit 2 before any work; a failed federation exits 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simulations.cli import main

REPO = Path(__file__).resolve().parents[2]
GOOD_RECORD = {"instruction": "reverse: abc", "input": "", "output": "cba", "source": "reverse"}
FAST = ["data.demo.examples_per_skill=8", "data.demo.eval_examples_per_skill=2", "train.local_steps=1",
        "train.batch_size=2"]
needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="model.quantization=4bit works on this machine")


def _broken_pool(tmp_path: Path) -> Path:
    lines = [json.dumps({**GOOD_RECORD, "source": s}) for s in "abcd" * 4]
    lines[16 - 1] = '{"instruction": "x", '  # line 16
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(lines) + "\n")
    return pool


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("config error: ")
    return lines[0]


@pytest.mark.parametrize("overrides, text", [
    (["strategy=fedavgg"], "config error: strategy 'fedavgg' unknown; valid: fedadagrad, fedadam, fedavg,"),
    (["federation.roundz=3"], "config error: unknown key federation.roundz; valid keys of federation:"),
    (["federation.rounds=abc"], "config error: federation.rounds must be an integer, got 'abc'"),
    (["federation.rounds"], "config error: override 'federation.rounds' is not key=value"),
    (["federation.rounds=0"], "config error: federation.rounds must be >= 1, got 0"),
    (["strategy=median", "strategy.params.inner=fedavgg"], "config error: inner aggregator 'fedavgg' unknown"),
    (["strategy=flora", "privacy=secagg"], "privacy.secagg and privacy.central are not supported"),
    (["data=jsonl"], "config error: data.source is required"),
    (["federation.clients_per_batch=0"], "config error: federation.clients_per_batch must be >= 1, got 0"),
])
def test_config_mistakes_are_one_line_and_exit_2_before_any_work(tmp_path, capsys, overrides, text):
    out = tmp_path / "run"
    assert main(["simulate", "--engine", "inprocess", f"output_dir={out}", *overrides]) == 2
    assert text in _one_error_line(capsys)
    assert not out.exists()  # nothing was started


def test_debug_adds_the_traceback(capsys):
    assert main(["simulate", "--debug", "federation.rounds=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "config error: federation.rounds must be >= 1, got 0"


def test_broken_jsonl_stops_the_real_cli_before_training_naming_file_and_line(tmp_path):
    """The review's case: `fedtune simulate data=jsonl data.source=<file with a broken line>` exited 0."""
    pool = _broken_pool(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "data=jsonl", f"data.source={pool}",
                             f"output_dir={out}"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"config error: data.source: {pool}:16: invalid JSON (Expecting property "
                                          "name enclosed in double quotes, column 1)"]
    assert result.stdout == "" and not out.exists()


def test_site_check_with_a_bad_data_line_exits_2(tmp_path, capsys):
    data = tmp_path / "site.jsonl"
    data.write_text(json.dumps(GOOD_RECORD) + "\n" + '{"instruction": "no output"}\n')
    config = tmp_path / "site.yaml"
    config.write_text("name: site-a\ncoordinator: 127.0.0.1:8000\ndata_path: site.jsonl\ninsecure: true\n")
    assert main(["site", "--config", str(config), "--check"]) == 2
    assert _one_error_line(capsys) == (f"config error: site data is not usable: data_path: {data}:2: missing "
                                       "required field 'output'")
    config.write_text(config.read_text() + "extra_node_config: {lora-r: 0}\n")
    assert main(["site", "--config", str(config), "--check"]) == 2
    assert _one_error_line(capsys) == "config error: extra_node_config.lora-r must be an integer >= 1, got 0"


def test_launch_refuses_a_bad_config_before_submitting(monkeypatch, capsys):
    import server.coordinator

    def no_submission(*args, **kwargs):
        raise AssertionError(f"flwr was called: {args}")

    monkeypatch.setattr(server.coordinator.subprocess, "Popen", no_submission)
    monkeypatch.setattr(server.coordinator, "run_flwr", no_submission)
    assert main(["launch", "--address", "127.0.0.1:9", "--insecure", "strategy=fedavgg"]) == 2
    assert _one_error_line(capsys).startswith("config error: strategy 'fedavgg' unknown; valid: fedadagrad")
    assert main(["launch", "--address", "127.0.0.1:9", "--insecure", "federation.rounds=0"]) == 2
    assert _one_error_line(capsys) == "config error: federation.rounds must be >= 1, got 0"


@needs_cpu_only
def test_a_federation_where_every_site_fails_exits_1_naming_the_cause(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["simulate", "--engine", "inprocess", "model.quantization=4bit", "federation.num_clients=2",
                 "federation.rounds=3", f"model.cache_dir={tmp_path / 'models'}", f"output_dir={out}", *FAST])
    assert code == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("federation failed: the federation stopped after round 1: round 1 aggregated nothing")
    assert "RuntimeError: model.quantization=4bit needs a CUDA device with bitsandbytes" in last
    assert "(2 failed, 0 rejected and 0 silent of 2 sampled sites)" in last
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1] and rows[1]["aggregated"] is False


@needs_cpu_only
@pytest.mark.timeout(300)
def test_the_ray_engine_exits_non_zero_too(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["simulate", "--engine", "ray", "model.quantization=4bit", "federation.num_clients=2",
                 "federation.rounds=2", "federation.evaluate_before_training=false",
                 f"model.cache_dir={tmp_path / 'models'}", f"output_dir={out}", *FAST])
    assert code == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("federation failed: the federation stopped after round 1")
    assert "RuntimeError: model.quantization=4bit needs a CUDA device with bitsandbytes" in last
