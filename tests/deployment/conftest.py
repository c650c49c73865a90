"""One real deployment on 127.0.0.1 for this package's tests: `fedtune coordinator` + 3 `fedtune site` daemons.

test_deployment.py and test_resident_worker.py both run against it (starting a coordinator and its sites costs
~10-30 s, and every daemon's first message loads the base model once more), in file order: test_deployment.py
kills and restarts one site and the coordinator along the way; test_resident_worker.py then counts what the
sites' newest daemons did across all runs. Every process is started in its own session and killed with its whole
tree once the package's tests are done, pass or fail. test_hostile_site.py starts a deployment of its own
(running_deployment), whose third site runs hostile code; its tests run first (pytest_collection_modifyitems).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deployment.procs import Processes, free_port, tail, wait_for

REPO = Path(__file__).resolve().parents[2]
SITES = ("site-a", "site-b", "site-c")
SKILLS = {"site-a": "reverse", "site-b": "uppercase", "site-c": "add"}
COORDINATOR_READY = "coordinator ready"
STARTUP_TIMEOUT_S = 90
ROUND_TIMEOUT_S = 60
# Sites ask for new messages this often (site.yaml poll_interval_s) instead of Flower's 3 s: each round's messages
# (four per SecAgg+ round) would otherwise wait up to 3 s at the coordinator, most of a round of the tiny model.
# Measured on the 2-core VM: test_hostile_site.py 232 -> 185 s; an idle deployment's polling 0.08 -> 0.16 CPU-s/s.
POLL_INTERVAL_S = 0.5
# Small and fast; evaluation off (test_resident_worker.py turns it on for its runs).
FAST_OVERRIDES = ["model=tiny", "train.local_steps=2", "train.batch_size=4", "strategy.fraction_evaluate=0.0",
                  "federation.evaluate_before_training=false", f"federation.round_timeout_s={ROUND_TIMEOUT_S}"]
EXAMPLES_PER_SKILL = 24
# Test files that start a deployment of their own (module-scoped), run before the shared one starts.
OWN_DEPLOYMENT = ("test_hostile_site.py", "test_hostile_coordinator.py")


@dataclass
class Deployment:
    """The session's running federation and where everything is."""

    root: Path
    procs: Processes
    creds: Path
    port: int
    state_dir: Path
    site_configs: dict[str, Path]
    control_port: int = 0  # the SuperLink's loopback port (Control API); 0 would mean --port + 1
    node_ids: dict[str, int] = field(default_factory=dict)
    # site -> its secret training example (must never reach the coordinator), and its training example count
    canaries: dict[str, str] = field(default_factory=dict)
    train_examples: dict[str, int] = field(default_factory=dict)

    @property
    def flwr_home(self) -> Path:
        """The `flwr` connection config the coordinator wrote."""
        return self.state_dir / "flwr"

    @property
    def model_cache(self) -> Path:
        """model.cache_dir of every run (part of the model config: another one would reload the base)."""
        return self.root / "model-cache"

    def coordinator_argv(self) -> list[str]:
        return [sys.executable, "-m", "simulations.cli", "coordinator", "--certs", str(self.creds),
                "--host", "127.0.0.1", "--port", str(self.port), "--control-port", str(self.control_port),
                "--state-dir", str(self.state_dir)]

    def start_coordinator(self, name: str = "coordinator") -> None:
        self.procs.start(name, self.coordinator_argv())
        wait_for(lambda: COORDINATOR_READY in self.procs.log(name) or self.procs.procs[name].poll() is not None,
                 STARTUP_TIMEOUT_S, "the coordinator", lambda: tail(self.procs.log(name)))
        assert COORDINATOR_READY in self.procs.log(name), tail(self.procs.log(name))

    def coordinator_logs(self) -> str:
        """The output of every coordinator process so far (a test may have restarted it)."""
        return "".join(self.procs.log(name) for name in self.procs.procs if name.startswith("coordinator"))

    def site_argv(self, site: str) -> list[str]:
        return [sys.executable, "-m", "simulations.cli", "site", "--config", str(self.site_configs[site])]

    def fast_overrides(self, *overrides: str) -> list[str]:
        """FAST_OVERRIDES, this deployment's model cache, then `overrides`."""
        return [*FAST_OVERRIDES, f"model.cache_dir={self.model_cache}", *overrides]

    def launch_argv(self, *overrides: str) -> list[str]:
        """`fedtune launch --stream` of fast_overrides(*overrides), to run as a process (its exit code, a kill)."""
        return [sys.executable, "-m", "simulations.cli", "launch", "--connection", "fedtune",
                "--flwr-home", str(self.flwr_home), "--stream", *self.fast_overrides(*overrides)]

    def launch(self, name: str, overrides: Sequence[str], app_dir: Path = REPO, timeout_s: float = 300) -> int:
        """`fedtune launch --stream` of `overrides` in this process, its output in log `name`; its exit code.

        What launch_argv runs, less the process: a `fedtune launch` process spends ~8 s of CPU importing torch and
        PEFT to validate the run config, which this process does once.
        """
        from server.coordinator import launch

        with open(self.procs.log_path(name), "a") as log, redirect_stdout(log), redirect_stderr(log):
            code, _ = launch(list(overrides), connection="fedtune", flwr_home=self.flwr_home, stream=True,
                             app_dir=app_dir, timeout_s=timeout_s)
        return code

    def site_process(self, site: str) -> str:
        """The process name of the site's newest daemon (a test may have restarted it as '<site>-restarted')."""
        return [name for name in self.procs.procs if name in (site, f"{site}-restarted")][-1]

    def site_log(self, site: str) -> str:
        """The output of the site's newest daemon."""
        return self.procs.log(self.site_process(site))

    def activations(self, coordinator_log: str = "coordinator") -> dict[int, int]:
        """node id -> how often the SuperLink activated it (from its log)."""
        text = self.procs.log(coordinator_log)
        return {node: text.count(f"Activated node_id={node}") for node in self.node_ids.values()}


def write_site_data(root: Path, skills: Mapping[str, str] = SKILLS
                    ) -> tuple[dict[str, Path], dict[str, str], dict[str, int]]:
    """(data dir, canary, training example count) per site of `skills` (site -> demo skill): its own demo skill
    plus one secret example (a canary that must never reach the coordinator)."""
    from federation.config import DemoTaskConfig
    from federation.demo_task import generate_demo_task

    train, held_out = generate_demo_task(DemoTaskConfig(skills=list(skills.values()),
                                                        examples_per_skill=EXAMPLES_PER_SKILL, eval_examples_per_skill=8))
    paths, canaries, counts = {}, {}, {}
    for site, skill in skills.items():
        canary = f"CANARY-{site}-{secrets.token_hex(8)}"
        secret = {"instruction": "patient record", "input": "", "output": canary, "source": skill}
        records = [*(r for r in train if r["source"] == skill), secret]
        directory = root / "data" / site
        directory.mkdir(parents=True)
        (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (directory / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out if r["source"] == skill))
        paths[site], canaries[site], counts[site] = directory, canary, len(records)
    return paths, canaries, counts


def site_yaml(path: Path, **settings) -> Path:
    """Write a site.yaml of `settings` (strings and mappings as JSON, which YAML reads as is)."""
    path.write_text("".join(f"{k}: {json.dumps(v) if isinstance(v, (str, dict)) else v}\n"
                            for k, v in settings.items()))
    return path


@contextmanager
def running_deployment(root: Path, skills: Mapping[str, str] = SKILLS,
                       site_argv: Callable[[Deployment, str], list[str]] = Deployment.site_argv,
                       site_settings: Mapping[str, Mapping] | None = None) -> Iterator[Deployment]:
    """Coordinator (TLS + node auth) and one registered, connected daemon per site of `skills` (started with
    site_argv(deployment, site)), all under `root`; every process tree is killed on exit. site_settings: more
    site.yaml settings per site (e.g. its policy)."""
    from federation.pki import generate_federation_credentials

    sites = list(skills)
    creds = root / "creds"
    generate_federation_credentials(creds, ["127.0.0.1"], sites)
    data, canaries, counts = write_site_data(root, skills)
    env = {**os.environ, "HOME": str(root), "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    procs = Processes(root, env, REPO)
    port = free_port()
    site_configs = {
        site: site_yaml(root / f"{site}.yaml", name=site, coordinator=f"127.0.0.1:{port}",
                        ca_cert=str(creds / "ca.crt"),
                        private_key=str(creds / "sites" / f"{site}.key"), data_path=str(data[site]),
                        device="cpu", clientappio_port=free_port(), state_dir=str(root / f"home-{site}"),
                        poll_interval_s=POLL_INTERVAL_S, **(site_settings or {}).get(site, {}))
        for site in sites
    }
    dep = Deployment(root=root, procs=procs, creds=creds, port=port, control_port=free_port(),
                     state_dir=root / "coordinator", site_configs=site_configs, canaries=canaries,
                     train_examples=counts)
    try:
        dep.start_coordinator()
        dep.node_ids = {name: entry["node_id"] for name, entry in
                        json.loads((dep.state_dir / "sites.json").read_text()).items()}
        assert sorted(dep.node_ids) == sorted(sites)
        for site in sites:
            procs.start(site, site_argv(dep, site))
        wait_for(lambda: all(n >= 1 for n in dep.activations().values()), STARTUP_TIMEOUT_S,
                 f"all {len(sites)} sites to be activated",
                 lambda: "\n".join(tail(procs.log(s), 15) for s in sites))
        yield dep
    finally:
        procs.stop_all(last=lambda name: name.startswith("coordinator"))


def pytest_collection_modifyitems(items):
    """The tests with deployments of their own (OWN_DEPLOYMENT) before this package's others, in the same slots of
    the session's order.

    Their deployments then never run beside the shared one (`deployment`), which would sit idle meanwhile yet keep
    polling: a second coordinator and more sites taking CPU from the first on a 2-core machine.
    """
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if here in item.path.parents]
    first = sorted((items[i] for i in slots), key=lambda item: item.path.name not in OWN_DEPLOYMENT)  # stable
    for slot, item in zip(slots, first):
        items[slot] = item


@pytest.fixture(scope="package")
def deployment(tmp_path_factory):
    """Coordinator (TLS + node auth) and 3 registered, connected site daemons, stopped when the package is done
    (an idle deployment keeps polling: it must not outlive its tests in a full run)."""
    with running_deployment(tmp_path_factory.mktemp("deployment")) as dep:
        yield dep
