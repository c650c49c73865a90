"""`fedtune simulate`'s console: progress, round lines and the table; library noise in the run's fedtune.log."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

# What the console showed before (flwr/transformers/Ray/bitsandbytes), none of it fedtune's.
NOISE = ("FutureWarning", "is_gradient_checkpointing", "Loading weights", "Writing model shards", "[repeated",
         "RAY_DEDUP_LOGS", "bitsandbytes", "configure_evaluate: Sampled", "DEPRECATED FEATURE", "py.warnings")


def _environment() -> dict:
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONWARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS", "FEDTUNE_PROCESS_LOG", "COLUMNS")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    return env


def test_inprocess_simulate_console_has_no_library_noise_and_the_log_file_has_it(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--engine", "inprocess", "federation.num_clients=2",
         "federation.rounds=1", "train.local_steps=2", "data.demo.examples_per_skill=8",
         "data.demo.eval_examples_per_skill=4", f"model.cache_dir={tmp_path / 'models'}", f"output_dir={run}"],
        capture_output=True, text=True, env=_environment(), cwd=tmp_path, timeout=540)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console
    assert [noise for noise in NOISE if noise in console] == [], console
    assert "round 1/1" in console and "federation summary" in console
    assert "site 0 training: 2/2 steps" in console  # progress, plain lines off a terminal
    table = console[console.index("federation summary"):]
    assert "…" not in table and "seconds" in table  # the whole table, not elided at 80 columns
    log = (run / "fedtune.log").read_text()
    assert "FutureWarning" in log and "is_gradient_checkpointing" in log  # transformers' warning, via peft
    assert "configure_evaluate: Sampled" in log  # Flower's INFO lines


def test_a_child_process_writes_its_output_to_the_log_file(tmp_path):
    """Ray's actors are started by the driver after library_output_to; importing client.app redirects them."""
    from federation.run_log import PROCESS_LOG_ENV, PROCESS_LOG_OWNER_ENV

    log = tmp_path / "fedtune.log"
    env = _environment() | {PROCESS_LOG_ENV: str(log), PROCESS_LOG_OWNER_ENV: str(os.getpid())}
    code = ("import sys, warnings; import client.app; print('actor stdout'); "
            "warnings.warn('a library warning', FutureWarning); print('actor stderr', file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    text = log.read_text()
    assert "actor stdout" in text and "actor stderr" in text and "FutureWarning: a library warning" in text


def test_the_owner_process_keeps_its_console(monkeypatch, tmp_path):
    """The in-process engine imports client.app in the driver: it must not redirect the driver's own console."""
    from federation.run_log import PROCESS_LOG_ENV, PROCESS_LOG_OWNER_ENV, redirect_output_if_asked

    monkeypatch.setenv(PROCESS_LOG_ENV, str(tmp_path / "fedtune.log"))
    monkeypatch.setenv(PROCESS_LOG_OWNER_ENV, str(os.getpid()))
    assert redirect_output_if_asked() is False
    assert not (tmp_path / "fedtune.log").exists()
