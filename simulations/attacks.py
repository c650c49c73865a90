"""Faulty or malicious sites for robustness experiments: ClientApps whose chosen sites corrupt what they send."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import app as honest
from federation.adapter import from_array_record, to_array_record
from federation.compression import decode_upload
from federation.packing import unpack_arrays


def make_attacking_client_app(attacker_partition_ids: set[int], scale: float) -> ClientApp:
    """Sites in `attacker_partition_ids` upload `scale` x their true delta (100: blown up, -1: sign-flipped)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest.train(msg, context)
        if int(context.node_config.get("partition-id", -1)) not in attacker_partition_ids:
            return reply
        delta = decode_upload(unpack_arrays(reply.content["arrays"]))
        corrupted = to_array_record({k: v * scale for k, v in delta.items()})
        return Message(content=RecordDict({"arrays": corrupted, "metrics": reply.content["metrics"]}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest.evaluate(msg, context)

    return app


def _zero_delta(msg: Message) -> dict[str, np.ndarray]:
    return {key: np.zeros_like(value) for key, value in from_array_record(msg.content["arrays"]).items()}


def _no_train_loss(msg: Message) -> RecordDict:
    # The outside review's case (issue 10): it used to end the run with a KeyError.
    return RecordDict({"arrays": to_array_record(_zero_delta(msg)), "metrics": MetricRecord({"num-examples": 50})})


def _transposed_delta(msg: Message) -> RecordDict:
    arrays = to_array_record({key: value.T for key, value in _zero_delta(msg).items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 50, "train-loss": 1.0})})


def _metrics_as_strings(msg: Message) -> RecordDict:
    return RecordDict({"arrays": to_array_record(_zero_delta(msg)),
                       "metrics": ConfigRecord({"num-examples": "many", "train-loss": "low"})})


def _nan_examples(msg: Message) -> RecordDict:
    return RecordDict({"arrays": to_array_record(_zero_delta(msg)),
                       "metrics": MetricRecord({"num-examples": float("nan"), "train-loss": 1.0})})


def _no_eval_loss(msg: Message) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": 5, "eval-tokens": 40})})


def _zero_eval_tokens(msg: Message) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": 5, "eval-loss": 0.0, "eval-tokens": 0})})


def _eval_with_arrays(msg: Message) -> RecordDict:
    return RecordDict({"arrays": msg.content["arrays"],
                       "metrics": MetricRecord({"num-examples": 5, "eval-loss": 0.0, "eval-tokens": 40})})


# One per round, in turn: what a malformed site replies instead of training / evaluating.
MALFORMED_TRAIN_REPLIES: tuple[Callable[[Message], RecordDict], ...] = (
    _no_train_loss, _transposed_delta, _metrics_as_strings, _nan_examples)
MALFORMED_EVAL_REPLIES: tuple[Callable[[Message], RecordDict], ...] = (
    _no_eval_loss, _zero_eval_tokens, _eval_with_arrays)


def make_malformed_client_app(attacker_partition_ids: set[int]) -> ClientApp:
    """Sites in `attacker_partition_ids` never train; every round they reply with another malformed message
    (MALFORMED_TRAIN_REPLIES / MALFORMED_EVAL_REPLIES, by server round); the other sites are honest."""
    app = ClientApp()

    def attacking(context: Context) -> bool:
        return int(context.node_config.get("partition-id", -1)) in attacker_partition_ids

    def server_round(msg: Message) -> int:
        return int(msg.content["config"].get("server-round", 0))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if not attacking(context):
            return honest.train(msg, context)
        make = MALFORMED_TRAIN_REPLIES[(server_round(msg) - 1) % len(MALFORMED_TRAIN_REPLIES)]
        return Message(content=make(msg), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        if not attacking(context):
            return honest.evaluate(msg, context)
        make = MALFORMED_EVAL_REPLIES[server_round(msg) % len(MALFORMED_EVAL_REPLIES)]
        return Message(content=make(msg), reply_to=msg)

    return app
