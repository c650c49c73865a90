"""Fast, in-process checks of the deployment plumbing: site config validation, flwr argument strings, the app copy."""

from __future__ import annotations

import argparse
import inspect
import json
import stat
import tomllib
from pathlib import Path

import pytest

from client.daemon import (SiteConfig, SiteConfigError, load_site_config, node_config, site_main, supernode_command,
                           validate_site)
from federation.pki import generate_federation_credentials
from server.coordinator import (CoordinatorError, CoordinatorSettings, check_certificates, copy_app,
                                run_config_argument, run_config_pairs, superlink_command, write_flower_config)

REPO = Path(__file__).resolve().parents[2]
GOOD_RECORD = {"instruction": "reverse: abc", "input": "", "output": "cba", "source": "reverse"}


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("creds")
    generate_federation_credentials(out, ["127.0.0.1"], ["site-a"])
    return out


def _site(tmp_path: Path, creds: Path, data_path: Path, **overrides) -> SiteConfig:
    settings = dict(name="site-a", coordinator="127.0.0.1:8000", ca_cert=creds / "ca.crt",
                    private_key=creds / "sites" / "site-a.key", data_path=data_path, device="cpu")
    settings.update(overrides)
    return SiteConfig(**settings)


def _jsonl(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_valid_site_reports_examples_per_file(tmp_path, creds):
    data = tmp_path / "data"
    _jsonl(data / "train.jsonl", json.dumps(GOOD_RECORD), json.dumps(GOOD_RECORD))
    _jsonl(data / "eval.jsonl", json.dumps(GOOD_RECORD))
    assert validate_site(_site(tmp_path, creds, data)) == {str(data / "train.jsonl"): 2, str(data / "eval.jsonl"): 1}


@pytest.mark.parametrize("case, expected", [
    ("missing", "not found"),
    ("empty", "train.jsonl: no examples"),
    ("bad-json", "train.jsonl:2: invalid JSON"),
    ("no-output", "train.jsonl:1: missing required field 'output'"),
])
def test_site_refuses_unusable_data_naming_file_and_line(tmp_path, creds, case, expected):
    data = tmp_path / "data"
    if case == "empty":
        _jsonl(data / "train.jsonl")
    elif case == "bad-json":
        _jsonl(data / "train.jsonl", json.dumps(GOOD_RECORD), "{not json")
    elif case == "no-output":
        _jsonl(data / "train.jsonl", json.dumps({"instruction": "x", "source": "s"}))
    with pytest.raises(SiteConfigError, match="data") as err:
        validate_site(_site(tmp_path, creds, data))
    assert expected in str(err.value)


def test_site_refuses_unreadable_or_wrong_key_and_cert(tmp_path, creds):
    data = _jsonl(tmp_path / "site.jsonl", json.dumps(GOOD_RECORD))
    with pytest.raises(SiteConfigError, match=r"private_key .*nope\.key: cannot read"):
        validate_site(_site(tmp_path, creds, data, private_key=tmp_path / "nope.key"))
    with pytest.raises(SiteConfigError, match="not an unencrypted OpenSSH private key"):
        validate_site(_site(tmp_path, creds, data, private_key=creds / "sites" / "site-a.pub"))
    with pytest.raises(SiteConfigError, match="ca_cert .*not a PEM certificate"):
        validate_site(_site(tmp_path, creds, data, ca_cert=creds / "sites" / "site-a.pub"))


def test_site_cli_exits_2_with_the_error_on_stderr(tmp_path, creds, capsys):
    data = _jsonl(tmp_path / "site.jsonl", json.dumps(GOOD_RECORD), "[1, 2]")
    config = tmp_path / "site.yaml"
    config.write_text(f"name: site-a\ncoordinator: 127.0.0.1:8000\nca_cert: {creds / 'ca.crt'}\n"
                      f"private_key: {creds / 'sites' / 'site-a.key'}\ndata_path: site.jsonl\n")
    assert site_main(argparse.Namespace(config=str(config), check=False)) == 2
    assert capsys.readouterr().err == (f"config error: site data is not usable: data_path: {data}:2: expected a JSON "
                                       "object, got list\n")


def test_site_yaml_paths_are_relative_to_the_yaml_and_unknown_keys_fail(tmp_path):
    config = tmp_path / "conf" / "site.yaml"
    config.parent.mkdir()
    config.write_text("name: a\ncoordinator: h:1\nca_cert: ../c/ca.crt\nprivate_key: k.key\ndata_path: /d\n"
                      "clientappio_port: 9100\n")
    cfg = load_site_config(config)
    assert (cfg.ca_cert, cfg.private_key, cfg.data_path) == (tmp_path / "c" / "ca.crt", config.parent / "k.key",
                                                              Path("/d"))
    assert cfg.clientappio_port == 9100 and cfg.device == "auto"
    config.write_text(config.read_text() + "colour: blue\n")
    with pytest.raises(SiteConfigError, match=r"unknown settings \['colour'\]"):
        load_site_config(config)


def test_node_config_is_what_flower_parses(tmp_path, creds):
    from flwr.common.config import parse_config_args

    cfg = _site(tmp_path, creds, Path("/data/site a"), extra_node_config={"shard": 3})
    assert node_config(cfg) == "site='site-a' data-path='/data/site a' device='cpu' shard=3"
    assert parse_config_args([node_config(cfg)]) == {"site": "site-a", "data-path": "/data/site a",
                                                     "device": "cpu", "shard": 3}
    with_state = _site(tmp_path, creds, Path("/data/site-a"), state_dir=tmp_path / "home")
    assert parse_config_args([node_config(with_state)])["round-state-dir"] == str(tmp_path / "home" / "round-state")
    argv = supernode_command(cfg)
    assert argv[argv.index("--root-certificates") + 1] == str(creds / "ca.crt")
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(creds / "sites" / "site-a.key")
    assert "--insecure" not in argv


def test_supernode_waits_at_most_poll_interval_s_between_asking_for_messages(tmp_path, creds, monkeypatch):
    import time

    import flwr.supernode.start_client_internal as loop

    from client.supernode import LOCAL_WAIT_S, bound_supernode_waits

    argv = supernode_command(_site(tmp_path, creds, Path("/d"), poll_interval_s=0.5))
    assert argv[1:5] == ["-m", "client.supernode", "--poll-interval-s", "0.5"]
    # What it bounds: Flower 1.41's idle wait in the SuperNode's message loop, and its 0.5 s waits for a reply in
    # its own state (a newer flwr may wait elsewhere).
    assert "time.sleep(3)" in inspect.getsource(loop.start_client_internal)
    assert "time.sleep(0.5)" in inspect.getsource(loop._push_messages)
    monkeypatch.setattr(loop, "time", loop.time)  # put back after the test
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    bound_supernode_waits(0.5)
    loop.time.sleep(3)
    loop.time.sleep(0.5)
    loop.time.sleep(0.02)
    assert slept == [0.5, LOCAL_WAIT_S, 0.02] and loop.time.monotonic is time.monotonic
    bound_supernode_waits(0.03)  # a poll interval below the local bound bounds both
    loop.time.sleep(3)
    loop.time.sleep(0.5)
    assert slept[-2:] == [0.03, 0.03]


def test_poll_interval_defaults_to_flowers_3_s_and_must_be_at_least_0_1_s(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("name: a\ncoordinator: h:1\ninsecure: true\ndata_path: /d\n")
    assert load_site_config(config).poll_interval_s == 3.0
    config.write_text(config.read_text() + "poll_interval_s: 0.05\n")
    with pytest.raises(SiteConfigError, match="poll_interval_s must be a number >= 0.1, got 0.05"):
        load_site_config(config)


def test_superlink_uses_tls_and_node_auth_unless_insecure(tmp_path, creds):
    secure = superlink_command(CoordinatorSettings(certs_dir=creds, state_dir=tmp_path))
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in secure
    assert secure[secure.index("--database") + 1] == str(tmp_path.resolve() / "superlink.db")
    assert "--insecure" not in secure
    insecure = superlink_command(CoordinatorSettings(certs_dir=None, state_dir=tmp_path, insecure=True))
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert not any(a.startswith("--ssl") for a in insecure)
    assert "--database" not in superlink_command(CoordinatorSettings(certs_dir=creds, in_memory=True))


def test_flower_process_stop_ends_detached_grandchildren(tmp_path):
    import psutil

    from client.daemon import FlowerProcess

    # Like flower-superlink, the child detaches a grandchild into its own session.
    pid_file = tmp_path / "grandchild.pid"
    proc = FlowerProcess(["bash", "-c", f"setsid sleep 300 & echo $! > {pid_file}; wait"], stop_timeout_s=5)
    proc.start()
    while not pid_file.exists() or not pid_file.read_text().strip():
        pass
    grandchild = psutil.Process(int(pid_file.read_text()))
    proc.stop()
    grandchild.wait(timeout=5)  # raises if it is still running
    assert not grandchild.is_running()


def test_flower_process_failed_health_check_stops_it():
    from client.daemon import FlowerProcess

    proc = FlowerProcess(["sleep", "300"], stop_timeout_s=5)
    called = []
    assert proc.run_in_foreground(health_check=lambda: False, health_interval_s=0.0,
                                  before_requested_stop=lambda: called.append(True)) != 0
    assert proc.unhealthy and proc.poll() is not None
    assert called == []  # only a requested stop runs it


def test_flower_process_runs_before_requested_stop_on_sigterm_while_the_process_still_runs():
    import os
    import signal

    from client.daemon import FlowerProcess

    proc = FlowerProcess(["sleep", "300"], stop_timeout_s=5)

    def sigterm_to_this_process() -> bool:  # the loop's hook: what an operator's SIGTERM does, from inside
        os.kill(os.getpid(), signal.SIGTERM)
        return True

    seen = []
    assert proc.run_in_foreground(health_check=sigterm_to_this_process, health_interval_s=0.0,
                                  before_requested_stop=lambda: seen.append(proc.poll())) == 0
    assert seen == [None] and proc.poll() is not None  # it ran first, then the process was stopped


def test_coordinator_refuses_missing_server_key(tmp_path, creds):
    broken = tmp_path / "creds"
    broken.mkdir()
    for name in ("ca.crt", "server.crt", "allowed_supernodes.txt"):
        (broken / name).write_bytes((creds / name).read_bytes())
    with pytest.raises(CoordinatorError, match=r"server\.key: cannot read"):
        check_certificates(CoordinatorSettings(certs_dir=broken))
    assert sorted(check_certificates(CoordinatorSettings(certs_dir=creds))) == ["site-a"]


def test_flower_config_holds_one_default_connection(tmp_path, creds):
    path = write_flower_config(tmp_path, "fedtune", "127.0.0.1:8000", creds / "ca.crt")
    assert tomllib.loads(path.read_text()) == {"superlink": {
        "default": "fedtune", "fedtune": {"address": "127.0.0.1:8000", "root-certificates": str(creds / "ca.crt")}}}


def test_overrides_become_a_run_config_flower_accepts(tmp_path):
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    overrides = ["federation.rounds=2", "model=tiny", "model.cache_dir=/tmp/m c", 'data.prompt_template="{x}"',
                 "lora.target_modules=[q_proj,v_proj]"]
    pairs = run_config_pairs(overrides)
    assert pairs == {"federation.rounds": "2", "model": "tiny", "model.cache_dir": "/tmp/m c",
                     "data.prompt_template": '"{x}"', "lora.target_modules": "[q_proj,v_proj]"}
    argument = run_config_argument(pairs)
    assert argument == ('"federation.rounds"="2" "model"="tiny" "model.cache_dir"="/tmp/m c" '
                        '"data.prompt_template"=\'"{x}"\' "lora.target_modules"="[q_proj,v_proj]"')
    assert parse_config_args([argument]) == pairs
    before = (REPO / "pyproject.toml").read_bytes()
    app = copy_app(tmp_path / "app", REPO, declare=pairs)
    assert (REPO / "pyproject.toml").read_bytes() == before
    # Flower's own check (the one that answers "[code: 15] Invalid run configuration"): every key is declared.
    fused = get_fused_config_from_dir(app, parse_config_args([argument]))
    assert {k: fused[k] for k in pairs} == pairs
    assert not (app / "tests").exists() and (app / "server" / "app.py").exists()
    with pytest.raises(ValueError, match="expected key=value"):
        run_config_pairs(["+extra=1"])


def test_keys_subcommand_writes_private_keys_0600(tmp_path):
    from simulations.cli import main

    assert main(["keys", "--out", str(tmp_path), "--host", "coord.example.org", "--sites", "a", "b"]) == 0
    for path in (tmp_path / "ca.key", tmp_path / "server.key", tmp_path / "sites" / "a.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len((tmp_path / "allowed_supernodes.txt").read_text().splitlines()) == 2


def test_restarted_coordinator_stops_runs_left_running_by_the_previous_one(tmp_path, monkeypatch, caplog):
    """A run whose ServerApp died with the coordinator is stopped at the next start; newer or finished runs are not."""
    import logging
    import subprocess
    from datetime import UTC, datetime

    import server.coordinator as coordinator

    runs = [{"run-id": "11", "status": "running", "running-at": "2026-01-01 09:59:58Z"},  # abandoned
            {"run-id": "12", "status": "running", "running-at": "2026-01-01 10:00:00Z"},  # launched after the start
            {"run-id": "13", "status": "finished:completed", "running-at": "2026-01-01 09:00:00Z"},
            {"run-id": "14", "status": "pending", "running-at": "N/A"}]
    calls = []

    def fake_flwr(args, flwr_home, *rest, **kwargs):
        calls.append(list(args))
        stdout = json.dumps({"success": True, "runs": runs}) if args[0] == "ls" else '{"success": true}'
        return subprocess.CompletedProcess(args, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(coordinator, "run_flwr", fake_flwr)
    settings = CoordinatorSettings(certs_dir=None, state_dir=tmp_path, insecure=True)
    with caplog.at_level(logging.WARNING, logger="fedtune.coordinator"):
        stopped = coordinator.stop_abandoned_runs(settings, tmp_path / "flwr", datetime(2026, 1, 1, 10, tzinfo=UTC))
    assert stopped == ["11"]
    assert [c for c in calls if c[0] == "stop"] == [["stop", "11", "fedtune", "--format", "json"]]
    assert "run 11 was still running when the coordinator went down" in caplog.text
    assert coordinator.stop_abandoned_runs(CoordinatorSettings(certs_dir=None, in_memory=True), tmp_path,
                                           datetime.now(UTC)) == []
