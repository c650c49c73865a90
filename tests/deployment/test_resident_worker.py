"""The site's resident ClientApp worker (client/worker.py) and FAB approval (client/approval.py) in a real deployment.

Fast in-process checks of the daemon's side first; then, on the session's deployment (tests/deployment/conftest.py:
one coordinator and three `fedtune site` daemons on 127.0.0.1, TLS + node auth, real processes, after
test_deployment.py's runs), in order: an honest run (one round, with evaluation), a run whose FAB carries a
modified ClientApp that would send the site's training data to the coordinator, and a second honest run; then one
site's worker is killed and the daemon starts a new one. (test_hostile_site.py's honest sites serve seven rounds of
train and evaluate messages each with one resident worker.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from client.daemon import (ResidentWorker, SiteConfig, SiteConfigError, load_site_config, supernode_command,
                           worker_command)
from tests.deployment.conftest import SITES, write_site_data
from tests.deployment.procs import tail, wait_for

REPO = Path(__file__).resolve().parents[2]
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
    assert worker_command(cfg)[1:] == ["-m", "client.worker", "--runtime-api-address", "127.0.0.1:9123",
                                       "--site-policy", cfg.policy.to_json()]


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
def test_resident_worker_loads_base_once_and_refuses_a_modified_clientapp(deployment, tmp_path):
    procs, node_ids, canaries = deployment.procs, deployment.node_ids, deployment.canaries

    def launch(name: str, run_dir: Path, *overrides: str, app_dir: Path = REPO) -> int:
        return deployment.launch(name, [*OVERRIDES, f"model.cache_dir={deployment.model_cache}",
                                        f"output_dir={run_dir}", *overrides], app_dir=app_dir, timeout_s=RUN_TIMEOUT_S)

    def site_logs() -> str:
        return "\n".join(f"--- {s}\n{tail(deployment.site_log(s), 30)}" for s in SITES)

    # The newest daemon of each site (test_deployment.py restarts one) served every message below.
    received = {site: (deployment.site_log(site).count("Receiving: train message"),
                       deployment.site_log(site).count("Receiving: evaluate message")) for site in SITES}
    # 1. An honest run: a train and an evaluate message.
    first = tmp_path / "run-1"
    assert launch("launch-1", first, "federation.rounds=1") == 0, tail(procs.log("launch-1"), 80)
    rows = _metrics(first)
    assert [r["round"] for r in rows] == [1]
    assert all(r["clients_ok"] == len(SITES) and r["eval_loss"] is not None for r in rows), rows

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
        assert "REFUSED run" in deployment.site_log(site) and "client/app.py differs" in deployment.site_log(site), \
            site_logs()
        assert "EXFILTRATED" not in deployment.site_log(site)
    coordinator_side = _texts_under(rogue) + deployment.coordinator_logs() + procs.log("launch-rogue")
    for canary in canaries.values():
        assert canary not in coordinator_side

    # 3. The next honest run works, still on the base model each worker loaded for run 1.
    second = tmp_path / "run-2"
    assert launch("launch-2", second, "federation.rounds=1") == 0, tail(procs.log("launch-2"), 80)
    assert [r["clients_ok"] for r in _metrics(second)] == [len(SITES)]

    for site in SITES:
        output = deployment.site_log(site)
        # 2 train + 2 evaluate + 1 refused train message here (and the earlier runs' messages), all served by
        # one resident worker that loaded the base model once.
        trains, evaluates = received[site]
        assert output.count("Receiving: train message") >= trains + 3, tail(output, 60)
        assert output.count("Receiving: evaluate message") >= evaluates + 2, tail(output, 60)
        assert output.count(BASE_MODEL_LOADED) == 1, tail(output, 60)
        assert "resident ClientApp worker exited" not in output and output.count(WORKER_READY) == 1
    for canary in canaries.values():
        assert canary not in deployment.coordinator_logs()

    # 4. A worker that dies is replaced by the daemon.
    import psutil

    daemon = psutil.Process(procs.procs[deployment.site_process("site-a")].pid)
    workers = [p for p in daemon.children(recursive=True) if "client.worker" in " ".join(p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in daemon.children(recursive=True)]
    workers[0].kill()
    wait_for(lambda: deployment.site_log("site-a").count(WORKER_READY) == 2, STARTUP_TIMEOUT_S,
             "site-a's daemon to start a new worker", lambda: tail(deployment.site_log("site-a")))
    assert "the resident ClientApp worker exited (code -9); restarting it" in deployment.site_log("site-a")


def test_the_modified_clientapp_really_exfiltrates_when_its_code_runs(tmp_path):
    """Positive control for the test above: the rogue train handler, if executed, puts the data in its reply."""
    import importlib.util

    from flwr.app import Context, RecordDict

    from tests.flower_messages import instruction

    data, canaries, _ = write_site_data(tmp_path)
    rogue = _rogue_app(tmp_path / "rogue-app")
    spec = importlib.util.spec_from_file_location("rogue_app", rogue / "client" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    message = instruction(RecordDict(), dst_node_id=1)
    context = Context(run_id=1, node_id=1, node_config={"data-path": str(data["site-a"])}, state=RecordDict(),
                      run_config={})
    with pytest.raises(RuntimeError, match=canaries["site-a"]):
        module.app(message, context)
