"""Upload codecs on the demo federation: bytes per client per round and the final union eval loss.

    python -m simulations.bench.communication --out /tmp/communication.json [hydra overrides]

Runs server.app.run_federation over simulations.inprocess.InProcessGrid (tiny model, 4 sites,
5 rounds, one seed) once per codec. The codec is applied without touching client/ or server/:
the ClientApp here calls client.app.train and re-encodes the delta of its reply (error feedback
state in the node's Flower Context.state), and the strategy subclass decodes each reply before
LoraDeltaStrategy validates and aggregates it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from federation.compression import ErrorFeedback, UploadCodec, decode_upload, encoded_nbytes
from simulations.bench import machine_info, write_result

EF_STATE_KEY = "fedtune.error-feedback"

# (label, codec, error feedback)
CASES: list[tuple[str, UploadCodec, bool]] = [
    ("fp32", UploadCodec("fp32"), False),
    ("bf16", UploadCodec("bf16"), True),
    ("fp16", UploadCodec("fp16"), True),
    ("int8", UploadCodec("int8"), True),
    ("int8-row", UploadCodec("int8", int8_per_row=True), True),
    ("int4+EF", UploadCodec("int4"), True),
    ("int4 no EF", UploadCodec("int4"), False),
    ("topk10+EF", UploadCodec("topk", topk_fraction=0.1), True),
    ("topk10 no EF", UploadCodec("topk", topk_fraction=0.1), False),
]


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Arrays of any dtype -> ArrayRecord (federation.adapter.to_array_record casts everything to one float dtype)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def compressing_client_app(codec: UploadCodec, error_feedback: bool) -> ClientApp:
    """client.app's ClientApp, with the train reply's delta re-encoded by `codec`."""
    from client import app as site

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = site.train(msg, context)
        delta = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        if error_feedback:
            ef = ErrorFeedback()
            if EF_STATE_KEY in context.state.array_records:
                ef.load_state_dict({k: v.numpy() for k, v in context.state[EF_STATE_KEY].items()})
            encoded = ef.encode(delta, codec)
            context.state[EF_STATE_KEY] = to_record(ef.state_dict())
        else:
            encoded = codec.encode(delta)
        reply.content["arrays"] = to_record(encoded)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return site.evaluate(msg, context)

    return app


def decoding_strategy(strategy):
    """The same strategy object, with replies decoded before it validates them (class swapped in place)."""
    from server.strategy import LoraDeltaStrategy

    class DecodingStrategy(type(strategy)):
        """Decodes encoded uploads; the ledger counts the encoded (wire) bytes."""

        payload_bytes: dict[int, list[int]]

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            wire = {}
            for msg in replies:
                if msg.has_error():
                    continue
                node = msg.metadata.src_node_id
                record = msg.content["arrays"]
                wire[node] = record.count_bytes()
                encoded = {k: v.numpy() for k, v in record.items()}
                self.payload_bytes.setdefault(server_round, []).append(encoded_nbytes(encoded))
                try:
                    msg.content["arrays"] = to_record(decode_upload(encoded))
                except ValueError as exc:  # left encoded: LoraDeltaStrategy rejects it (wrong keys)
                    print(f"round {server_round}: node {node}: undecodable upload: {exc}")
            result = super().aggregate_train(server_round, replies)
            ledger = self.ledger(server_round)
            ledger.bytes_up = sum(wire.values())
            for node, site in ledger.per_site.items():
                site["bytes_up"] = wire.get(node, site["bytes_up"])
            return result

    assert isinstance(strategy, LoraDeltaStrategy)
    strategy.__class__ = DecodingStrategy  # keeps every setting build_strategy made, whatever they are
    strategy.payload_bytes = {}
    return strategy


def run_case(cfg, codec: UploadCodec, error_feedback: bool) -> dict:
    """One federation with `codec`; per-round rows plus byte counts."""
    import server.app as coordinator
    from simulations.inprocess import InProcessGrid

    built = {}

    def build(run_cfg):
        built["strategy"] = decoding_strategy(original_build(run_cfg))
        return built["strategy"]

    original_build = coordinator.build_strategy
    grid = InProcessGrid(compressing_client_app(codec, error_feedback), cfg.federation.num_clients)
    with mock.patch.object(coordinator, "build_strategy", build):
        rows = coordinator.run_federation(grid, cfg)
    train_rows = [r for r in rows if r["round"] > 0]
    payload = built["strategy"].payload_bytes
    return {
        "final_eval_loss": rows[-1]["eval_loss"],
        "eval_loss_by_round": [r["eval_loss"] for r in rows],
        "bytes_up_per_client_round": float(np.mean([r["bytes_up"] / r["clients_ok"] for r in train_rows])),
        "payload_up_per_client_round": float(np.mean([b for r in payload.values() for b in r])),
        "bytes_down_per_client_round": float(np.mean([r["bytes_down"] / r["clients_sampled"] for r in train_rows])),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every codec, print the table, write JSON."""
    from rich.console import Console
    from rich.table import Table

    from federation.adapter import to_array_record
    from federation.compose import compose_config
    from server.app import starting_adapter

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--workdir", default="", help="run directories and model cache (default: a temp dir)")
    parser.add_argument("--cases", default=",".join(label for label, _, _ in CASES))
    parser.add_argument("overrides", nargs="*", help="hydra overrides (default: the demo federation)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedtune-comm-"))
    wanted = args.cases.split(",")

    results = []
    fp32_wire = fp32_payload = None
    for label, codec, error_feedback in CASES:
        if label not in wanted:
            continue
        # Sites send fp32 and compressing_client_app applies the case's codec (with its own error feedback);
        # the built-in default (bf16) would otherwise encode every upload twice.
        cfg = compose_config([f"output_dir={work / label.replace(' ', '_')}", f"model.cache_dir={work / 'models'}",
                              "federation.upload_codec=fp32", *args.overrides])
        if fp32_wire is None:
            adapter = starting_adapter(cfg)
            fp32_wire, fp32_payload = to_array_record(adapter).count_bytes(), 4 * sum(v.size for v in adapter.values())
        row = {"case": label, "codec": codec.name, "error_feedback": error_feedback,
               "topk_fraction": codec.topk_fraction if codec.name == "topk" else None,
               **run_case(cfg, codec, error_feedback)}
        results.append(row)
        print(f"{label}: final union eval loss {row['final_eval_loss']:.5f}, "
              f"{row['bytes_up_per_client_round']:.0f} B up per client per round", flush=True)

    fp32 = next((r for r in results if r["case"] == "fp32"), None)
    for row in results:
        row["up_vs_fp32_wire"] = row["bytes_up_per_client_round"] / fp32_wire
        row["payload_vs_fp32_payload"] = row["payload_up_per_client_round"] / fp32_payload
        row["eval_loss_change_vs_fp32_pct"] = None if fp32 is None else \
            100.0 * (row["final_eval_loss"] - fp32["final_eval_loss"]) / fp32["final_eval_loss"]

    machine = machine_info()
    cfg = compose_config(args.overrides)
    table = Table(title=f"Upload codecs, demo federation ({cfg.federation.num_clients} sites, {cfg.federation.rounds} "
                        f"rounds, tiny model, LoRA r={cfg.lora.r}; fp32 adapter {fp32_payload:,} B payload, "
                        f"{fp32_wire:,} B on the wire) on {machine['cpu_model']}, {machine['usable_cores']} cores")
    for col in ("case", "up B/client/round (wire)", "vs fp32", "payload B", "vs fp32", "down B/client/round",
                "final eval loss", "change vs fp32"):
        table.add_column(col, justify="right")
    for r in results:
        change = r["eval_loss_change_vs_fp32_pct"]
        table.add_row(r["case"], f"{r['bytes_up_per_client_round']:,.0f}", f"{r['up_vs_fp32_wire']:.3f}",
                      f"{r['payload_up_per_client_round']:,.0f}", f"{r['payload_vs_fp32_payload']:.3f}",
                      f"{r['bytes_down_per_client_round']:,.0f}", f"{r['final_eval_loss']:.5f}",
                      "-" if change is None else f"{change:+.3f}%")
    Console(width=200).print(table)
    summary = {"benchmark": "communication", "overrides": args.overrides, "sites": cfg.federation.num_clients,
               "rounds": cfg.federation.rounds, "lora_r": cfg.lora.r, "adapter_bytes_fp32_payload": fp32_payload,
               "adapter_bytes_fp32_wire": fp32_wire, "machine": machine, "rows": results}
    write_result(args.out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
