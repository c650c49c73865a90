"""The coordinator of a real federation: Flower's SuperLink over TLS with SuperNode authentication, and run launches.

``fedtune coordinator --certs DIR`` starts ``flower-superlink`` with the TLS certificate and node
authentication from ``fedtune keys``, registers every site public key of the allow-list through the
Control API (``flwr supernode register``), and then stays in the foreground forwarding the
SuperLink's logs until SIGINT/SIGTERM. Everything it keeps lives in ``--state-dir``:

    state_dir/superlink.db       SuperLink database (registered sites, runs) - survives restarts
    state_dir/superlink-home/    the SuperLink's FLWR_HOME (installed app bundles)
    state_dir/flwr/config.toml   a `flwr` CLI connection to this SuperLink (used to register sites)
    state_dir/sites.json         site name -> {node_id, public_key}: names the node ids in metrics.jsonl

A run whose ServerApp died with the previous coordinator process stays ``running`` in the database; at
every start the coordinator stops such runs (``flwr stop``) and logs them: continue one with
``federation.resume=true``.

The ServerApp runs with state_dir as its working directory, so a relative ``output_dir`` ends up there.

``fedtune launch [overrides]`` submits this project's Flower app to a running coordinator, like
``flwr run . <connection> --run-config ...``, with the hydra overrides as run config.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from federation.flower_process import DEFAULT_STOP_TIMEOUT_S, FlowerProcess, flower_env, flower_executable

log = logging.getLogger("fedtune.coordinator")

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000  # public: sites' Fleet API only (server/fleet_gateway.py)
# Flower 1.41 serves Fleet, Control and Runtime APIs on one port; the SuperLink listens on loopback only, on the
# public port + 1 unless --control-port says otherwise.
LOOPBACK = "127.0.0.1"
DEFAULT_STATE_DIR = "fedtune-coordinator"
DEFAULT_CONNECTION = "fedtune"
DEFAULT_STARTUP_TIMEOUT_S = 60.0
DEFAULT_CLI_TIMEOUT_S = 60.0
READY_POLL_S = 0.25
ALLOW_LIST_FILENAME = "allowed_supernodes.txt"
SITES_FILENAME = "sites.json"
SUPEREXEC_CHECK_S = 5.0
# `flwr supernode register` answers this for a key that is registered already (e.g. after a restart
# with the same --state-dir): not an error for us.
ALREADY_REGISTERED = "Public key already in use"
# What `flwr run` bundles into the app (FAB, max 10 MB): the packages the ServerApp and ClientApp
# import, the hydra config and the project file. Tests, simulations and results stay out.
APP_ENTRIES = ("pyproject.toml", "README.md", "LICENSE", "conf", "federation", "client", "server", "strategies")
REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_FINISHED_OK = "finished:completed"
RUN_RUNNING = "running"


class CoordinatorError(RuntimeError):
    """The coordinator cannot start or could not register the sites; the message says why."""


# -------------------------------------------------------------------------------- flwr CLI connection


def write_flower_config(flwr_home: str | Path, connection: str, address: str, ca_cert: str | Path | None,
                        insecure: bool = False) -> Path:
    """Write $FLWR_HOME/config.toml with one SuperLink connection (the default); returns its path."""
    import tomli_w

    entry: dict[str, object] = {"address": address}
    if insecure:
        entry["insecure"] = True
    elif ca_cert is not None:
        entry["root-certificates"] = str(Path(ca_cert).resolve())
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": connection, connection: entry}}))
    return path


def run_flwr(args: Sequence[str], flwr_home: str | Path | None, timeout_s: float = DEFAULT_CLI_TIMEOUT_S,
             cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run the `flwr` CLI with its own FLWR_HOME; output captured."""
    return subprocess.run([flower_executable("flwr"), *args], env=flower_env(flwr_home), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout_s)


# -------------------------------------------------------------------------------------- coordinator


@dataclass
class CoordinatorSettings:
    """How to run the SuperLink; see `fedtune coordinator --help`."""

    certs_dir: Path | None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    insecure: bool = False
    allow_list: Path | None = None
    connection: str = DEFAULT_CONNECTION
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    # Flower's in-memory database instead of state_dir/superlink.db: registrations and run history are redone
    # at every start (node ids change; sites re-activate by key), and nothing large goes through SQLite.
    in_memory: bool = False
    # Loopback port of the SuperLink itself (Control API for the operator); 0: port + 1.
    control_port: int = 0

    @property
    def ca_cert(self) -> Path:
        """The federation's CA certificate."""
        return Path(self.certs_dir) / "ca.crt"

    @property
    def allow_list_path(self) -> Path:
        """The site public keys to register."""
        return Path(self.allow_list) if self.allow_list else Path(self.certs_dir) / ALLOW_LIST_FILENAME

    @property
    def superlink_port(self) -> int:
        """The SuperLink's own port, on 127.0.0.1 only."""
        return self.control_port or self.port + 1

    @property
    def local_address(self) -> str:
        """host:port of the SuperLink (all its APIs, Control included), reachable from this machine only."""
        return f"{LOOPBACK}:{self.superlink_port}"

    @property
    def public_address(self) -> str:
        """host:port the sites dial (the Fleet gateway)."""
        return f"{self.host}:{self.port}"


def check_certificates(settings: CoordinatorSettings) -> dict[str, object]:
    """Read ca.crt, server.crt/.key and the allow-list; returns {site name: public key}. Raises CoordinatorError."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from federation.pki import read_allow_list

    if settings.certs_dir is None:
        raise CoordinatorError("--certs DIR is required (made by `fedtune keys`), unless --insecure")
    certs = Path(settings.certs_dir)
    for name, loader in (("ca.crt", x509.load_pem_x509_certificate), ("server.crt", x509.load_pem_x509_certificate),
                         ("server.key", lambda b: serialization.load_pem_private_key(b, password=None))):
        path = certs / name
        try:
            loader(path.read_bytes())
        except OSError as exc:
            raise CoordinatorError(f"{path}: cannot read ({exc.strerror})") from None
        except (ValueError, TypeError) as exc:
            raise CoordinatorError(f"{path}: not a usable PEM file ({exc})") from None
    try:
        return read_allow_list(settings.allow_list_path)
    except OSError as exc:
        raise CoordinatorError(f"{settings.allow_list_path}: cannot read allow-list ({exc.strerror})") from None
    except ValueError as exc:
        raise CoordinatorError(f"{settings.allow_list_path}: {exc}") from None


def superlink_command(settings: CoordinatorSettings) -> list[str]:
    """Argv of flower-superlink: TLS + SuperNode auth unless insecure, persistent database, no dependency installs."""
    state_dir = Path(settings.state_dir).resolve()
    # Loopback only: the public port is the Fleet gateway's (server/fleet_gateway.py).
    argv = [flower_executable("flower-superlink"), "--host", LOOPBACK, "--port", str(settings.superlink_port),
            # Offline: run the app in this environment instead of `uv sync`-ing its dependencies per run.
            "--disable-runtime-dependency-installation"]
    if not settings.in_memory:
        argv += ["--database", str(state_dir / "superlink.db")]
    if settings.insecure:
        return argv + ["--insecure"]
    certs = Path(settings.certs_dir).resolve()
    return argv + ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.crt"),
                   "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"]


def wait_until_ready(settings: CoordinatorSettings, superlink: FlowerProcess) -> None:
    """Poll the SuperLink's /health endpoint (TLS-verified against the CA) until it answers 200."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per probe otherwise
    scheme, verify = ("http", False) if settings.insecure else ("https", str(settings.ca_cert.resolve()))
    url = f"{scheme}://{settings.local_address}/health"
    deadline = time.monotonic() + settings.startup_timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        code = superlink.poll()
        if code is not None:
            raise CoordinatorError(f"flower-superlink exited with code {code} during startup (see its log above)")
        try:
            if httpx.get(url, verify=verify, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last_error = str(exc)
        time.sleep(READY_POLL_S)
    raise CoordinatorError(f"SuperLink not ready at {url} after {settings.startup_timeout_s:.0f} s: {last_error}")


def _read_sites(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def _unregister(node_id: int, settings: CoordinatorSettings, flwr_home: Path) -> None:
    result = run_flwr(["supernode", "unregister", str(node_id), settings.connection], flwr_home)
    if result.returncode != 0:
        raise CoordinatorError(f"could not unregister node {node_id}: {(result.stdout + result.stderr).strip()}")


def register_sites(settings: CoordinatorSettings, allowed: dict, flwr_home: Path) -> dict[str, dict]:
    """Make the SuperLink's SuperNode registry equal the allow-list; returns and writes state_dir/sites.json.

    Sites that left the allow-list, or whose key changed, are unregistered: with a persistent
    database their old registration would otherwise keep working.
    """
    from federation.pki import openssh_public_key_line

    state_dir = Path(settings.state_dir)
    sites_path = state_dir / SITES_FILENAME
    # A fresh in-memory SuperLink knows no one: register everybody again.
    known = {} if settings.in_memory else _read_sites(sites_path)
    keys_dir = state_dir / "registered-keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    for name, entry in list(known.items()):
        wanted = allowed.get(name)
        if wanted is None or openssh_public_key_line(wanted, comment=name) != entry["public_key"]:
            log.warning("site %s: %s; unregistering node %s", name,
                        "no longer on the allow-list" if wanted is None else "public key changed", entry["node_id"])
            _unregister(int(entry["node_id"]), settings, flwr_home)
            del known[name]
    for name, public_key in allowed.items():
        line = openssh_public_key_line(public_key, comment=name)
        if name in known:
            log.info("site %s: registered already (node %s)", name, known[name]["node_id"])
            continue
        key_file = keys_dir / f"{name}.pub"
        key_file.write_text(line + "\n")
        result = run_flwr(["supernode", "register", str(key_file.resolve()), settings.connection, "--name", name,
                           "--format", "json"], flwr_home)
        output = result.stdout + result.stderr
        match = re.search(r'"node-id"\s*:\s*"?(\d+)', result.stdout)
        if result.returncode == 0 and match:
            known[name] = {"node_id": int(match.group(1)), "public_key": line}
            log.info("site %s: registered as node %s", name, match.group(1))
        elif ALREADY_REGISTERED in output:
            log.warning("site %s: key registered already but not in %s; its node id is unknown", name, sites_path)
        else:
            raise CoordinatorError(f"could not register site {name}: {output.strip()}")
    sites_path.write_text(json.dumps(known, indent=1, sort_keys=True))
    return known


def _flwr_json(result: subprocess.CompletedProcess) -> dict | None:
    """The JSON object that `flwr ... --format json` printed, None if it printed none."""
    start = result.stdout.find("{")
    try:
        return json.loads(result.stdout[start:]) if start >= 0 else None
    except ValueError:
        return None


def stop_abandoned_runs(settings: CoordinatorSettings, flwr_home: Path, superlink_started: datetime) -> list[str]:
    """Stop the runs the database lists as running since before this SuperLink started; returns their ids.

    Their ServerApp died with the previous coordinator (or with Flower's SuperExec), so nothing will ever
    finish them, and `flwr ls` would show them running forever. Runs started by this SuperLink are left alone.
    """
    if settings.in_memory:
        return []  # a fresh in-memory database holds no runs
    result = run_flwr(["ls", settings.connection, "--format", "json"], flwr_home)
    listing = _flwr_json(result)
    if result.returncode != 0 or listing is None:  # not fatal: the federation works, the listing stays stale
        log.error("could not list runs to stop abandoned ones: %s", (result.stdout + result.stderr).strip()[-300:])
        return []
    stopped = []
    for run in listing.get("runs", []):
        running_at = str(run.get("running-at", "N/A"))
        if run.get("status") != RUN_RUNNING or running_at == "N/A" \
                or datetime.fromisoformat(running_at) >= superlink_started:
            continue
        result = run_flwr(["stop", str(run["run-id"]), settings.connection, "--format", "json"], flwr_home)
        if result.returncode == 0:
            stopped.append(str(run["run-id"]))
            log.warning("run %s was still running when the coordinator went down (running since %s); marked it "
                        "stopped. Continue it with `fedtune launch ... output_dir=<its output_dir> "
                        "federation.resume=true`", run["run-id"], running_at)
        else:
            log.error("could not stop abandoned run %s: %s", run["run-id"], (result.stdout + result.stderr).strip())
    return stopped


def run_coordinator(settings: CoordinatorSettings) -> int:
    """Start the SuperLink, register the sites, then forward its logs until it exits or SIGINT/SIGTERM."""
    state_dir = Path(settings.state_dir)
    if settings.insecure:
        log.warning("!" * 78)
        log.warning("INSECURE coordinator: NO TLS and NO SuperNode authentication. Anyone who can reach "
                    "%s can join as a site, read the global adapter and run code here. Test use only.",
                    settings.public_address)
        log.warning("!" * 78)
        allowed = {}
    else:
        allowed = check_certificates(settings)
    state_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = state_dir / "flwr"
    write_flower_config(flwr_home, settings.connection, settings.local_address,
                        None if settings.insecure else settings.ca_cert, insecure=settings.insecure)
    gateway = start_gateway(settings)
    try:
        while True:
            superlink = start_superlink(settings, allowed, flwr_home)
            # Asked to stop: the gateway goes first. Its idle keep-alive connections to the SuperLink would otherwise
            # hold the SuperLink's shutdown (uvicorn waits for them: its TLS close is never answered) until it is
            # killed after stop_timeout_s.
            code = superlink.run_in_foreground(health_check=lambda: _superexec_running(superlink) and gateway.alive,
                                               health_interval_s=SUPEREXEC_CHECK_S, before_requested_stop=gateway.stop)
            if not superlink.unhealthy:
                return code
            if not gateway.alive:
                log.error("the Fleet gateway stopped (%s); restarting it and the SuperLink", gateway.error)
                gateway = start_gateway(settings)
                continue
            # Seen under heavy load with a file database (flwr 1.41): a SQLite "database is locked" answer makes
            # the SuperExec exit, after which no run can start, and the running ServerApp dies with it.
            log.error("Flower's SuperExec (it starts every ServerApp) died; the running run, if any, is lost: "
                      "launch it again with federation.resume=true. Restarting the SuperLink.")
    finally:
        gateway.stop()


def start_gateway(settings: CoordinatorSettings):
    """The public port: TLS, Fleet API only, forwarded to the loopback SuperLink (server/fleet_gateway.py)."""
    from server.fleet_gateway import GatewaySettings, GatewayThread

    certs = None if settings.insecure else Path(settings.certs_dir).resolve()
    gateway = GatewayThread(GatewaySettings(
        listen_host=settings.host, listen_port=settings.port,
        upstream_url=f"{'http' if settings.insecure else 'https'}://{settings.local_address}",
        certfile=None if certs is None else certs / "server.crt", keyfile=None if certs is None else certs / "server.key",
        ca_cert=None if certs is None else certs / "ca.crt"))
    try:
        gateway.start()
    except RuntimeError as exc:
        raise CoordinatorError(str(exc)) from None
    return gateway


def start_superlink(settings: CoordinatorSettings, allowed: dict, flwr_home: Path) -> FlowerProcess:
    """Start flower-superlink, wait until it answers, register the allow-list; returns the running process."""
    state_dir = Path(settings.state_dir)
    superlink = FlowerProcess(superlink_command(settings), env=flower_env(
        state_dir / "superlink-home", {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}),
        cwd=state_dir, stop_timeout_s=settings.stop_timeout_s)
    # Flower's run timestamps have whole seconds: anything running since before this second is from before.
    started = datetime.now(UTC).replace(microsecond=0)
    superlink.start()
    try:
        wait_until_ready(settings, superlink)
        stop_abandoned_runs(settings, flwr_home, started)
        if allowed:
            sites = register_sites(settings, allowed, flwr_home)
            log.info("coordinator ready on %s (sites: Fleet API only) with %d registered sites: %s",
                     settings.public_address, len(sites),
                     ", ".join(f"{n} (node {e['node_id']})" for n, e in sorted(sites.items())))
        else:
            log.info("coordinator ready on %s (sites: Fleet API only)", settings.public_address)
        log.info("Control API (list, launch, stop runs; register sites) on %s: this host only",
                 settings.local_address)
        log.info("launch a run with: FLWR_HOME=%s fedtune launch --connection %s [overrides]",
                 flwr_home.resolve(), settings.connection)
    except BaseException:
        superlink.stop()
        raise
    return superlink


def _superexec_running(superlink: FlowerProcess) -> bool:
    import psutil

    try:
        children = psutil.Process(superlink.process.pid).children()
    except psutil.NoSuchProcess:
        return True  # the SuperLink itself exited; run_in_foreground handles that
    for child in children:
        try:
            # A dead SuperExec stays a zombie child of the SuperLink, which never reaps it.
            if child.status() != psutil.STATUS_ZOMBIE and "flower-superexec" in " ".join(child.cmdline()):
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def add_coordinator_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedtune coordinator` arguments."""
    parser.add_argument("--certs", type=Path, help="directory made by `fedtune keys` (ca.crt, server.crt/.key, "
                        f"{ALLOW_LIST_FILENAME})")
    parser.add_argument("--host", default=DEFAULT_HOST, help="interface to listen on (default: all)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="the one public port (sites' Fleet API only)")
    parser.add_argument("--control-port", type=int, default=0,
                        help="loopback port of the SuperLink and its Control API (default: --port + 1)")
    parser.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE_DIR),
                        help="database, registered sites and the ServerApp's working directory")
    parser.add_argument("--allow-list", type=Path, help=f"site public keys (default: CERTS/{ALLOW_LIST_FILENAME})")
    parser.add_argument("--connection", default=DEFAULT_CONNECTION, help="name of the `flwr` connection it writes")
    parser.add_argument("--in-memory", action="store_true",
                        help="keep Flower's database in memory (registrations are redone at each start)")
    parser.add_argument("--insecure", action="store_true",
                        help="NO TLS and NO site authentication (local tests only)")


def coordinator_main(args: argparse.Namespace) -> int:
    """`fedtune coordinator ...`."""
    settings = CoordinatorSettings(certs_dir=args.certs, host=args.host, port=args.port, state_dir=args.state_dir,
                                   insecure=args.insecure, allow_list=args.allow_list, connection=args.connection,
                                   in_memory=args.in_memory, control_port=args.control_port)
    try:
        return run_coordinator(settings)
    except CoordinatorError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------- launch


def run_config_pairs(overrides: Sequence[str]) -> dict[str, str]:
    """Hydra overrides ('federation.rounds=2', 'model=tiny') -> flat run-config {key: hydra value text}.

    Values stay strings: server/app.py turns each pair back into 'key=value' for hydra, so hydra
    (not TOML) parses them, exactly as `fedtune simulate` would.
    """
    from federation.validation import ConfigError

    pairs: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise ConfigError(item, f"override {item!r}: expected key=value (hydra's +key / ~key are not supported "
                              "by fedtune launch)")
        if '"' in value and "'" in value:
            raise ConfigError(key, f"override {item!r}: a value cannot hold both quote characters")
        pairs[key] = value
    return pairs


def app_run_config(app_dir: str | Path = REPO_ROOT) -> dict[str, object]:
    """The app's declared run config ([tool.flwr.app.config] of its pyproject.toml), flat."""
    text = (Path(app_dir) / "pyproject.toml").read_text()
    return _flatten(tomllib.loads(text).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def launch_config(overrides: Sequence[str], app_dir: str | Path = REPO_ROOT):
    """The RunConfig the ServerApp (server/app.py main) will compose for this launch: the app's declared run
    config plus the overrides; raises ConfigError for any mistake, before anything is submitted."""
    from federation.config import overrides_from_flat
    from federation.compose import compose_config

    return compose_config(overrides_from_flat({**app_run_config(app_dir), **run_config_pairs(overrides)}))


def _toml_string(value: str) -> str:
    # flwr parses --run-config with a regex that ends a "..." value at the next double quote.
    return f"'{value}'" if '"' in value else json.dumps(value)


def run_config_argument(pairs: dict[str, str]) -> str:
    """The --run-config string for `flwr run`: quoted keys, so 'model' and 'model.cache_dir' can coexist."""
    return " ".join(f'"{key}"={_toml_string(value)}' for key, value in pairs.items())


def copy_app(dest: Path, repo: Path = REPO_ROOT, declare: dict[str, str] | None = None) -> Path:
    """Copy the Flower app to dest and declare the run-config keys it lacks; returns dest.

    A copy because `flwr run` may rewrite the app's pyproject.toml (legacy-config migration), and
    because Flower rejects run-config keys that the app's [tool.flwr.app.config] does not declare
    ("[code: 15] Invalid run configuration"): any hydra key the launch sets is declared in the copy.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in APP_ENTRIES:
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    pyproject = dest / "pyproject.toml"
    text = pyproject.read_text()
    flat_declared = set(app_run_config(dest))
    missing = {k: v for k, v in (declare or {}).items() if k not in flat_declared}
    if missing:
        header = "[tool.flwr.app.config]"
        lines = "".join(f'"{k}" = {_toml_string(v)}\n' for k, v in missing.items())
        if header in text:
            text = text.replace(header + "\n", header + "\n" + lines, 1)
        else:
            text += f"\n{header}\n{lines}"
        pyproject.write_text(text)
        tomllib.loads(text)  # fail here, not inside flwr, if the result is not valid TOML
    return dest


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def launch(overrides: Sequence[str], connection: str | None = None, address: str | None = None,
           ca_cert: str | Path | None = None, insecure: bool = False, stream: bool = False,
           flwr_home: str | Path | None = None, app_dir: str | Path = REPO_ROOT,
           timeout_s: float | None = None) -> tuple[int, str | None]:
    """Submit this project's Flower app to a running coordinator; returns (exit code, run id).

    With `address` (+ `ca_cert`) a throwaway FLWR_HOME holds the connection; otherwise `connection`
    names one in `flwr_home`/config.toml (default $FLWR_HOME or ~/.flwr). With `stream` it follows the
    run's logs and the exit code says whether the run finished successfully. The run config is validated
    here first (launch_config: ConfigError), so a mistake is never submitted.
    """
    launch_config(overrides, app_dir)
    pairs = run_config_pairs(overrides)
    with tempfile.TemporaryDirectory(prefix="fedtune-launch-") as tmp:
        tmp = Path(tmp)
        if address is not None:
            if not insecure and ca_cert is None:
                raise ValueError("--address needs --ca (the federation's CA certificate), or --insecure")
            flwr_home = tmp / "flwr"
            connection = DEFAULT_CONNECTION
            write_flower_config(flwr_home, connection, address, ca_cert, insecure=insecure)
        app = copy_app(tmp / "app", Path(app_dir), declare=pairs)
        argv = ["run", str(app)] + ([connection] if connection else [])
        if pairs:
            argv += ["--run-config", run_config_argument(pairs)]
        if stream:
            argv.append("--stream")
        log.info("flwr %s", " ".join(argv))
        proc = subprocess.Popen([flower_executable("flwr"), *argv], env=flower_env(flwr_home), cwd=tmp,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_id = None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                match = re.search(r"Successfully started run (\d+)", line)
                if match:
                    run_id = match.group(1)
            code = proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code != 0 or run_id is None or not stream:
            return (code or (0 if run_id else 1)), run_id
        status, details = run_status(run_id, connection, flwr_home)
        if status == RUN_FINISHED_OK:
            log.info("run %s: %s", run_id, status)
            return 0, run_id
        # e.g. "ServerApp failed with exception: the federation stopped after round 2: ..." (FederationFailed)
        print(f"run {run_id} did not complete ({status}): {details or 'no details'}", file=sys.stderr)
        return 1, run_id


def run_status(run_id: str, connection: str | None, flwr_home: str | Path | None) -> tuple[str, str]:
    """('finished:completed' / 'finished:failed' / 'running' / ..., Flower's status details) of a run (`flwr ls`)."""
    result = run_flwr(["ls"] + ([connection] if connection else []) + ["--run-id", run_id, "--format", "json"],
                      flwr_home)
    try:
        run = json.loads(result.stdout)["runs"][0]
        return str(run["status"]), str(run.get("status-details") or "")
    except (ValueError, KeyError, IndexError, TypeError):
        return f"unknown ({(result.stdout + result.stderr).strip()[-200:]})", ""


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedtune launch` arguments."""
    parser.add_argument("--connection", help="a SuperLink connection in $FLWR_HOME/config.toml (coordinator "
                        "writes STATE_DIR/flwr/config.toml with connection 'fedtune')")
    parser.add_argument("--flwr-home", type=Path, help="FLWR_HOME holding --connection (default: $FLWR_HOME or ~/.flwr)")
    parser.add_argument("--address", help="coordinator host:port (instead of --connection)")
    parser.add_argument("--ca", type=Path, help="the federation's CA certificate (with --address)")
    parser.add_argument("--insecure", action="store_true", help="plaintext (only for an --insecure coordinator)")
    parser.add_argument("--stream", action="store_true", help="follow the run's logs; exit code = run outcome")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. federation.rounds=2 strategy=fedavg")


def launch_main(args: argparse.Namespace) -> int:
    """`fedtune launch ...`."""
    if args.connection and args.address:
        print("error: give --connection or --address, not both", file=sys.stderr)
        return 2
    from federation.validation import ConfigError

    try:
        code, run_id = launch(args.overrides, connection=args.connection, address=args.address, ca_cert=args.ca,
                              insecure=args.insecure, stream=args.stream, flwr_home=args.flwr_home)
    except ConfigError:
        raise  # one `config error:` line and exit 2 (simulations/cli.py)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if run_id is None:
        log.error("the run was not started (see flwr's output above)")
    return code
