"""The partner-site daemon: checks the site's files, then runs Flower's SuperNode with this project's ClientApp.

A site runs ``fedtune site --config site.yaml``. The daemon validates everything the site controls
(data, CA certificate, the site's private key) before it dials the coordinator, because a SuperNode
started with bad data would only fail inside the first round, on the coordinator's clock. It then
runs ``flower-supernode --isolation process`` (through client/supernode.py, which bounds how long it waits
between asking the coordinator for messages) in the foreground over TLS with SuperNode authentication,
plus one resident worker (client/worker.py) that serves every message of every run with the installed
ClientApp (``client.app:app``, base model loaded once), refuses runs whose FAB is not the
installed app (client/approval.py), and is restarted if it dies. The ClientApp reads its data from the
node config ``data-path``; it keeps the state that rounds advance (client/site_state.py) under
``<state_dir>/round-state`` (node config ``round-state-dir``), so a resumed run continues from it.

``FlowerProcess`` (federation/flower_process.py) is shared with the coordinator (server/coordinator.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from client.site_policy import PolicyError, SitePolicy, parse_policy, policy_summary
from client.supernode import POLL_INTERVAL_FLAG
from federation.config import ModelConfig
from federation.flower_process import DEFAULT_STOP_TIMEOUT_S, FlowerProcess, flower_env
from federation.validation import ConfigError

log = logging.getLogger("fedtune.site")

DEFAULT_CLIENTAPPIO_PORT = 9094  # flower-supernode's own default for its local Runtime API
# The SuperLink refuses to activate a node it still counts as online, i.e. for up to 2 missed heartbeats
# (Flower 1.41: 2 x 30 s) after a crash. The daemon ends such a stale session itself when it knows the node id
# (state_dir); otherwise it keeps retrying a bit longer than that.
DEFAULT_REJOIN_TIMEOUT_S = 90.0
DEFAULT_REJOIN_RETRY_S = 2.0
# Longest wait between the SuperNode's requests for new messages while idle: each round's message (each SecAgg+
# stage's) sits at the coordinator up to this long before the site sees it. Flower's own fixed value; lower
# means quicker rounds for more requests (one per site per interval) to the coordinator.
DEFAULT_POLL_INTERVAL_S = 3.0
# What flower-supernode prints when the SuperLink refuses to activate it ([code: 2004]): its key is not
# registered, or the coordinator still counts this node online from before a crash.
ACTIVATION_REFUSED = "Failed to activate SuperNode"
NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")
# In state_dir: the node id of the last SuperNode session, to end it if the daemon did not exit cleanly.
NODE_ID_FILE = "fedtune-node-id"
# Lines of flower-supernode output that have a known cause, and what to tell the site operator.
SUPERNODE_FAILURE_HINTS = {
    "CERTIFICATE_VERIFY_FAILED": "the coordinator's TLS certificate does not verify against `ca_cert`, or its "
                                 "host name/IP is not in the certificate (re-run `fedtune keys --host ...`)",
    "Server disconnected without sending a response": "TLS/plaintext mismatch with the coordinator "
                                                      "(`insecure` must match how the coordinator was started)",
    "Unable to parse the private key": "`private_key` is not an OpenSSH EC private key (use sites/<site>.key)",
    "Connection refused": "nothing listens at `coordinator` (host:port); is the coordinator running?",
}
# Under state_dir: the ClientApp's round state per federation run (node config round-state-dir).
ROUND_STATE_SUBDIR = "round-state"
# Under state_dir: where the site builds preset models (policy.model_cache_dir), and its privacy ledger.
MODEL_CACHE_SUBDIR = "model-cache"
PRIVACY_LEDGER_FILE = "privacy-ledger.json"
# Node-config values are written as '...' strings inside --node-config, so they cannot hold a quote.
_NODE_CONFIG_FORBIDDEN = ("'", '"')
DEVICES = ("auto", "cpu", "cuda")
# How often the daemon checks that its resident ClientApp worker is alive (and restarts it if not).
WORKER_CHECK_INTERVAL_S = 2.0
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class SiteConfigError(ConfigError):
    """The site configuration or a file it names is unusable; the message (one line) says which and why."""

    def __init__(self, message: str, key: str = "site"):
        super().__init__(key, message)


# ------------------------------------------------------------------------------------------ the site


@dataclass
class SiteConfig:
    """One partner site, as written in site.yaml (see conf/site/example.yaml); relative paths are relative to the YAML."""

    name: str
    coordinator: str
    ca_cert: Path
    private_key: Path
    data_path: Path
    # "auto" | "cpu" | "cuda" | "cuda:N"
    device: str = "auto"
    # Local port of this SuperNode's Runtime API (SuperNode <-> ClientApp process); two sites on one host need two.
    clientappio_port: int = DEFAULT_CLIENTAPPIO_PORT
    # FLWR_HOME of this SuperNode (installed apps) and the ClientApp's round state (round-state/: error feedback,
    # SCAFFOLD c_i, ... per run, so a resumed run continues from it); empty: ~/.flwr and no durable round state.
    state_dir: Path | None = None
    # Reconnection limits while the coordinator is unreachable (None: retry forever).
    max_retries: int | None = None
    max_wait_time_s: float | None = None
    # Longest wait between the SuperNode's requests for new messages (see DEFAULT_POLL_INTERVAL_S).
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    # How long to keep retrying when the coordinator refuses to activate this site (see DEFAULT_REJOIN_TIMEOUT_S);
    # 0: give up at the first refusal.
    rejoin_timeout_s: float = DEFAULT_REJOIN_TIMEOUT_S
    # Only against a coordinator started with --insecure: plaintext and no node authentication.
    insecure: bool = False
    extra_node_config: dict[str, str | int | float | bool] = field(default_factory=dict)
    # sha256 of Flower app bundles this site serves even if their Python files differ from the installed
    # fedtune (client/approval.py); the ClientApp that runs is always the installed one.
    approved_fab_hashes: list[str] = field(default_factory=list)
    # What this site serves any coordinator (client/site_policy.py): models, per-message limits, privacy budget.
    policy: SitePolicy = field(default_factory=SitePolicy)
    # Where built presets are cached (policy.model_cache_dir; default <state_dir>/model-cache): the site's own
    # choice, whatever model.cache_dir a run config names.
    model_cache_dir: Path | None = None


_SITE_KEYS = {f.name for f in SiteConfig.__dataclass_fields__.values()}


def load_site_config(path: str | Path) -> SiteConfig:
    """Read site.yaml into a SiteConfig (relative paths resolved against the YAML's directory)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SiteConfigError(f"{path}: cannot read site config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SiteConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise SiteConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _SITE_KEYS)
    if unknown:
        raise SiteConfigError(f"{path}: unknown settings {unknown}; known: {sorted(_SITE_KEYS)}")
    missing = [k for k in ("name", "coordinator", "ca_cert", "private_key", "data_path") if not raw.get(k)]
    if missing and not (raw.get("insecure") and set(missing) <= {"ca_cert", "private_key"}):
        raise SiteConfigError(f"{path}: missing required settings {missing}")
    base = path.resolve().parent
    approved = raw.get("approved_fab_hashes") or []
    if not isinstance(approved, list) or not all(isinstance(h, str) and SHA256_HEX.fullmatch(h) for h in approved):
        raise SiteConfigError(f"{path}: approved_fab_hashes must be a list of sha256 hex digests (64 hex characters), "
                              f"got {approved!r}")

    def resolve(value) -> Path | None:
        return None if value in (None, "") else (base / Path(str(value)).expanduser()).resolve()

    def number(key: str, kind: type, default, minimum: float):
        value = raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)) \
                or value < minimum:
            raise SiteConfigError(f"{path}: {key} must be {'an integer' if kind is int else 'a number'} >= "
                                  f"{minimum:g}, got {value!r}", key)
        return kind(value)

    extra = raw.get("extra_node_config") or {}
    if not isinstance(extra, dict):
        raise SiteConfigError(f"{path}: extra_node_config must be a mapping, got {extra!r}", "extra_node_config")
    try:
        policy = parse_policy(raw.get("policy"))
    except PolicyError as exc:
        raise SiteConfigError(f"{path}: {exc}", exc.key) from None
    state_dir = resolve(raw.get("state_dir"))
    if policy.privacy_budget is not None and state_dir is None:
        raise SiteConfigError(f"{path}: policy.privacy_budget needs state_dir (the site's privacy ledger lives "
                              "there)", "policy.privacy_budget")
    # Set by the site, whatever the coordinator's run config says: presets are built in the site's own cache, and
    # the ledger of its DP-SGD releases lives with its other state.
    model_cache_dir = resolve(raw.get("model_cache_dir"))
    policy.model_cache_dir = str(model_cache_dir) if model_cache_dir is not None \
        else str(state_dir / MODEL_CACHE_SUBDIR) if state_dir is not None \
        else os.path.expanduser(ModelConfig().cache_dir)
    policy.privacy_ledger = "" if state_dir is None else str(state_dir / PRIVACY_LEDGER_FILE)
    return SiteConfig(
        name=str(raw["name"]),
        coordinator=str(raw["coordinator"]),
        ca_cert=resolve(raw.get("ca_cert")),
        private_key=resolve(raw.get("private_key")),
        data_path=resolve(raw["data_path"]),
        device=str(raw.get("device", "auto")),
        clientappio_port=number("clientappio_port", int, DEFAULT_CLIENTAPPIO_PORT, 1),
        state_dir=state_dir,
        max_retries=number("max_retries", int, None, 0),
        max_wait_time_s=number("max_wait_time_s", float, None, 0),
        poll_interval_s=number("poll_interval_s", float, DEFAULT_POLL_INTERVAL_S, 0.1),
        rejoin_timeout_s=number("rejoin_timeout_s", float, DEFAULT_REJOIN_TIMEOUT_S, 0),
        insecure=bool(raw.get("insecure", False)),
        extra_node_config=dict(extra),
        approved_fab_hashes=[h.lower() for h in approved],
        policy=policy,
        model_cache_dir=model_cache_dir,
    )


def validate_site_data(data_path: Path) -> dict[str, int]:
    """Parse the site's JSONL (a file, or a dir with train.jsonl [+ eval.jsonl]); returns examples per file.

    Raises SiteConfigError naming the file and line of the first problem (the simulation's check of its data,
    federation.validation.check_jsonl_files).
    """
    from federation.data import EVAL_FILE, TRAIN_FILE
    from federation.validation import check_jsonl_files

    if not data_path.exists():
        raise SiteConfigError(f"data_path {data_path}: not found", "data_path")
    files = [data_path / TRAIN_FILE] if data_path.is_dir() else [data_path]
    if data_path.is_dir() and (data_path / EVAL_FILE).exists():
        files.append(data_path / EVAL_FILE)
    try:
        return check_jsonl_files(files, "data_path")
    except ConfigError as exc:
        raise SiteConfigError(f"site data is not usable: {exc}", "data_path") from None


def _read_file(path: Path | None, what: str) -> bytes:
    if path is None:
        raise SiteConfigError(f"{what}: not set")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SiteConfigError(f"{what} {path}: cannot read ({exc.strerror})") from None


def validate_credentials(cfg: SiteConfig) -> None:
    """The CA cert is a PEM X.509 certificate and the private key an OpenSSH EC private key, both readable."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_bytes = _read_file(cfg.ca_cert, "ca_cert")
    try:
        x509.load_pem_x509_certificates(ca_bytes)
    except ValueError as exc:
        raise SiteConfigError(f"ca_cert {cfg.ca_cert}: not a PEM certificate ({exc})") from None
    key_bytes = _read_file(cfg.private_key, "private_key")
    try:
        key = serialization.load_ssh_private_key(key_bytes, password=None)
    except (ValueError, TypeError) as exc:
        raise SiteConfigError(
            f"private_key {cfg.private_key}: not an unencrypted OpenSSH private key ({exc}); "
            "use the sites/<site>.key written by `fedtune keys`, not the .pub file") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SiteConfigError(f"private_key {cfg.private_key}: Flower needs an EC (NIST curve) key, got {type(key).__name__}")
    if cfg.private_key.stat().st_mode & 0o077:
        log.warning("private_key %s is readable by group/others; chmod 600 it", cfg.private_key)


def validate_site(cfg: SiteConfig) -> dict[str, int]:
    """Everything checkable before connecting; raises SiteConfigError. Returns examples per data file."""
    if cfg.device != "auto" and cfg.device.split(":")[0] not in DEVICES:
        raise SiteConfigError(f"device {cfg.device!r}: use one of {DEVICES} or cuda:N")
    if ":" not in cfg.coordinator or cfg.coordinator.startswith(("http://", "https://")):
        raise SiteConfigError(f"coordinator {cfg.coordinator!r}: expected host:port without a scheme")
    for key, value in [("name", cfg.name), ("data_path", str(cfg.data_path)), ("state_dir", str(cfg.state_dir or "")),
                       *cfg.extra_node_config.items()]:
        if any(ch in str(value) for ch in _NODE_CONFIG_FORBIDDEN):
            raise SiteConfigError(f"{key} {value!r}: must not contain quotes")
    from federation.protocol import NODE_LOCAL_STEPS_KEY, NODE_RANK_KEY  # this site's LoRA rank / local steps

    for key in (NODE_RANK_KEY, NODE_LOCAL_STEPS_KEY):
        value = cfg.extra_node_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SiteConfigError(f"extra_node_config.{key} must be an integer >= 1, got {value!r}",
                                  f"extra_node_config.{key}")
    if cfg.insecure:
        log.warning("INSECURE site: plaintext connection and no node authentication; only against a coordinator "
                    "started with --insecure, never across a network")
    else:
        validate_credentials(cfg)
    return validate_site_data(cfg.data_path)


def node_config(cfg: SiteConfig) -> str:
    """--node-config string: what the ClientApp reads from context.node_config (data-path, site, device, state)."""
    from client.site_state import NODE_STATE_DIR_KEY

    values: dict[str, str | int | float | bool] = {"site": cfg.name, "data-path": str(cfg.data_path),
                                                   "device": cfg.device}
    if cfg.state_dir is not None:
        values[NODE_STATE_DIR_KEY] = str(cfg.state_dir / ROUND_STATE_SUBDIR)
    values.update(cfg.extra_node_config)
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}='{value}'")
    return " ".join(parts)


def device_env(device: str) -> dict[str, str]:
    """Environment that pins the ClientApp to the chosen device (it resolves model.device=auto from what it sees)."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if device.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}
    return {}


def supernode_command(cfg: SiteConfig, isolation: str = "process") -> list[str]:
    """Argv of flower-supernode (client/supernode.py) for this site; `process` isolation: it starts no ClientApp
    processes itself.

    (isolation="subprocess", Flower's process per message running the FAB's own ClientApp, is only for
    simulations/bench/transfer.py, whose throwaway app a fedtune site would refuse.)
    """
    argv = [sys.executable, "-m", "client.supernode", POLL_INTERVAL_FLAG, str(cfg.poll_interval_s),
            "--superlink", cfg.coordinator, "--isolation", isolation,
            "--host", "127.0.0.1", "--port", str(cfg.clientappio_port),
            "--node-config", node_config(cfg)]
    if cfg.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(cfg.ca_cert), "--auth-supernode-private-key", str(cfg.private_key)]
    if cfg.max_retries is not None:
        argv += ["--max-retries", str(cfg.max_retries)]
    if cfg.max_wait_time_s is not None:
        argv += ["--max-wait-time", str(cfg.max_wait_time_s)]
    return argv


def worker_command(cfg: SiteConfig) -> list[str]:
    """Argv of the site's resident ClientApp worker (client/worker.py), polling this site's SuperNode."""
    argv = [sys.executable, "-m", "client.worker", "--runtime-api-address", f"127.0.0.1:{cfg.clientappio_port}",
            "--site-policy", cfg.policy.to_json()]
    for digest in cfg.approved_fab_hashes:
        argv += ["--approved-fab-hash", digest]
    return argv


class ResidentWorker:
    """The site's one ClientApp worker process, restarted whenever it has died (checked by `keep_alive`)."""

    def __init__(self, cfg: SiteConfig, stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S):
        self.cfg = cfg
        self.stop_timeout_s = stop_timeout_s
        self.process: FlowerProcess | None = None
        self.restarts = 0

    def start(self) -> None:
        """Start the worker process; its output goes to the daemon's output."""
        self.process = FlowerProcess(worker_command(self.cfg), env=supernode_env(self.cfg),
                                     stop_timeout_s=self.stop_timeout_s)
        self.process.start()

    def keep_alive(self) -> bool:
        """Restart the worker if it exited (a health check for FlowerProcess.run_in_foreground: always True)."""
        code = None if self.process is None else self.process.poll()
        if self.process is None or code is not None:
            self.restarts += 1
            log.warning("site %s: the resident ClientApp worker exited (code %s); restarting it (restart %d)",
                        self.cfg.name, code, self.restarts)
            self.start()
        return True

    def stop(self) -> None:
        """Stop the worker (SIGTERM, then SIGKILL after stop_timeout_s)."""
        if self.process is not None and self.process.process is not None:
            self.process.stop()


def supernode_env(cfg: SiteConfig) -> dict[str, str]:
    """Environment of the SuperNode and of the resident ClientApp worker."""
    extra = {
        **device_env(cfg.device),
        # The ClientApp logs per round (round, examples, bytes uploaded) at INFO under "fedtune";
        # client/app.py reads this to attach a handler in Flower's ClientApp process.
        "FEDTUNE_LOG_LEVEL": os.environ.get("FEDTUNE_LOG_LEVEL", "INFO"),
        "PYTHONUNBUFFERED": "1",
    }
    return flower_env(cfg.state_dir, extra)


def release_stale_session(cfg: SiteConfig, node_id: int) -> bool | None:
    """End this site's previous SuperNode session on the coordinator (after a crash): True if there was one,
    False if there was none, None if the coordinator could not be asked (unreachable).

    Flower's SuperLink refuses to activate a node it still counts online, i.e. for up to two missed
    heartbeats (60 s) after a crash, and a refused SuperNode exits. A clean SuperNode shutdown sends
    DeactivateNode; this sends the same request, signed with the site key, on behalf of the crashed
    process, so a restarted site rejoins at once. Uses flwr 1.41's own Fleet client (pinned version).
    """
    import httpx
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private_key = serialization.load_ssh_private_key(cfg.private_key.read_bytes(), password=None)
    client = FleetHttpClient.from_server_address(
        cfg.coordinator, False, str(cfg.ca_cert),
        interceptors=[NodeAuthHttpInterceptor(private_key, private_key.public_key())])
    try:
        client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except httpx.HTTPStatusError:
        return False  # not online (clean shutdown before, or timed out already): nothing to release
    except httpx.TransportError as exc:
        log.info("site %s: coordinator not reachable yet (%s)", cfg.name, exc)
        return None
    finally:
        client.close()
    return True


def _node_id_recorder(cfg: SiteConfig) -> Callable[[str], None]:
    def record(line: str) -> None:
        match = NODE_ID_LINE.search(line)
        if match and cfg.state_dir is not None:
            (cfg.state_dir / NODE_ID_FILE).write_text(match.group(1))

    return record


def run_site(cfg: SiteConfig, stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
             rejoin_retry_s: float = DEFAULT_REJOIN_RETRY_S) -> int:
    """Validate, then run the SuperNode in the foreground until it exits or SIGINT/SIGTERM; returns an exit code.

    A refused activation is retried for cfg.rejoin_timeout_s: after a crash the coordinator keeps
    counting this node online for up to two heartbeat intervals and refuses it until then.
    """
    counts = validate_site(cfg)
    for file, n in counts.items():
        log.info("site %s: %s holds %d examples", cfg.name, file, n)
    cfg.policy.train_examples = next(iter(counts.values()))  # the first file is the training data
    if cfg.state_dir is not None:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
    log.info("site %s: connecting to coordinator %s (%s)", cfg.name, cfg.coordinator,
             "INSECURE" if cfg.insecure else f"TLS, CA {cfg.ca_cert}, node key {cfg.private_key}")
    deadline = time.monotonic() + cfg.rejoin_timeout_s
    node_id_file = None if cfg.state_dir is None else cfg.state_dir / NODE_ID_FILE
    # One worker for the daemon's lifetime (it outlives SuperNode restarts), so the base model loads once.
    worker = ResidentWorker(cfg, stop_timeout_s=stop_timeout_s)
    worker.start()
    try:
        return _run_supernode(cfg, worker, deadline, node_id_file, stop_timeout_s, rejoin_retry_s)
    finally:
        worker.stop()


def _run_supernode(cfg: SiteConfig, worker: ResidentWorker, deadline: float, node_id_file: Path | None,
                   stop_timeout_s: float, rejoin_retry_s: float) -> int:
    while True:
        # A refusal means "not registered" unless a session of ours may still be open on the coordinator: only then
        # is it worth retrying (no state_dir: unknown; a recorded node id whose session could not be ended).
        stale_session_possible = node_id_file is None
        if node_id_file is not None and node_id_file.exists() and not cfg.insecure:
            node_id = int(node_id_file.read_text())
            released = release_stale_session(cfg, node_id)
            if released:
                log.warning("site %s: ended the coordinator's stale session of node %d (the previous SuperNode "
                            "of this site did not shut down cleanly)", cfg.name, node_id)
            stale_session_possible = released is None
        supernode = FlowerProcess(supernode_command(cfg), env=supernode_env(cfg), stop_timeout_s=stop_timeout_s,
                                  keep_output_tail=True, on_line=_node_id_recorder(cfg), name="flower-supernode")
        code = supernode.run_in_foreground(health_check=worker.keep_alive, health_interval_s=WORKER_CHECK_INTERVAL_S)
        if supernode.stop_requested:
            return 0
        refused = supernode.output_contains(ACTIVATION_REFUSED)
        if refused and stale_session_possible and time.monotonic() + rejoin_retry_s < deadline:
            log.warning("site %s: the coordinator refused to activate this site: either its public key is not "
                        "registered there, or the coordinator still counts it online after a crash (up to ~60 s); "
                        "retrying in %.0f s (gives up %.0f s after start)", cfg.name, rejoin_retry_s,
                        cfg.rejoin_timeout_s)
            time.sleep(rejoin_retry_s)
            continue
        break
    if refused:
        log.error("site %s: REFUSED by the coordinator: this site's public key (from %s) is not registered there. "
                  "Ask the coordinator operator to add it to the allow-list.", cfg.name, cfg.private_key)
        return code or 1
    hints = [hint for text, hint in SUPERNODE_FAILURE_HINTS.items() if supernode.output_contains(text)]
    if code:
        log.error("site %s: flower-supernode exited with code %d%s", cfg.name, code,
                  "".join(f"; likely cause: {h}" for h in hints))
    return code


def add_site_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedtune site` arguments."""
    parser.add_argument("--config", required=True, help="site YAML (see conf/site/example.yaml)")
    parser.add_argument("--check", action="store_true", help="only validate config, keys and data, then exit")


def site_main(args: argparse.Namespace) -> int:
    """`fedtune site --config site.yaml [--check]`."""
    try:
        cfg = load_site_config(args.config)
        if args.check:
            counts = validate_site(cfg)
            print(f"site {cfg.name}: OK ({', '.join(f'{f}: {n} examples' for f, n in counts.items())})")
            print(f"site {cfg.name}: policy: {policy_summary(cfg.policy)}")
            return 0
        return run_site(cfg)
    except SiteConfigError as exc:
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        print(f"config error: {exc}", file=sys.stderr)  # one line (the CLI's form for every config mistake)
        return 2
