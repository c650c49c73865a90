"""End to end through Flower's own CLI: `flwr run <app> local-simulation` on a managed local SuperLink.

Everything Flower keeps on disk goes to a temporary FLWR_HOME (and HOME), the local SuperLink listens
on free ports, and every process the run started (SuperLink, SuperExec, flwr-simulation, Ray) is
stopped afterwards: `flwr` leaves the SuperLink running in its own session on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
# What the FAB needs: the app packages, the hydra config and the project file.
APP_ENTRIES = ("pyproject.toml", "README.md", "conf", "federation", "client", "server", "strategies", "simulations")
# A connection named like the one the README uses; ":local:" makes `flwr` start a local SuperLink.
FLOWER_CONFIG_TOML = """[superlink]
default = "local-simulation"

[superlink.local-simulation]
address = ":local:"
"""
NUM_SUPERNODES = 2
RUN_TIMEOUT_S = 180
STOP_GRACE_S = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _copy_app(dest: Path) -> Path:
    """A copy of the app, so `flwr` (which may rewrite pyproject.toml) never touches the checkout."""
    dest.mkdir()
    for name in APP_ENTRIES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _pids_with_arg(marker: str) -> list[int]:
    """Processes whose command line contains `marker` (a path unique to this test)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(proc.name))
    return pids


def _descendants(root: int) -> list[int]:
    """root and all its live descendants, parents first."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # The command name is in parentheses and may contain spaces; fields after it are fixed.
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _stop(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL whatever is still there after STOP_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _is_zombie(p) for p in pids):
            time.sleep(0.2)


def _is_zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def test_flwr_run_local_simulation_writes_round_metrics(tmp_path):
    app = _copy_app(tmp_path / "app")
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(FLOWER_CONFIG_TOML)
    out_dir = tmp_path / "run"
    # Ray's own session dir, so its processes are findable; short because it holds unix sockets (<108 chars).
    ray_tmp = tempfile.mkdtemp(prefix="fedtune-ray-")
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # flwr spawns `flower-superlink`
        # Own ports: never reuse a local SuperLink someone else started on the default 39091.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        # Run the apps in this environment rather than a per-run `uv sync` one (needs an index, GBs of wheels).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_TMPDIR": ray_tmp,
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    command = [
        str(bin_dir / "flwr"), "run", str(app), "local-simulation", "--stream",
        "--run-config", f'federation.rounds=1 train.local_steps=1 output_dir="{out_dir}"',
        "--federation-config", f"num-supernodes={NUM_SUPERNODES} client-resources-num-cpus=1",
    ]
    try:
        # --stream returns once the run has finished (or failed; the metrics below tell which).
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=RUN_TIMEOUT_S)
    finally:
        # The SuperLink (and its SuperExec/simulation children), then any Ray process left behind.
        for marker in (str(flwr_home / "local-superlink"), ray_tmp):
            for pid in _pids_with_arg(marker):
                _stop(_descendants(pid))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log_tail = (result.stdout + result.stderr)[-4000:]
    assert "Successfully started run" in result.stdout, log_tail
    metrics = out_dir / "metrics.jsonl"
    assert metrics.exists(), log_tail
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients_ok"] == NUM_SUPERNODES and rows[1]["aggregated"] is True
    assert not [p for p in _pids_with_arg(str(flwr_home)) + _pids_with_arg(ray_tmp) if not _is_zombie(p)]
