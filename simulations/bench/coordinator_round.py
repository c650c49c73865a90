"""The coordinator's training round end to end on CPU: N sites' replies come through a Grid and
LoraDeltaStrategy.train_round validates each and folds it into the running sum as it arrives.

    python -m simulations.bench.coordinator_round --sites 100 --out /tmp/coordinator_round.json

Adapter: Llama-2-7B with LoRA r=16 on every linear layer (simulations.bench.aggregation.adapter_shapes: 40.0M
params, 160 MB in float32), bf16 uploads (federation.compression), so a reply is ~80 MB.

SimulatedGrid is a Flower Grid: push_messages schedules each site's reply (--interval s apart: sites finishing
one after another; 0: all at once, the coordinator's worst case, it then folds the whole backlog after the
last arrival); pull_messages hands a due reply over as fresh bytes, as a transport delivers it. Replies are
built from --pool distinct encoded updates, so the grid holds --pool updates, not N (part of the idle RSS).

Measured per case, in one process:
  after_last_reply_s  seconds from the last reply's arrival time to train_round's return (the new global
                      adapter as the ArrayRecord the next round sends): the target is < 1 s;
  rss_above_idle      Linux VmHWM over the whole round minus the RSS just before it (the strategy already
                      holding the previous global adapter, as in round 2+), in float32 adapters (target <= 3);
  max_abs_err_vs_f64  of the new global adapter vs the float64-accumulator case (same arrival order), and the
                      same relative to the largest entry of the mean delta.
Case "collect" is what the coordinator did before: Grid.send_and_receive holds every reply, then
aggregate_train (--collect-sites of them, as many as fit in RAM).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterable, Mapping

import numpy as np

from federation.adapter import from_array_record, to_array_record
from federation.compression import encode_upload
from simulations.bench import (_reset_rss_high_water_mark, _return_free_heap_to_os, _rss_kib, machine_info,
                               write_result)
from simulations.bench.aggregation import LLAMA2_7B, adapter_shapes, arrive, site_pool, to_message


class SimulatedGrid:
    """A Flower Grid over `sites` simulated nodes whose train replies arrive on a schedule (see module doc)."""

    def __init__(self, sites: int, pool_messages: list, weights: list[int], interval: float) -> None:
        from flwr.supercore.run import Run

        self.pool, self.weights, self.interval = pool_messages, weights, interval
        self.node_ids = list(range(1, sites + 1))
        self._run = Run.create_empty(1)
        self._ids = itertools.count(1)
        self.due: dict[str, tuple[float, int]] = {}  # message id -> (arrival time, site index)
        self.sent: dict[str, object] = {}
        self.last_arrival = 0.0
        self.delivered = 0
        self.last_delivery = (0.0, 0.0)  # (perf_counter, process_time) when the last reply was handed over

    @property
    def run(self):
        return self._run

    def set_run(self, run) -> None:
        self._run = run

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def get_nodes(self):
        return []

    def push_messages(self, messages) -> list[str]:
        start = time.perf_counter()
        ids = []
        for index, msg in enumerate(messages):
            message_id = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = message_id
            self.sent[message_id] = msg
            self.due[message_id] = (start + self.interval * (index + 1), index)
            ids.append(message_id)
        self.last_arrival = max(t for t, _ in self.due.values())
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list:
        from flwr.app import Message, MetricRecord, RecordDict

        now, out = time.perf_counter(), []
        for message_id in message_ids:
            if message_id in self.due and self.due[message_id][0] <= now:
                _, index = self.due.pop(message_id)
                content = RecordDict({
                    "arrays": arrive(self.pool[index % len(self.pool)]),
                    "metrics": MetricRecord({"num-examples": int(self.weights[index]), "train-loss": 1.0,
                                             "partition-id": index})})
                out.append(Message(content, reply_to=self.sent.pop(message_id)))
                self.delivered += 1
                if not self.due:
                    self.last_delivery = (time.perf_counter(), time.process_time())
        return out

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list:
        """Grid.send_and_receive as Flower's grids implement it: push, then poll until every reply is in."""
        ids = set(self.push_messages(messages))
        replies = []
        while ids:
            pulled = self.pull_messages(sorted(ids))
            replies += pulled
            ids -= {m.metadata.reply_to_message_id for m in pulled}
            if ids:
                time.sleep(0.05)
        return replies


def run_case(case: str, accumulator: str, sites: int, pool_messages, weights, interval: float,
             global_adapter: Mapping[str, np.ndarray], adapter_bytes: int, fold_order: str = "arrival"
             ) -> tuple[dict, dict]:
    """One training round through SimulatedGrid; returns (row, new global adapter arrays)."""
    import gc

    from flwr.app import ConfigRecord

    from server.strategy import LoraDeltaStrategy
    from strategies.aggregators import FedAvgAggregator

    strategy = LoraDeltaStrategy(FedAvgAggregator(), fraction_train=1.0, min_train_nodes=sites,
                                 min_available_nodes=sites, accumulator=accumulator)
    strategy.fold_order = fold_order  # federation.fold_order; the figures in BENCHMARKS.md are "arrival"
    grid = SimulatedGrid(sites, pool_messages, weights, interval)
    arrays = to_array_record(global_adapter)
    strategy.current_global = from_array_record(arrays)  # what the previous round left
    gc.collect()
    _return_free_heap_to_os()
    _reset_rss_high_water_mark()
    idle_kib = _rss_kib("VmRSS")
    start = time.perf_counter()
    if case == "streaming":
        new_arrays, _ = strategy.train_round(1, arrays, ConfigRecord({}), grid, timeout=None)
    else:
        messages = strategy.configure_train(1, arrays, ConfigRecord({}), grid)
        new_arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    done, done_cpu = time.perf_counter(), time.process_time()
    peak_kib = _rss_kib("VmHWM")
    ledger = strategy.ledger(1)
    assert len(ledger.accepted) == sites, (len(ledger.accepted), ledger.rejected)
    row = {"case": case, "accumulator": accumulator, "fold_order": fold_order, "sites": sites, "interval_s": interval,
           "round_seconds": done - start, "after_last_reply_s": done - grid.last_arrival,
           "after_last_pull_s": done - grid.last_delivery[0], "cpu_after_last_pull_s": done_cpu - grid.last_delivery[1],
           "rss_above_idle_adapters": (peak_kib - idle_kib) * 1024 / adapter_bytes,
           "idle_rss_gib": idle_kib / 2**20}
    return row, from_array_record(new_arrays)


def main(argv: list[str] | None = None) -> int:
    """Run the cases, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.5,
                        help="seconds between two sites' replies (0: all arrive at once)")
    parser.add_argument("--burst", action="store_true", help="also run the all-at-once case (float32)")
    parser.add_argument("--collect-sites", type=int, default=0, help="sites for the collect-all baseline (0: skip)")
    parser.add_argument("--accumulators", default="float32,kahan32,float64")
    parser.add_argument("--preset", default=LLAMA2_7B)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold-order", default="arrival", choices=("arrival", "fixed"),
                        help="federation.fold_order of the streaming cases")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Messages are stamped with these
    shapes = adapter_shapes(args.preset, args.rank)
    params = int(sum(np.prod(s) for s in shapes.values()))
    adapter_bytes = 4 * params
    rng = np.random.default_rng(args.seed)
    weights = rng.integers(50, 500, max(args.sites, args.collect_sites)).tolist()
    pool = site_pool(shapes, args.pool, args.seed)
    pool_messages = [to_message(encode_upload(u, "bf16")) for u in pool]
    del pool
    global_adapter = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in sorted(shapes.items())}
    machine = machine_info()
    load = open("/proc/loadavg").read().split()[:3]
    print(f"{args.preset} LoRA r={args.rank}: {params / 1e6:.1f}M params, {adapter_bytes / 1e6:.0f} MB per float32 "
          f"adapter, bf16 uploads; {machine['cpu_model']}, {machine['usable_cores']} cores, load {' '.join(load)}",
          flush=True)

    cases = [("streaming", acc, args.sites, args.interval) for acc in args.accumulators.split(",")]
    if args.burst:
        cases.append(("streaming", "float32", args.sites, 0.0))
    if args.collect_sites:
        cases.append(("collect", "float32", args.collect_sites, args.interval))
    rows, reference = [], None
    for case, accumulator, sites, interval in cases:
        row, new_global = run_case(case, accumulator, sites, pool_messages, weights, interval, global_adapter,
                                   adapter_bytes, args.fold_order)
        if case == "streaming" and accumulator == "float64" and interval == args.interval:
            reference = new_global
        row["new_global"] = new_global
        rows.append(row)
        print(f"{case:9s} acc={accumulator:7s} sites={sites:3d} interval={interval:.2f}s  round {row['round_seconds']:6.1f}s"
              f"  after last reply {row['after_last_reply_s']:5.2f}s (after its pull {row['after_last_pull_s']:.2f}s, "
              f"CPU {row['cpu_after_last_pull_s']:.2f}s)  RSS above idle "
              f"{row['rss_above_idle_adapters']:.2f} adapters", flush=True)
    for row in rows:
        new_global = row.pop("new_global")
        if reference is not None and row["sites"] == args.sites:
            diff = max(float(np.max(np.abs(new_global[k].astype(np.float64) - reference[k]))) for k in reference)
            scale = max(float(np.max(np.abs(reference[k].astype(np.float64) - global_adapter[k]))) for k in reference)
            differ = sum(int(np.sum(new_global[k] != reference[k])) for k in reference)
            row.update(max_abs_err_vs_f64=diff, err_over_max_mean_delta=diff / scale, entries_differing_vs_f64=differ)
            print(f"{row['case']:9s} acc={row['accumulator']:7s} interval={row['interval_s']:.2f}s: new global vs "
                  f"float64 accumulator: max |err| {diff:.2e} ({diff / scale:.1e} of max |mean delta|), {differ} of "
                  f"{params} entries differ")
    summary = {"benchmark": "coordinator_round", "preset": args.preset, "rank": args.rank, "adapter_params": params,
               "adapter_bytes_fp32": adapter_bytes, "upload": "bf16", "pool": args.pool, "machine": machine,
               "load_average": load, "rows": rows}
    write_result(args.out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
