"""A real deployment on this machine's loopback: site time per round outside the training loop, and GPU memory.

    python -m simulations.bench.deployed_round [--sites 2] [--rounds 3] [--runs 2] [--device cuda] [--out r.json] \\
        [--poll-interval-s 3] [--context-words 0] \\
        [hydra overrides, default: model=llama-1b-random train.local_steps=10 train.batch_size=16]

Starts `fedtune coordinator` (TLS + site authentication), `--sites` `fedtune site` daemons (each a Flower SuperNode
plus the resident ClientApp worker, client/worker.py) and launches `--runs` runs of `--rounds` rounds one after
another, every process real and separate, as in a deployment. Per round and site it reads:

  handler_s    the worker's wall time for the train message (its log line "answered train.* message in X s":
               set the adapter, train, encode and push the reply)
  train_s      the trainer's own training-loop time (the reply's train-seconds metric, in metrics.jsonl)
  outside_s    handler_s - train_s: what the site spends on a round outside the training loop
  round_s      the coordinator's whole round (send, train, receive, aggregate, evaluate, checkpoint)

(a site's first message of all is the round-0 evaluation or the profile query: that one imports the stack and loads
the base model, so no train message above includes it) and, per site, how often the base model was loaded ("base model loaded" in its log: 1 across all runs is the
point of the resident worker) and the GPU memory its processes hold after each round (nvidia-smi), to show it stays
flat across rounds and runs. Prints a table and one JSON document with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from client.daemon import DEFAULT_POLL_INTERVAL_S
from federation.config import ModelConfig

DEFAULT_OVERRIDES = ["model=llama-1b-random", "train.local_steps=10", "train.batch_size=16"]
SKILLS = ("reverse", "uppercase", "add", "vowels")
READY_TIMEOUT_S = 300
ANSWERED = re.compile(r"run (\d+): answered (train|evaluate)\S* message in ([0-9.]+) s")
PHASES = re.compile(r"round (\d+): outside the [0-9.]+ s training loop: (.*)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def _progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _gpu_memory_by_pid() -> dict[int, int]:
    """pid -> MiB of GPU memory, from nvidia-smi ({} without a GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    usage = {}
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            usage[int(pid)] = int(mib)
    return usage


def _tree(pid: int) -> set[int]:
    """`pid` and all its descendants, from /proc (psutil is not in every GPU image)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, []))
    return found


def _sampling(sites: int) -> list[str]:
    """Overrides that wait for exactly `sites` sites (the strategy's minimums default to 2: --sites 1 would hang)."""
    return [f"strategy.{key}={sites}" for key in ("min_train_clients", "min_evaluate_clients",
                                                   "min_available_clients")]


def _with_context(records: list[dict], words: int, seed: int) -> list[dict]:
    """Each record with `words` random lowercase words as its input (a document a real instruction would carry)."""
    import random

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [{**r, "input": " ".join("".join(rng.choices(letters, k=rng.randint(2, 8))) for _ in range(words))}
            for r in records]


def _write_site_data(root: Path, sites: int, context_words: int = 0) -> list[Path]:
    from federation.config import DemoTaskConfig
    from federation.demo_task import generate_demo_task

    train, held_out = generate_demo_task(DemoTaskConfig(skills=list(SKILLS), examples_per_skill=96,
                                                        eval_examples_per_skill=16))
    if context_words:
        train, held_out = _with_context(train, context_words, 0), _with_context(held_out, context_words, 1)
    paths = []
    for index in range(sites):
        skill = SKILLS[index % len(SKILLS)]
        directory = root / "data" / f"site-{index}"
        directory.mkdir(parents=True)
        for name, records in (("train.jsonl", train), ("eval.jsonl", held_out)):
            (directory / name).write_text("".join(json.dumps(r) + "\n" for r in records if r["source"] == skill))
        paths.append(directory)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context-words", type=int, default=0,
                        help="give every example this many random words of input: real-length rows (~5-6 tokens a "
                             "word with the presets' tokenizer; pair with data.max_seq_len=N, the demo's is 96 "
                             "tokens); 0: the demo task's ~25-token examples")
    parser.add_argument("--poll-interval-s", type=float, default=DEFAULT_POLL_INTERVAL_S,
                        help="each site's poll_interval_s (site.yaml): how soon it sees a message; not site work")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the logs and run directories here")
    parser.add_argument("--workdir", type=Path, help="work here instead of a fresh temporary directory")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    overrides = args.overrides or DEFAULT_OVERRIDES

    from federation.pki import generate_federation_credentials
    from simulations.bench import machine_info

    root = args.workdir or Path(tempfile.mkdtemp(prefix="fedtune-deployed-"))
    root.mkdir(parents=True, exist_ok=True)
    names = [f"site-{i}" for i in range(args.sites)]
    creds = root / "creds"
    generate_federation_credentials(creds, ["127.0.0.1"], names)
    data = _write_site_data(root, args.sites, args.context_words)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    port, control = _free_port(), _free_port()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv_: list[str]) -> None:
        log = open(root / f"{name}.log", "ab")
        procs[name] = subprocess.Popen(argv_, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log_of(name: str) -> str:
        path = root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    cli = [sys.executable, "-m", "simulations.cli"]
    result: dict = {"machine": machine_info(), "overrides": overrides, "sites": args.sites, "rounds": args.rounds,
                    "poll_interval_s": args.poll_interval_s, "context_words": args.context_words, "runs": []}
    try:
        start("coordinator", cli + ["coordinator", "--certs", str(creds), "--host", "127.0.0.1", "--port", str(port),
                                    "--control-port", str(control), "--state-dir", str(root / "coordinator")])
        _wait(lambda: "coordinator ready" in log_of("coordinator"), READY_TIMEOUT_S, "the coordinator")
        _progress("coordinator ready")
        for name, path in zip(names, data):
            site_yaml = root / f"{name}.yaml"
            site_yaml.write_text(json.dumps({
                "name": name, "coordinator": f"127.0.0.1:{port}", "ca_cert": str(creds / "ca.crt"),
                "private_key": str(creds / "sites" / f"{name}.key"), "data_path": str(path), "device": args.device,
                "clientappio_port": _free_port(), "state_dir": str(root / f"state-{name}"),
                # One preset build for every site and bench call, as before sites had caches of their own.
                "model_cache_dir": os.path.expanduser(ModelConfig().cache_dir),
                "poll_interval_s": args.poll_interval_s}))
            start(name, cli + ["site", "--config", str(site_yaml)])
        _wait(lambda: log_of("coordinator").count("Activated node_id=") >= args.sites, READY_TIMEOUT_S, "the sites")
        _progress(f"{args.sites} sites activated")
        for run in range(args.runs):
            run_dir = root / f"run-{run}"
            launch = subprocess.run(cli + ["launch", "--connection", "fedtune", "--flwr-home",
                                           str(root / "coordinator" / "flwr"), "--stream", *overrides,
                                           f"federation.rounds={args.rounds}", f"output_dir={run_dir}",
                                           "federation.round_timeout_s=900", *_sampling(args.sites)],
                                    env=env, capture_output=True, text=True, timeout=3600)
            if launch.returncode != 0:
                raise RuntimeError(f"run {run} failed:\n{launch.stdout[-3000:]}")
            _progress(f"run {run} finished")
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            memory = _gpu_memory_by_pid()
            result["runs"].append({"rows": rows, "gpu_mib_after_run": {
                name: sum(memory.get(pid, 0) for pid in _tree(procs[name].pid)) for name in names}})
            result["base_model_loads"] = {name: log_of(name).count("base model loaded") for name in names}
            result["node_of_site"] = {name: entry["node_id"] for name, entry in
                                      json.loads((root / "coordinator" / "sites.json").read_text()).items()}
            result["handler_seconds"] = {name: [(int(r), kind, float(s))
                                                for r, kind, s in ANSWERED.findall(log_of(name))] for name in names}
            result["phase_seconds"] = {name: [{k: float(v) for k, v in re.findall(r"(\S+) (-?[0-9.]+) s", text)}
                                              for _, text in PHASES.findall(log_of(name))] for name in names}
            if args.out:  # after every run: a device call cut short still leaves the runs that finished
                args.out.write_text(json.dumps(result, indent=1))
    finally:
        for proc in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(3)
        for proc in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if args.keep:
            shutil.copytree(root, args.keep, dirs_exist_ok=True)
    _report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


def site_rounds(result: dict) -> list[dict]:
    """One entry per (site, run, round): the train handler's seconds, the training loop's, and the rest."""
    out = []
    for name, node in result["node_of_site"].items():
        handlers = [s for _, kind, s in result["handler_seconds"][name] if kind == "train"]
        rounds = [(run_index, row) for run_index, run in enumerate(result["runs"]) for row in run["rows"]
                  if row["round"] >= 1]
        for (run_index, row), handler_s in zip(rounds, handlers):
            site = row.get("per_site", {}).get(str(node), {})
            train_s = float(site.get("train-seconds", float("nan")))
            out.append({"site": name, "run": run_index, "round": row["round"], "round_s": row["seconds"],
                        "handler_s": handler_s, "train_s": train_s, "outside_s": handler_s - train_s,
                        "peak_gib": float(site.get("peak-memory-bytes", 0)) / 2**30})
    return out


def _report(result: dict) -> None:
    """Per site, run and round: the train handler, the training loop, the rest, and its share of the round."""
    print(f"machine: {result['machine']}")
    print(f"overrides: {' '.join(result['overrides'])}")
    print(f"base model loads per site (all runs): {result['base_model_loads']}")
    print(f"{'site':>7} {'run':>3} {'round':>5} {'round_s':>8} {'handler_s':>9} {'train_s':>8} {'outside_s':>9} "
          f"{'outside/train':>13} {'peak_GiB':>8}")
    for entry in site_rounds(result):
        print(f"{entry['site']:>7} {entry['run']:>3} {entry['round']:>5} {entry['round_s']:>8.2f} "
              f"{entry['handler_s']:>9.3f} {entry['train_s']:>8.3f} {entry['outside_s']:>9.3f} "
              f"{entry['outside_s'] / entry['train_s']:>13.1%} {entry['peak_gib']:>8.2f}")
    for name, rounds in result.get("phase_seconds", {}).items():
        for index, phases in enumerate(rounds):
            print(f"{name} train message {index + 1}, seconds outside the loop: {phases}")
    for run_index, run in enumerate(result["runs"]):
        for row in run["rows"]:  # the coordinator's round, phase by phase (server/app.py phase_seconds)
            if row.get("phase_seconds"):
                print(f"run {run_index} round {row['round']} at the coordinator: {row['seconds']:.2f} s = "
                      + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in row["phase_seconds"].items()))
        print(f"GPU MiB held by each site's processes after run {run_index}: {run['gpu_mib_after_run']}")


if __name__ == "__main__":
    sys.exit(main())
