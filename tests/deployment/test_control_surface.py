"""The coordinator's public port as an outsider sees it: only the Fleet API answers; the Control API is loopback-only.

Real processes on 127.0.0.1: `fedtune coordinator` (TLS + site authentication) and one `fedtune site` daemon.
The outsider holds the federation's public ca.crt and tries what the Control API offers: list runs, list and
register SuperNodes, launch and stop runs. (A stolen site key would not help: the gateway refuses by path before
any credential is looked at; with it one can only act as that site on the Fleet API.) The operator, on the coordinator
host, launches a run that the registered site trains.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.deployment.procs import Processes, free_port, tail, wait_for

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 90
RUN_TIMEOUT_S = 200
SITE = "site-a"
# One site: the run may not wait for a second one.
ONE_SITE_OVERRIDES = ["model=tiny", "train.local_steps=2", "train.batch_size=4", "federation.rounds=1",
                      "strategy.fraction_evaluate=0.0", "federation.evaluate_before_training=false",
                      "strategy.min_train_clients=1", "strategy.min_evaluate_clients=1",
                      "strategy.min_available_clients=1", "federation.round_timeout_s=90"]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """(root, Processes, public port, control port, creds dir, coordinator state dir) with one site connected."""
    from federation.config import DemoTaskConfig
    from federation.demo_task import generate_demo_task
    from federation.pki import generate_federation_credentials

    root = tmp_path_factory.mktemp("control-surface")
    creds = root / "creds"
    generate_federation_credentials(creds, ["127.0.0.1"], [SITE])
    train, _ = generate_demo_task(DemoTaskConfig(examples_per_skill=16, eval_examples_per_skill=4))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train if r["source"] == "reverse"))
    env = {**os.environ, "HOME": str(root), "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    procs = Processes(root, env, REPO)
    port, control_port = free_port(), free_port()
    state_dir = root / "coordinator"
    site_yaml = root / "site.yaml"
    site_yaml.write_text(json.dumps({
        "name": SITE, "coordinator": f"127.0.0.1:{port}", "ca_cert": str(creds / "ca.crt"),
        "private_key": str(creds / "sites" / f"{SITE}.key"), "data_path": str(data), "device": "cpu",
        "clientappio_port": free_port(), "state_dir": str(root / "home-site")}))
    try:
        procs.start("coordinator", [sys.executable, "-m", "simulations.cli", "coordinator", "--certs", str(creds),
                                    "--host", "127.0.0.1", "--port", str(port), "--control-port", str(control_port),
                                    "--state-dir", str(state_dir)])
        wait_for(lambda: "coordinator ready" in procs.log("coordinator")
                 or procs.procs["coordinator"].poll() is not None,
                 STARTUP_TIMEOUT_S, "the coordinator", lambda: tail(procs.log("coordinator")))
        assert "coordinator ready" in procs.log("coordinator"), tail(procs.log("coordinator"))
        procs.start("site", [sys.executable, "-m", "simulations.cli", "site", "--config", str(site_yaml)])
        wait_for(lambda: "Activated node_id=" in procs.log("coordinator"), STARTUP_TIMEOUT_S, "the site to join",
                 lambda: tail(procs.log("site")))
        yield root, procs, port, control_port, creds, state_dir
    finally:
        procs.stop_all()


def _outsider_flwr(root: Path, port: int, creds: Path, *args: str):
    """The `flwr` CLI of someone holding ca.crt, pointed at the coordinator's public port."""
    from server.coordinator import run_flwr, write_flower_config

    home = root / "outsider-flwr"
    write_flower_config(home, "target", f"127.0.0.1:{port}", creds / "ca.crt")
    return run_flwr([*args], home, timeout_s=60)


@pytest.mark.timeout(300)
def test_outsider_on_the_public_port_cannot_list_register_launch_or_stop(coordinator):
    import httpx

    root, procs, port, control_port, creds, state_dir = coordinator
    import ssl

    ca = ssl.create_default_context(cafile=str(creds / "ca.crt"))
    # Raw HTTP: every Control API route is refused at the gateway, whatever the headers.
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/stop-run",
                 "/v1/control/register-node", "/v1/control/list-nodes", "/health", "/docs"):
        for method in ("GET", "POST"):
            answer = httpx.request(method, f"https://127.0.0.1:{port}{path}", verify=ca, timeout=10)
            assert answer.status_code == 404, (method, path, answer.status_code)
    # A path that only looks like the Fleet API, and a non-POST Fleet call, are refused too.
    assert httpx.post(f"https://127.0.0.1:{port}/v1/fleet/../control/list-runs", verify=ca).status_code == 404
    assert httpx.get(f"https://127.0.0.1:{port}/v1/fleet/get-run", verify=ca).status_code == 404

    # Flower's own CLI, as the outsider would use it.
    listing = _outsider_flwr(root, port, creds, "ls", "target")
    assert listing.returncode != 0, listing.stdout + listing.stderr
    nodes = _outsider_flwr(root, port, creds, "supernode", "ls", "target")
    assert nodes.returncode != 0, nodes.stdout + nodes.stderr
    from federation.pki import generate_site_keys, openssh_public_key_line

    rogue = generate_site_keys(root / "rogue-keys", ["rogue"]).sites["rogue"]
    pub = root / "rogue.pub"
    from cryptography.hazmat.primitives import serialization

    rogue_key = serialization.load_ssh_private_key(rogue.private_key_path.read_bytes(), password=None)
    pub.write_text(openssh_public_key_line(rogue_key.public_key(), comment="rogue") + "\n")
    register = _outsider_flwr(root, port, creds, "supernode", "register", str(pub), "target")
    assert register.returncode != 0, register.stdout + register.stderr
    stop = _outsider_flwr(root, port, creds, "stop", "1", "target")
    assert stop.returncode != 0, stop.stdout + stop.stderr
    launch = procs.start("outsider-launch", [sys.executable, "-m", "simulations.cli", "launch", "--address",
                                             f"127.0.0.1:{port}", "--ca", str(creds / "ca.crt"), *ONE_SITE_OVERRIDES])
    assert launch.wait(timeout=120) != 0, tail(procs.log("outsider-launch"))

    # Nothing of that reached the SuperLink: no run exists and the rogue key is not registered.
    from server.coordinator import run_flwr

    operator_home = state_dir / "flwr"
    runs = run_flwr(["ls", "fedtune", "--format", "json"], operator_home)
    assert runs.returncode == 0, runs.stdout + runs.stderr
    assert '"run-id"' not in runs.stdout, runs.stdout
    supernodes = run_flwr(["supernode", "ls", "fedtune", "--format", "json"], operator_home)
    assert supernodes.returncode == 0 and "rogue" not in supernodes.stdout, supernodes.stdout
    assert "refused" in procs.log("coordinator")


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_operator_launches_on_the_coordinator_host_and_the_registered_site_trains(coordinator):
    root, procs, port, control_port, creds, state_dir = coordinator
    run_dir = root / "run"
    launch = procs.start("operator-launch", [
        sys.executable, "-m", "simulations.cli", "launch", "--connection", "fedtune", "--flwr-home",
        str(state_dir / "flwr"), "--stream", *ONE_SITE_OVERRIDES, f"model.cache_dir={root / 'model-cache'}",
        f"output_dir={run_dir}"])
    code = launch.wait(timeout=RUN_TIMEOUT_S)
    assert code == 0, tail(procs.log("operator-launch"), 80)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["clients_ok"] == 1, rows[-1]
    assert (run_dir / "global_adapter" / "adapter_model.safetensors").exists()
