"""LoRA-delta transfer through a real TLS + node-auth SuperLink on loopback: `fedtune coordinator` + SuperNodes.

    python -m simulations.bench.transfer [--preset llama-8b] [--ranks 8 64] [--sites 2] [--packed] [--out result.json]

For each LoRA rank, the adapter of that preset at that rank (all-linear, PEFT key names and shapes, random
float32 so Flower's content-addressed 5 MiB chunks cannot be deduplicated) goes from the ServerApp to every
site and a same-sized, different delta comes back: one round's traffic. A throwaway Flower app (numpy + flwr
only, written to a temp dir) does the sending, so the time is transport, not training. A 4 KiB round first
measures the fixed cost (a fresh ClientApp process per message, polling); `transfer_seconds` subtracts it.
Prints one JSON document: the machine, the settings and one row per size; the SuperLink's peak RSS included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from simulations.bench import machine_info

SEND_TIMEOUT_S = 3600
STARTUP_TIMEOUT_S = 120
STOP_GRACE_S = 15
BASELINE_NAME = "baseline"

PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedtune-transfer-bench"
version = "0.1.0"
description = "LoRA-delta transfer benchmark"
license = "Apache-2.0"
dependencies = ["flwr==1.41.0", "numpy"]

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "transfer_bench_app:server"
clientapp = "transfer_bench_app:client"

[tool.flwr.app.config]
out = ""
"""

APP = '''"""ServerApp: send each adapter in shapes.json to every node and time the round trip. ClientApp: echo + 1."""
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cases = json.loads((Path(__file__).parent / "shapes.json").read_text())
    nodes = []
    while len(nodes) < cases["sites"]:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    rows = []
    for name, shapes in cases["adapters"].items():
        rng = np.random.default_rng(len(rows))
        record = ArrayRecord({k: Array(rng.standard_normal(tuple(s), dtype=np.float32)) for k, s in shapes.items()})
        messages = [Message(RecordDict({"arrays": record}), dst_node_id=n, message_type="train") for n in nodes]
        start = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=%(timeout)d))
        seconds = time.perf_counter() - start
        ok = [r for r in replies if not r.has_error()]
        same = all(np.array_equal(r.content["arrays"][k].numpy(), record[k].numpy() + 1) for r in ok for k in shapes)
        rows.append({"name": name, "tensors": len(shapes), "params": int(sum(np.prod(s) for s in shapes.values())),
                     "bytes_per_site_each_way": record.count_bytes(), "sites": len(nodes), "replies_ok": len(ok),
                     "errors": [r.error.reason for r in replies if r.has_error()], "echo_exact": same,
                     "round_trip_seconds": seconds})
        print(f"TRANSFER {json.dumps(rows[-1])}", flush=True)
    Path(str(context.run_config["out"])).write_text(json.dumps(rows))


@client.train()
def echo(msg: Message, context: Context) -> Message:
    record = msg.content["arrays"]
    reply = ArrayRecord({k: Array(record[k].numpy() + np.float32(1)) for k in record})
    return Message(RecordDict({"arrays": reply}), reply_to=msg)
''' % {"timeout": SEND_TIMEOUT_S}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Processes:
    """Processes in their own sessions with log files; stop_all ends each whole tree (Flower detaches some)."""

    def __init__(self, work: Path, env: dict, cwd: Path):
        self.work, self.env, self.cwd, self.procs = work, env, cwd, {}

    def start(self, name: str, argv: list[str]) -> None:
        with open(self.work / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                cwd=self.cwd, start_new_session=True)

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, name: str, text: str, count: int = 1) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while self.log(name).count(text) < count:
            if time.monotonic() > deadline or self.procs[name].poll() is not None:
                raise RuntimeError(f"{name}: no {text!r} after {STARTUP_TIMEOUT_S} s:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)

    def stop_all(self) -> None:
        import psutil

        trees = []
        for proc in self.procs.values():
            try:
                root = psutil.Process(proc.pid)
                trees += [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(trees, timeout=STOP_GRACE_S)
        for member in alive:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        for proc in self.procs.values():
            proc.wait()


def adapter_shapes(preset: str, rank: int) -> dict[str, list[int]]:
    """PEFT key -> shape of an all-linear LoRA adapter of rank `rank` on `preset` (meta device, no weights)."""
    from federation.config import LoraSettings, ModelConfig
    from federation.model import lora_shapes

    shapes = lora_shapes(ModelConfig(name="preset", preset_name=preset), LoraSettings(r=rank, alpha=2 * rank))
    return {k: list(v) for k, v in sorted(shapes.items())}


def _peak_rss(pids_of, stop: threading.Event, result: dict) -> None:
    import psutil

    while not stop.is_set():
        for label, pid in pids_of().items():
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
            result[label] = max(result.get(label, 0), rss)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints (and with --out writes) the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-8b", help="federation.model preset whose LoRA shapes are sent")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="LoRA ranks to send, ascending")
    parser.add_argument("--sites", type=int, default=2, help="site daemons (each gets and returns the adapter)")
    parser.add_argument("--packed", action="store_true",
                        help="also send each adapter as fedtune's messages carry it (federation/packing.py): one flat "
                             "array plus its layout (same bytes, two objects)")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    parser.add_argument("--in-memory", action="store_true", help="coordinator --in-memory (no SQLite database)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, credentials) in /tmp")
    args = parser.parse_args(argv)

    import numpy as np
    import psutil

    from client.daemon import flower_env, load_site_config, supernode_command
    from federation.packing import LAYOUT_KEY, PACKED_KEY, layout_json
    from federation.pki import generate_federation_credentials
    from server.coordinator import run_flwr

    work = Path(tempfile.mkdtemp(prefix="fedtune-transfer-"))
    sites = [f"site-{i}" for i in range(args.sites)]
    generate_federation_credentials(work / "creds", ["127.0.0.1"], sites)
    app = work / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "transfer_bench_app.py").write_text(APP)
    adapters = {BASELINE_NAME: {"tiny.lora_A.weight": [1, 1024]}}
    for rank in args.ranks:
        shapes = adapter_shapes(args.preset, rank)
        adapters[f"{args.preset} r={rank}"] = shapes
        if args.packed:
            # Flower sends every Array as its own object (+ 5 MiB chunks), one HTTPS request each. fedtune's
            # messages (federation/packing.py) carry the same bytes as one flat Array plus its JSON layout.
            layout = layout_json(list(shapes), [np.dtype(np.float32)] * len(shapes), list(shapes.values()))
            adapters[f"{args.preset} r={rank} packed"] = {
                PACKED_KEY: [sum(math.prod(s) for s in shapes.values())], LAYOUT_KEY: [math.ceil(len(layout) / 4)]}
    (app / "shapes.json").write_text(json.dumps({"sites": args.sites, "adapters": adapters}))
    data = work / "site.jsonl"
    data.write_text(json.dumps({"text": "unused by the benchmark app"}) + "\n")

    port = _free_port()
    procs = _Processes(work, flower_env(), Path(__file__).resolve().parents[2])
    peak_rss: dict = {}
    stop = threading.Event()
    try:
        procs.start("coordinator", [sys.executable, "-m", "simulations.cli", "coordinator", "--certs",
                                    str(work / "creds"), "--host", "127.0.0.1", "--port", str(port),
                                    "--state-dir", str(work / "coordinator")]
                    + (["--in-memory"] if args.in_memory else []))
        procs.wait_for_log("coordinator", "coordinator ready")
        for site in sites:
            config = work / f"{site}.yaml"
            config.write_text(f"name: {site}\ncoordinator: 127.0.0.1:{port}\nca_cert: creds/ca.crt\n"
                              f"private_key: creds/sites/{site}.key\ndata_path: site.jsonl\ndevice: cpu\n"
                              f"clientappio_port: {_free_port()}\nstate_dir: home-{site}\n")
            # Plain flower-supernode, as `fedtune site` starts it but with Flower's process per message, which
            # runs the FAB's own ClientApp: `fedtune site` serves only the installed fedtune app.
            procs.start(site, supernode_command(load_site_config(config), isolation="subprocess"))
        procs.wait_for_log("coordinator", "Activated node_id=", count=len(sites))

        def superlink_pids() -> dict:
            pids = {}
            for child in psutil.Process(procs.procs["coordinator"].pid).children(recursive=True):
                name = " ".join(child.cmdline()[:2])
                if "flower-superlink" in name:
                    pids["superlink"] = child.pid
            return pids

        sampler = threading.Thread(target=_peak_rss, args=(superlink_pids, stop, peak_rss), daemon=True)
        sampler.start()
        out = work / "rows.json"
        start = time.perf_counter()
        result = run_flwr(["run", str(app), "fedtune", "--stream", "--run-config", f'out="{out}"'],
                          work / "coordinator" / "flwr", timeout_s=SEND_TIMEOUT_S, cwd=work)
        wall = time.perf_counter() - start
        if not out.exists():
            print(result.stdout[-5000:] + result.stderr[-5000:], file=sys.stderr)
            print(procs.log("coordinator")[-5000:], file=sys.stderr)
            return 1
        rows = json.loads(out.read_text())
    finally:
        stop.set()
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    baseline = next(r["round_trip_seconds"] for r in rows if r["name"] == BASELINE_NAME)
    for row in rows:
        row["transfer_seconds"] = row["round_trip_seconds"] - baseline
        moved = 2 * row["bytes_per_site_each_way"] * row["sites"]
        row["bytes_moved"] = moved
        row["mb_per_second"] = moved / 1e6 / row["transfer_seconds"] if row["transfer_seconds"] > 0 else None
    report = {
        "benchmark": "LoRA delta through flower-superlink (HTTPS, node auth) on 127.0.0.1, flower-supernode sites",
        "machine": machine_info(),
        "settings": {"preset": args.preset, "ranks": args.ranks, "sites": args.sites, "dtype": "float32",
                     "superlink_database": "memory" if args.in_memory else "sqlite file",
                     "flwr_run_wall_seconds": wall,
                     "chunk_bytes": int(os.environ.get("FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", 5242880))},
        "superlink_peak_rss_bytes": peak_rss.get("superlink"),
        "rows": rows,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
