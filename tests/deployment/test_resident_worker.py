"""The site's resident ClientApp worker (client/worker.py) and FAB approval (client/approval.py) in a real deployment.

Fast in-process checks of the daemon's side first; then one coordinator and two `fedtune site` daemons on 127.0.0.1
(TLS + node auth, real processes) serve, in order: an honest 3-round run (with evaluation), a run whose FAB
carries a modified ClientApp that would send the site's training data to the coordinator, and a second honest
run; then one site's worker is killed and the daemon starts a new one. Every process is started in its own
session and killed with its whole tree at the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from pathlib import Path

import pytest

from client.daemon import (ResidentWorker, SiteConfig, SiteConfigError, load_site_config, supernode_command,
                           worker_command)
from tests.deployment.procs import Processes, free_port, tail, wait_for

REPO = Path(__file__).resolve().parents[2]
SITES = ("site-a", "site-b")
SKILLS = {"site-a": "reverse", "site-b": "uppercase"}
BASE_MODEL_LOADED = "base model loaded"
WORKER_READY = "resident ClientApp worker ready"
STARTUP_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300
OVERRIDES = ["model=tiny", "train.local_steps=2", "train.batch_size=4", "federation.evaluate_before_training=false",
             "federation.round_timeout_s=90"]
# The modified ClientApp: its train handler reads the site's training file and sends it to the coordinator
# inside the error reason, which an honest coordinator logs and writes to metrics.jsonl ("failed").
ROGUE_ANCHOR = "def train(msg: Message, context: Context) -> Message:\n"
ROGUE_TRAIN = ("    from pathlib import Path as _P\n"
               "    _data = (_P(str(context.node_config['data-path'])) / 'train.jsonl').read_text()\n"
               "    raise RuntimeError('EXFILTRATED ' + _data)\n")


# ------------------------------------------------------------------------------------- fast, no processes


def _site_yaml(path: Path, **settings) -> Path:
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    return path


def test_approved_fab_hashes_are_read_from_site_yaml(tmp_path):
    digest = "ab" * 32
    cfg = load_site_config(_site_yaml(tmp_path / "s.yaml", name="a", coordinator="h:1", insecure=True,
                                      data_path="d", approved_fab_hashes=[digest.upper()]))
    assert cfg.approved_fab_hashes == [digest]
    assert worker_command(cfg)[-2:] == ["--approved-fab-hash", digest]
    assert load_site_config(_site_yaml(tmp_path / "t.yaml", name="a", coordinator="h:1", insecure=True,
                                       data_path="d")).approved_fab_hashes == []


@pytest.mark.parametrize("value", ["ab" * 32, ["not-a-hash"], ["ab" * 31]])
def test_approved_fab_hashes_that_are_not_sha256_digests_fail_naming_the_key(tmp_path, value):
    with pytest.raises(SiteConfigError, match="approved_fab_hashes"):
        load_site_config(_site_yaml(tmp_path / "s.yaml", name="a", coordinator="h:1", insecure=True,
                                    data_path="d", approved_fab_hashes=value))


def test_supernode_spawns_no_clientapp_and_the_worker_polls_its_runtime_api(tmp_path):
    cfg = SiteConfig(name="a", coordinator="h:1", ca_cert=None, private_key=None, data_path=tmp_path,
                     insecure=True, clientappio_port=9123)
    argv = supernode_command(cfg)
    assert argv[argv.index("--isolation") + 1] == "process"
    assert argv[argv.index("--port") + 1] == "9123"
    assert worker_command(cfg)[1:] == ["-m", "client.worker", "--runtime-api-address", "127.0.0.1:9123"]


def test_resident_worker_is_restarted_after_it_dies(tmp_path, monkeypatch):
    import client.daemon as daemon

    monkeypatch.setattr(daemon, "worker_command", lambda cfg: ["sleep", "300"])
    worker = ResidentWorker(SiteConfig(name="a", coordinator="h:1", ca_cert=None, private_key=None,
                                       data_path=tmp_path, insecure=True), stop_timeout_s=5)
    worker.start()
    try:
        first = worker.process.process
        assert worker.keep_alive() and worker.process.process is first and worker.restarts == 0
        first.kill()
        first.wait(timeout=5)
        assert worker.keep_alive()
        assert worker.restarts == 1 and worker.process.process is not first and worker.process.poll() is None
    finally:
        worker.stop()
    assert worker.process.poll() is not None


# ------------------------------------------------------------------------------------ real processes


def _write_site_data(root: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Each site's data, with one secret example (a canary) that must never reach the coordinator."""
    from federation.config import DemoTaskConfig
    from federation.demo_task import generate_demo_task

    train, held_out = generate_demo_task(DemoTaskConfig(skills=list(SKILLS.values()), examples_per_skill=8,
                                                        eval_examples_per_skill=4))
    paths, canaries = {}, {}
    for site, skill in SKILLS.items():
        canary = f"CANARY-{site}-{secrets.token_hex(8)}"
        secret = {"instruction": "patient record", "input": "", "output": canary, "source": skill}
        directory = root / "data" / site
        directory.mkdir(parents=True)
        (directory / "train.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in [*(r for r in train if r["source"] == skill), secret]))
        (directory / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out if r["source"] == skill))
        paths[site], canaries[site] = directory, canary
    return paths, canaries


def _rogue_app(dest: Path) -> Path:
    """A copy of the project whose client/app.py train handler exfiltrates the site's training file."""
    from server.coordinator import APP_ENTRIES

    dest.mkdir(parents=True)
    for name in APP_ENTRIES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    secagg = dest / "client" / "app.py"
    text = secagg.read_text()
    assert text.count(ROGUE_ANCHOR) == 1, "client/app.py changed: update ROGUE_ANCHOR"
    secagg.write_text(text.replace(ROGUE_ANCHOR, ROGUE_ANCHOR + ROGUE_TRAIN))
    return dest


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _texts_under(directory: Path) -> str:
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in directory.rglob("*") if p.is_file())


@pytest.mark.timeout(3 * RUN_TIMEOUT_S + 2 * STARTUP_TIMEOUT_S)
def test_resident_worker_loads_base_once_and_refuses_a_modified_clientapp(tmp_path):
    from federation.pki import generate_federation_credentials

    creds = tmp_path / "creds"
    generate_federation_credentials(creds, ["127.0.0.1"], list(SITES))
    data, canaries = _write_site_data(tmp_path)
    env = {**os.environ, "HOME": str(tmp_path), "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    procs = Processes(tmp_path, env, REPO)
    port = free_port()
    state_dir = tmp_path / "coordinator"
    cli = [sys.executable, "-m", "simulations.cli"]

    def launch(name: str, run_dir: Path, *overrides: str, app_dir: Path = REPO) -> int:
        launch_args = [*OVERRIDES, f"model.cache_dir={tmp_path / 'model-cache'}", f"output_dir={run_dir}", *overrides]
        code = (f"import sys; from server.coordinator import launch; code, _ = launch({launch_args!r}, "
                f"connection='fedtune', flwr_home={str(state_dir / 'flwr')!r}, stream=True, "
                f"app_dir={str(app_dir)!r}, timeout_s={RUN_TIMEOUT_S}); sys.exit(code)")
        proc = procs.start(name, [sys.executable, "-c", code])
        return proc.wait(timeout=RUN_TIMEOUT_S + 30)

    def site_logs() -> str:
        return "\n".join(f"--- {s}\n{tail(procs.log(s), 30)}" for s in SITES)

    try:
        procs.start("coordinator", [*cli, "coordinator", "--certs", str(creds), "--host", "127.0.0.1", "--port",
                                    str(port), "--state-dir", str(state_dir)])
        wait_for(lambda: "coordinator ready" in procs.log("coordinator"), STARTUP_TIMEOUT_S, "the coordinator",
                 lambda: tail(procs.log("coordinator")))
        node_ids = {name: entry["node_id"] for name, entry in json.loads((state_dir / "sites.json").read_text()).items()}
        for site in SITES:
            config = _site_yaml(tmp_path / f"{site}.yaml", name=site, coordinator=f"127.0.0.1:{port}",
                                ca_cert=str(creds / "ca.crt"), private_key=str(creds / "sites" / f"{site}.key"),
                                data_path=str(data[site]), device="cpu", clientappio_port=free_port(),
                                state_dir=str(tmp_path / f"home-{site}"))
            procs.start(site, [*cli, "site", "--config", str(config)])
        wait_for(lambda: all(f"Activated node_id={n}" in procs.log("coordinator") for n in node_ids.values()),
                 STARTUP_TIMEOUT_S, "both sites to be activated", site_logs)

        # 1. An honest run: 3 rounds of train + evaluate messages.
        first = tmp_path / "run-1"
        assert launch("launch-1", first, "federation.rounds=3") == 0, tail(procs.log("launch-1"), 80)
        rows = _metrics(first)
        assert [r["round"] for r in rows] == [1, 2, 3]
        assert all(r["clients_ok"] == 2 and r["eval_loss"] is not None for r in rows), rows

        # 2. A run whose FAB carries the exfiltrating ClientApp: refused at every site before any of its code runs.
        rogue = tmp_path / "run-rogue"
        launch("launch-rogue", rogue, "federation.rounds=1", "strategy.fraction_evaluate=0.0",
               app_dir=_rogue_app(tmp_path / "rogue-app"))
        rows = _metrics(rogue)
        assert [r["round"] for r in rows] == [1], tail(procs.log("launch-rogue"), 80)
        assert rows[0]["clients_ok"] == 0 and not rows[0]["aggregated"], rows[0]
        assert sorted(rows[0]["failed"]) == sorted(str(n) for n in node_ids.values()), rows[0]
        for reason in rows[0]["failed"].values():
            assert "is not approved by this site: client/app.py differs" in reason, reason
        for site in SITES:
            assert "REFUSED run" in procs.log(site) and "client/app.py differs" in procs.log(site), site_logs()
            assert "EXFILTRATED" not in procs.log(site)
        coordinator_side = _texts_under(rogue) + procs.log("coordinator") + procs.log("launch-rogue")
        for canary in canaries.values():
            assert canary not in coordinator_side

        # 3. The next honest run works, still on the base model each worker loaded for run 1.
        second = tmp_path / "run-2"
        assert launch("launch-2", second, "federation.rounds=2") == 0, tail(procs.log("launch-2"), 80)
        assert [r["clients_ok"] for r in _metrics(second)] == [2, 2]

        for site in SITES:
            output = procs.log(site)
            # 5 train + 5 evaluate + 1 refused train message, all served by one resident worker.
            assert output.count("Receiving: train message") >= 6, tail(output, 60)
            assert output.count("Receiving: evaluate message") >= 5, tail(output, 60)
            assert output.count(BASE_MODEL_LOADED) == 1, tail(output, 60)
            assert "resident ClientApp worker exited" not in output and output.count(WORKER_READY) == 1
        for canary in canaries.values():
            assert canary not in procs.log("coordinator")

        # 4. A worker that dies is replaced by the daemon.
        import psutil

        daemon = psutil.Process(procs.procs["site-a"].pid)
        workers = [p for p in daemon.children(recursive=True) if "client.worker" in " ".join(p.cmdline())]
        assert len(workers) == 1, [p.cmdline() for p in daemon.children(recursive=True)]
        workers[0].kill()
        wait_for(lambda: procs.log("site-a").count(WORKER_READY) == 2, STARTUP_TIMEOUT_S,
                 "site-a's daemon to start a new worker", lambda: tail(procs.log("site-a")))
        assert "the resident ClientApp worker exited (code -9); restarting it" in procs.log("site-a")
    finally:
        procs.stop_all()


def test_the_modified_clientapp_really_exfiltrates_when_its_code_runs(tmp_path):
    """Positive control for the test above: the rogue train handler, if executed, puts the data in its reply."""
    import importlib.util

    from flwr.app import Context, RecordDict

    from tests.flower_messages import instruction

    data, canaries = _write_site_data(tmp_path)
    rogue = _rogue_app(tmp_path / "rogue-app")
    spec = importlib.util.spec_from_file_location("rogue_app", rogue / "client" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    message = instruction(RecordDict(), dst_node_id=1)
    context = Context(run_id=1, node_id=1, node_config={"data-path": str(data["site-a"])}, state=RecordDict(),
                      run_config={})
    with pytest.raises(RuntimeError, match=canaries["site-a"]):
        module.app(message, context)
