"""A real deployment on 127.0.0.1: `fedtune coordinator` + 3 `fedtune site` daemons, separate processes, over TLS
with SuperNode authentication, and its runs. `fedtune launch` runs as a process where a test needs one (a run watched
while it goes, a launch killed, the outsider's); the other runs are launched from the test process (Deployment.launch:
the same launch() and exit code, less the ~8 s of CPU a launch process spends on imports).

One coordinator and three sites (tests/deployment/conftest.py, shared with test_resident_worker.py) serve the
whole module; the tests run in file order and the last one kills and restarts the coordinator. One uninterrupted two-round run (fixture ``two_round_run``)
is both the happy path and the reference that the resumed run must reproduce bit for bit. Evaluation is switched
off (strategy.fraction_evaluate=0, federation.evaluate_before_training=false) to keep the module short; the
resident worker that answers each site's messages, with evaluation on, is tested in test_resident_worker.py.
Every process is started in its own session and killed with its whole tree at the end, pass or fail.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.deployment.conftest import FAST_OVERRIDES, SITES, Deployment, site_yaml as _site_yaml
from tests.deployment.procs import free_port, tail, wait_for

RUN_TIMEOUT_S = 200
RESUME_ROUND_TIMEOUT_S = 150


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _sha256(path: Path) -> str:
    from federation.store import sha256_file

    return sha256_file(path)


@pytest.mark.timeout(240)
def test_site_whose_key_is_not_on_the_allow_list_is_refused(deployment):
    from cryptography.hazmat.primitives import serialization

    from federation.pki import generate_site_keys

    rogue = generate_site_keys(deployment.root / "rogue-keys", ["rogue"]).sites["rogue"]
    config = _site_yaml(deployment.root / "rogue.yaml", name="rogue", coordinator=f"127.0.0.1:{deployment.port}",
                        ca_cert=str(deployment.creds / "ca.crt"), private_key=str(rogue.private_key_path),
                        data_path=str(deployment.root / "data" / "site-a"),
                        clientappio_port=free_port(), state_dir=str(deployment.root / "home-rogue"))
    # Default rejoin_timeout_s (90 s): a site with a state_dir and no earlier session of its own is refused at once.
    proc = deployment.procs.start("rogue", [sys.executable, "-m", "simulations.cli", "site", "--config", str(config)])
    code = proc.wait(timeout=60)
    output = deployment.procs.log("rogue")
    assert code != 0, tail(output)
    assert "[code: 2004] Failed to activate SuperNode." in output, tail(output)
    assert "REFUSED by the coordinator" in output, tail(output)
    # The SuperLink logs the refused key: it is the rogue's, and no node was created for it.
    private_key = serialization.load_ssh_private_key(rogue.private_key_path.read_bytes(), password=None)
    rogue_pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    coordinator_log = deployment.procs.log("coordinator")
    assert f"Attempted to register SuperNode with public key: {rogue_pem!r}" in coordinator_log
    assert coordinator_log.count("Created node_id=") == len(SITES)


@pytest.mark.timeout(60)
def test_plaintext_client_cannot_connect_to_the_tls_coordinator(deployment):
    import httpx

    with pytest.raises(httpx.HTTPError):  # the port speaks only TLS
        httpx.get(f"http://127.0.0.1:{deployment.port}/health", timeout=5.0)
    config = _site_yaml(deployment.root / "plaintext.yaml", name="plaintext",
                        coordinator=f"127.0.0.1:{deployment.port}", insecure=True, max_retries=1,
                        data_path=str(deployment.root / "data" / "site-a"), clientappio_port=free_port(),
                        rejoin_timeout_s=0)
    proc = deployment.procs.start("plaintext", [sys.executable, "-m", "simulations.cli", "site", "--config",
                                                str(config)])
    code = proc.wait(timeout=45)
    output = deployment.procs.log("plaintext")
    assert code != 0, tail(output)
    assert "Failed to initialize the connection to the SuperLink" in output, tail(output)
    assert "SuperNode ID:" not in output


@pytest.mark.timeout(300)
def test_outsider_on_the_public_port_cannot_list_register_launch_or_stop(deployment):
    """The public port serves only the Fleet API (server/fleet_gateway.py); the Control API is loopback-only.

    The outsider holds the federation's public ca.crt and tries what the Control API offers. (A stolen site key
    would not help: the gateway refuses by path before any credential is looked at.)
    """
    import ssl

    import httpx
    from cryptography.hazmat.primitives import serialization

    from federation.pki import generate_site_keys, openssh_public_key_line
    from server.coordinator import run_flwr, write_flower_config

    port, root = deployment.port, deployment.root
    ca = ssl.create_default_context(cafile=str(deployment.creds / "ca.crt"))
    runs_before = run_flwr(["ls", "fedtune", "--format", "json"], deployment.flwr_home)
    assert runs_before.returncode == 0, runs_before.stdout + runs_before.stderr
    # Raw HTTP: every Control API route is refused at the gateway, whatever the method.
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/stop-run",
                 "/v1/control/register-node", "/v1/control/list-nodes", "/health", "/docs"):
        for method in ("GET", "POST"):
            answer = httpx.request(method, f"https://127.0.0.1:{port}{path}", verify=ca, timeout=10)
            assert answer.status_code == 404, (method, path, answer.status_code)
    # A path that only looks like the Fleet API, and a non-POST Fleet call, are refused too.
    assert httpx.post(f"https://127.0.0.1:{port}/v1/fleet/../control/list-runs", verify=ca).status_code == 404
    assert httpx.get(f"https://127.0.0.1:{port}/v1/fleet/get-run", verify=ca).status_code == 404

    # Flower's own CLI, as the outsider would use it.
    outsider = root / "outsider-flwr"
    write_flower_config(outsider, "target", f"127.0.0.1:{port}", deployment.creds / "ca.crt")
    rogue = generate_site_keys(root / "outsider-keys", ["rogue"]).sites["rogue"]
    rogue_key = serialization.load_ssh_private_key(rogue.private_key_path.read_bytes(), password=None)
    pub = root / "outsider-rogue.pub"
    pub.write_text(openssh_public_key_line(rogue_key.public_key(), comment="rogue") + "\n")
    # `fedtune launch` first validates the run config (~8 s of CPU): it runs while the CLI calls are tried, at once.
    launch = deployment.procs.start("outsider-launch", [
        sys.executable, "-m", "simulations.cli", "launch", "--address", f"127.0.0.1:{port}", "--ca",
        str(deployment.creds / "ca.crt"), *FAST_OVERRIDES, f"model.cache_dir={root / 'model-cache'}"])
    attempts = (["ls", "target"], ["supernode", "ls", "target"], ["supernode", "register", str(pub), "target"],
                ["stop", "1", "target"])
    with ThreadPoolExecutor(len(attempts)) as pool:
        results = list(pool.map(lambda argv: run_flwr(argv, outsider, timeout_s=60), attempts))
    for argv, result in zip(attempts, results):
        assert result.returncode != 0, (argv, result.stdout + result.stderr)
    assert launch.wait(timeout=120) != 0, tail(deployment.procs.log("outsider-launch"))

    # Nothing of that reached the SuperLink: no run was added and the rogue key is not registered.
    runs_after = run_flwr(["ls", "fedtune", "--format", "json"], deployment.flwr_home)
    assert runs_after.returncode == 0 and runs_after.stdout.count('"run-id"') == runs_before.stdout.count('"run-id"')
    supernodes = run_flwr(["supernode", "ls", "fedtune", "--format", "json"], deployment.flwr_home)
    assert supernodes.returncode == 0 and "rogue" not in supernodes.stdout, supernodes.stdout
    assert "refused" in deployment.procs.log("coordinator")


@pytest.fixture(scope="module")
def two_round_run(deployment) -> tuple[int, Path]:
    """(launch exit code, run dir) of an uninterrupted two-round run, default config (bf16 uploads, error feedback)."""
    run_dir = deployment.root / "run-happy"
    code = deployment.launch("launch-happy", deployment.fast_overrides("federation.rounds=2", f"output_dir={run_dir}"),
                             timeout_s=RUN_TIMEOUT_S)
    return code, run_dir


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_three_sites_finish_two_rounds_over_tls_with_node_auth(deployment, two_round_run):
    code, run_dir = two_round_run
    output = deployment.procs.log("launch-happy")
    assert code == 0, tail(output, 80)  # --stream: 0 only when Flower reports finished:completed
    rows = _metrics(run_dir)
    all_nodes = sorted(deployment.node_ids.values())
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["missing"] == [] and row["aggregated"], row
        assert sorted(int(n) for n in row["per_site"]) == all_nodes
        # Each site trained on its own examples (its data-path), not on the demo partition.
        assert [row["per_site"][str(deployment.node_ids[s])]["num-examples"] for s in SITES] == \
            [deployment.train_examples[s] for s in SITES]
    assert (run_dir / "global_adapter").resolve().name == "round-0002"
    for site in SITES:
        assert deployment.procs.log(site).count("Receiving: train message") >= 2


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_a_run_where_every_site_fails_makes_launch_exit_1_naming_the_cause(deployment):
    run_dir = deployment.root / "run-failing"
    # The sites run on the CPU (device: cpu), where 4-bit loading is refused: every site fails round 1.
    code = deployment.launch("launch-failing", deployment.fast_overrides(
        "federation.rounds=2", "model.quantization=4bit", f"output_dir={run_dir}"), timeout_s=RUN_TIMEOUT_S)
    output = deployment.procs.log("launch-failing")
    assert code == 1, tail(output, 80)
    assert "did not complete (finished:failed)" in output, tail(output, 80)
    # The coordinator gets the error's type and an incident id (the site's policy.error_details is off); the site's
    # log has the message under that id.
    incident = re.search(r"RuntimeError at the site \(incident ([0-9a-f]{8})", output)
    assert "round 1 aggregated nothing" in output and incident, tail(output, 80)
    site_log = "".join(deployment.procs.log(site) for site in SITES)
    assert re.search(rf"\(incident {incident.group(1)}\)(.|\n)*model.quantization=4bit needs a CUDA device", site_log)
    rows = _metrics(run_dir)
    assert [r["round"] for r in rows] == [1] and not rows[0]["aggregated"]


@pytest.mark.timeout(30)
def test_site_daemon_output_shows_round_examples_and_upload_bytes(deployment):
    if "Receiving: train message" not in deployment.procs.log("site-a"):
        pytest.skip("needs the two-round run above")
    for site in SITES:
        assert f"round 1: trained on {deployment.train_examples[site]} examples" in deployment.procs.log(site)
        assert "uploading" in deployment.procs.log(site)
        # Where the site's round time goes besides training, one line per round.
        assert re.search(r"round 1: outside the [0-9.]+ s training loop: prepare [0-9.]+ s, train-setup -?[0-9.]+ s, "
                         r"delta [0-9.]+ s, encode\+state [0-9.]+ s", deployment.procs.log(site))


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_site_killed_in_round_one_is_missing_and_rejoins(deployment):
    run_dir = deployment.root / "run-dropout"
    node_c = deployment.node_ids["site-c"]
    received_before = deployment.procs.log("site-c").count("Receiving: train message")
    # Rounds wait for all three sites to be connected: without that, rounds of a few seconds could all end while
    # the restarted site-c is still starting (a loaded CI machine took 26 s), and "it rejoins" would go untested.
    launch = deployment.procs.start("launch-dropout", deployment.launch_argv(
        "federation.rounds=3", f"output_dir={run_dir}", f"strategy.min_available_clients={len(SITES)}"))
    round_started = {1: time.monotonic()}
    wait_for(lambda: deployment.procs.log("site-c").count("Receiving: train message") > received_before,
             RUN_TIMEOUT_S, "site-c to receive its round-1 train message",
             lambda: tail(deployment.procs.log("launch-dropout")))
    assert not _metrics(run_dir), "round 1 ended before site-c was killed"
    deployment.procs.kill("site-c")  # SIGKILL: daemon, SuperNode and the ClientApp mid-training
    deployment.procs.start("site-c-restarted", deployment.site_argv("site-c"))
    back_at = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while launch.poll() is None and time.monotonic() < deadline:
        if back_at is None and "SuperNode ID:" in deployment.procs.log("site-c-restarted"):
            back_at = time.monotonic()
        for row in _metrics(run_dir):
            round_started.setdefault(row["round"] + 1, time.monotonic())
        time.sleep(0.2)
    assert launch.poll() == 0, tail(deployment.procs.log("launch-dropout"), 80)
    assert back_at is not None, tail(deployment.procs.log("site-c-restarted"))
    rows = _metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    first = rows[0]
    assert first["missing"] == [node_c], first
    assert first["clients_ok"] == 2 and first["aggregated"], first
    assert str(node_c) not in first["per_site"]
    # The restarted daemon ended the crashed session itself instead of waiting ~60 s for Flower's heartbeat.
    assert "ended the coordinator's stale session" in deployment.procs.log("site-c-restarted")
    # Back online: the first round that started after that (by a clear margin) trained on site-c again.
    later = [r for r in rows if round_started.get(r["round"], float("inf")) > back_at + 1.0]
    assert later, f"no round started after site-c came back ({round_started}, back at {back_at})"
    assert str(node_c) in later[0]["per_site"], later[0]


def _flower_run_id(launch_output: str) -> str:
    match = re.search(r"Successfully started run (\d+)", launch_output)
    assert match, tail(launch_output)
    return match.group(1)


def _train_messages(deployment: Deployment) -> dict[str, int]:
    return {site: deployment.site_log(site).count("Receiving: train message") for site in SITES}


@pytest.mark.timeout(3 * RUN_TIMEOUT_S + 60)
def test_coordinator_killed_mid_round_resumes_bit_identically(deployment, two_round_run):
    """Killed while round 2 trains (after round 1's checkpoint, two sites done with round 2, one still at it): the
    restarted coordinator stops the abandoned Flower run, the resumed run re-runs round 2 from the state the sites
    entered it with (two of them had already saved the state after it), and ends with the uninterrupted run's
    adapter, byte for byte (default config: bf16 uploads with error feedback at the sites)."""
    from client.task import ERROR_FEEDBACK_KEY
    from client.site_state import SiteStateStore
    from server.coordinator import RUN_RUNNING, run_status

    reference_code, reference_dir = two_round_run
    assert reference_code == 0, tail(deployment.procs.log("launch-happy"), 80)
    run_dir = deployment.root / "run-resume"
    received_before = _train_messages(deployment)
    first = deployment.procs.start("launch-resume-1", deployment.launch_argv(
        "federation.rounds=2", f"output_dir={run_dir}", f"federation.round_timeout_s={RESUME_ROUND_TIMEOUT_S}"))
    # Round 2 reached site-c: freeze it there (SIGSTOP, whole tree), so round 2 cannot finish before the kill.
    wait_for(lambda: _train_messages(deployment)["site-c"] >= received_before["site-c"] + 2
             or first.poll() is not None, RUN_TIMEOUT_S, "site-c to receive round 2's train message",
             lambda: tail(deployment.procs.log("launch-resume-1")))
    deployment.procs.send_signal(deployment.site_process("site-c"), signal.SIGSTOP)
    try:
        # The other two train round 2 and save the state they enter round 3 with.
        run_id = json.loads((run_dir / "checkpoints" / "round-0000" / "server_state.json").read_text())[
            "federation_run_id"]
        sites = {site: SiteStateStore(deployment.root / f"home-{site}" / "round-state", run_id) for site in SITES}
        wait_for(lambda: all(sites[s].rounds(ERROR_FEEDBACK_KEY) == [2, 3] for s in ("site-a", "site-b")),
                 RUN_TIMEOUT_S, "site-a and site-b to save their state after round 2",
                 lambda: "\n".join(tail(deployment.site_log(s), 10) for s in SITES))
        deployment.procs.kill("coordinator")  # SIGKILL: SuperLink, SuperExec and the running ServerApp
        deployment.procs.kill("launch-resume-1")
    finally:
        deployment.procs.send_signal(deployment.site_process("site-c"), signal.SIGCONT)
    round_one = run_dir / "checkpoints" / "round-0001"
    assert not (run_dir / "checkpoints" / "round-0002").exists(), "killed too late: round 2 had finished"
    sha_round_one = _sha256(round_one / "adapter_model.safetensors")
    digest_round_one = _metrics(run_dir)[0]["adapter_digest"]
    interrupted = _flower_run_id(deployment.procs.log("launch-resume-1"))

    deployment.start_coordinator("coordinator-restarted")
    # The abandoned Flower run is no longer listed as running.
    assert f"run {interrupted} was still running" in deployment.procs.log("coordinator-restarted")
    status, _ = run_status(interrupted, "fedtune", deployment.flwr_home)
    assert status.startswith("finished:") and status != RUN_RUNNING, status

    # The sites reconnect by themselves, but one that was mid-transfer when the SuperLink died backs off for up
    # to ~60 s (Flower's retry policy), so the resumed round waits longer than the others.
    code = deployment.launch("launch-resume-2", deployment.fast_overrides(
        "federation.rounds=2", f"output_dir={run_dir}", "federation.resume=true",
        f"federation.round_timeout_s={RESUME_ROUND_TIMEOUT_S}"), timeout_s=RUN_TIMEOUT_S)
    output = deployment.procs.log("launch-resume-2")
    assert code == 0, tail(output, 80)
    assert "resuming after round 1" in output
    rows = _metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[1]["start_adapter_digest"] == digest_round_one
    assert rows[1]["clients_ok"] == len(SITES), rows[1]
    assert _sha256(round_one / "adapter_model.safetensors") == sha_round_one
    assert json.loads((round_one / "server_state.json").read_text())["adapter_sha256"] == sha_round_one
    assert (run_dir / "global_adapter").resolve().name == "round-0002"
    # Bit for bit the uninterrupted run's adapter, round by round.
    assert [r["adapter_digest"] for r in rows] == [r["adapter_digest"] for r in _metrics(reference_dir)]
    assert all(sites[s].rounds(ERROR_FEEDBACK_KEY) == [2, 3] for s in SITES)  # round 2's re-run replaced round 3
    assert _sha256(run_dir / "global_adapter" / "adapter_model.safetensors") == \
        _sha256(reference_dir / "global_adapter" / "adapter_model.safetensors")
