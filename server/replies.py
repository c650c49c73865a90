"""The coordinator's one check of what a site sends back: metric names, reply schemas and the reply decoders.

Every read of a reply's content goes through here, so a reply - whatever it holds - is either decoded
into values the aggregation code can trust, or refused with ``UpdateRejected`` and a reason that the
round's ledger records for that site; it never raises anything else into the round loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from federation.compression import SEPARATOR, decode_upload
from federation.packing import Entry, PackedLayoutError, is_packed, unpack_arrays
from strategies.fedavg import UpdateRejected

log = logging.getLogger("fedtune.server")

# Metric names of the site protocol (federation/protocol.py, the one place both sides read them from).
from federation.protocol import (DATA_FINGERPRINT_RECORD, DP_SGD_EPSILON, EVAL_EXACT_MATCH, EVAL_GENERATED, EVAL_GENERATED_TOKENS,  # noqa: E402,F401
                                 EVAL_GENERATION_SECONDS, EVAL_LOSS, EVAL_PERPLEXITY, EVAL_ROUGE_L, EVAL_TOKEN_F1,
                                 EVAL_TOKENS, GENERATION_SCORES, INPUT_TOKENS, NUM_EXAMPLES, PARTITION_ID,
                                 PEAK_MEMORY_BYTES, TOKENS_PER_SECOND, TRAINED_TOGETHER, TRAIN_LOSS, TRAIN_SECONDS,
                                 TRAIN_STEPS, TRAIN_TOKENS)

# Counts are summed and used as weights in float64, which represents whole numbers exactly up to 2**53;
# a larger claimed count could also overflow the weighted sums.
MAX_COUNT = 2**53
# A reply's MetricRecord may carry at most this many metrics (several times what the schemas below name): every kept
# metric lands in the round's metrics.jsonl row, so a reply with thousands is refused rather than stored.
MAX_METRICS = 64
# Metrics a schema does not name are kept only under names of at most this many characters (well above the protocol's
# own, federation/protocol.py); a longer one is ignored rather than written to metrics.jsonl.
MAX_METRIC_NAME_CHARS = 64
_NUMBER_TYPES = (int, float, np.integer, np.floating)


@dataclass(frozen=True)
class Number:
    """What a metric value must be: a real number (not a bool, str, list or None), maybe whole, maybe bounded below."""

    whole: bool = False
    minimum: float | None = None
    maximum: float | None = None
    allow_inf: bool = False  # +inf is a valid value (e.g. a privacy budget that is spent)

    def __str__(self) -> str:
        text = "a whole number" if self.whole else ("a number" if self.allow_inf else "a finite number")
        if self.minimum is not None and self.maximum is not None:
            return text + f" in [{self.minimum:g}, {self.maximum:g}]"
        return (text + ("" if self.minimum is None else f" >= {self.minimum:g}")
                + ("" if self.maximum is None else f" <= {self.maximum:g}"))

    def __call__(self, value: object) -> int | float:
        """The value as a Python int (whole) or float; ValueError saying what was expected otherwise."""
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, _NUMBER_TYPES):
            raise ValueError(f"must be {self}, got {type(value).__name__} {_short(value)}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond float64's range
            raise ValueError(f"must be {self}, got {_short(value)}") from None
        if math.isnan(number) or (math.isinf(number) and not (self.allow_inf and number > 0)):
            raise ValueError(f"must be {self}, got {number}")
        if self.whole and not number.is_integer():
            raise ValueError(f"must be {self}, got {_short(value)}")
        if self.whole and abs(number) > MAX_COUNT:
            raise ValueError(f"must be {self} of at most 2**53, got {_short(value)}")
        if (self.minimum is not None and number < self.minimum) or (self.maximum is not None and number > self.maximum):
            raise ValueError(f"must be {self}, got {_short(value)}")
        return int(number) if self.whole else number


COUNT = Number(whole=True, minimum=0)
POSITIVE_COUNT = Number(whole=True, minimum=1)
FINITE = Number()
NON_NEGATIVE = Number(minimum=0.0)
LABEL = Number(whole=True)
UNIT_INTERVAL = Number(minimum=0.0, maximum=1.0)


@dataclass(frozen=True)
class MetricSchema:
    """The metrics of one kind of reply: required ones refuse the reply when absent or malformed; optional
    ones are dropped when malformed; metrics it does not name are kept only as finite numbers under short names;
    a reply with more than MAX_METRICS metrics is refused."""

    required: Mapping[str, Number]
    optional: Mapping[str, Number] = field(default_factory=dict)

    def with_optional(self, extra: Mapping[str, Number]) -> MetricSchema:
        """This schema plus more optional metrics (a strategy's own, e.g. FLoRA's merged-updates count)."""
        return MetricSchema(self.required, {**self.optional, **extra})

    def check(self, metrics: Mapping[str, object], where: str) -> dict[str, int | float]:
        """Checked copy of `metrics` (UpdateRejected naming the metric if a required one is missing or malformed)."""
        if len(metrics) > MAX_METRICS:
            raise UpdateRejected(f"{len(metrics)} metrics, more than the {MAX_METRICS} a reply may carry")
        checked: dict[str, int | float] = {}
        for name, kind in self.required.items():
            if name not in metrics:
                raise UpdateRejected(f"metric {name!r} is missing")
            try:
                checked[name] = kind(metrics[name])
            except ValueError as exc:
                raise UpdateRejected(f"metric {name!r} {exc}") from None
        for name, value in metrics.items():
            if name in self.required:
                continue
            if name not in self.optional and not (isinstance(name, str) and len(name) <= MAX_METRIC_NAME_CHARS):
                log.warning("%s: ignoring metric %s: a name of more than %d characters is no protocol metric", where,
                            _short(name), MAX_METRIC_NAME_CHARS)
                continue
            try:
                checked[name] = self.optional.get(name, FINITE)(value)
            except ValueError as exc:
                log.warning("%s: ignoring metric %s: %s", where, _short(name), exc)
        return checked


# Losses are token-mean cross-entropies (>= 0); counts are whole numbers.
TRAIN_REPLY = MetricSchema(
    required={NUM_EXAMPLES: POSITIVE_COUNT, TRAIN_LOSS: NON_NEGATIVE},
    optional={TRAIN_TOKENS: COUNT, INPUT_TOKENS: COUNT, TRAIN_STEPS: COUNT, TRAIN_SECONDS: NON_NEGATIVE,
              TOKENS_PER_SECOND: NON_NEGATIVE, PEAK_MEMORY_BYTES: COUNT, PARTITION_ID: LABEL,
              DP_SGD_EPSILON: Number(minimum=0.0, allow_inf=True), TRAINED_TOGETHER: POSITIVE_COUNT})
# exp(loss) >= 1; a perplexity past float64 would be inf, which sites cap (federation.text_metrics.perplexity).
EVAL_REPLY = MetricSchema(required={NUM_EXAMPLES: POSITIVE_COUNT, EVAL_LOSS: NON_NEGATIVE, EVAL_TOKENS: POSITIVE_COUNT},
                          optional={PARTITION_ID: LABEL, EVAL_PERPLEXITY: Number(minimum=1.0),
                                    EVAL_GENERATED: POSITIVE_COUNT, EVAL_EXACT_MATCH: UNIT_INTERVAL,
                                    EVAL_TOKEN_F1: UNIT_INTERVAL, EVAL_ROUGE_L: UNIT_INTERVAL,
                                    EVAL_GENERATED_TOKENS: COUNT, EVAL_GENERATION_SECONDS: NON_NEGATIVE})


def _short(value: object) -> str:
    """A bounded description of a value for a log line or rejection reason (a hostile value may be huge)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    if isinstance(value, (str, bytes)) and len(value) > 40:
        return f"of length {len(value)} {value[:20]!r}..."
    if isinstance(value, list):
        return f"of length {len(value)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sent_to(messages: Iterable[Message]) -> dict[str, int]:
    """{message id: destination node} of sent messages (Grid.push_messages fills the ids)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def reply_node(msg: Message, destinations: Mapping[str, int]) -> int:
    """The node a reply is about: the one its request went to (Flower answers for an unreachable node itself,
    with the SuperLink as sender), else its sender."""
    return destinations.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)


_NPY_MAGIC = b"\x93NUMPY"


def array_view(array) -> np.ndarray:
    """Read-only numpy view of a Flower Array's bytes, without the copy Array.numpy() makes (np.load).

    Array(ndarray) stores the .npy format: a header, then the C-ordered data. Only that layout is viewed, when the
    header names the Array's own dtype and shape (so the view reads what np.load would); anything else - a
    Fortran-ordered or pickled payload, another stype, a header that disagrees - goes through Array.numpy().
    """
    dtype = np.dtype(array.dtype)
    if dtype.hasobject or array.stype != "numpy.ndarray":
        return array.numpy()
    count = math.prod(array.shape)
    offset = len(array.data) - count * dtype.itemsize
    header = bytes(array.data[:offset]) if 0 <= offset <= 4096 else b""
    expected = f"'descr': '{dtype.str}', 'fortran_order': False, 'shape': {tuple(array.shape)}, ".encode()
    if not header.startswith(_NPY_MAGIC) or expected not in header:  # what np.load would read, or its reading
        return array.numpy()
    return np.frombuffer(array.data, dtype=dtype, count=count, offset=offset).reshape(array.shape)


def layout_check(expected: Mapping[str, np.ndarray]) -> Callable[[Entry], None]:
    """check_entry for unpack_arrays: every packed entry is a part of an expected tensor (its key, or
    ``key::<codec part>``) no larger than that tensor plus a codec's small shape header (1 + ndim values)."""
    limits = {key: int(np.size(value)) + 1 + int(np.ndim(value)) for key, value in expected.items()}

    def check(entry: Entry) -> None:
        key = entry.name.split(SEPARATOR, 1)[0]
        if key not in limits:
            raise PackedLayoutError(f"packed entry {_short(entry.name)} is no part of the expected adapter")
        if entry.size > limits[key]:
            raise PackedLayoutError(f"packed entry {_short(entry.name)} declares {entry.size} elements, "
                                    f"more than its tensor's {limits[key] - 1 - np.ndim(expected[key])}")

    return check


def decode_arrays(record: ArrayRecord, expected: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a record as sent (any dtype); UpdateRejected if they cannot be read.

    A packed record (federation/packing.py) has its layout checked before anything is copied: structure, dtypes,
    canonical offsets, and against `expected` (the adapter the reply must fit, when given) names and sizes.
    """
    try:
        if not is_packed(record):  # one Array per tensor (older sites): read-only views where they can be
            return {key: array_view(value) for key, value in record.items()}
        return unpack_arrays(record, None if expected is None else layout_check(expected), copy=False)
    except PackedLayoutError as exc:
        raise UpdateRejected(f"malformed packed arrays: {exc}") from None
    except Exception as exc:  # undecodable bytes, pickled objects, ...: this site only
        raise UpdateRejected(f"undecodable arrays: {type(exc).__name__}: {exc}") from None


def decode_train_reply(msg: Message, schema: MetricSchema, where: str, max_elements: int | None = None,
                       expected: Mapping[str, np.ndarray] | None = None
                       ) -> tuple[dict[str, np.ndarray], int, dict[str, int | float]]:
    """(delta as decoded from its upload codec, example count, checked metrics) of a train reply with exactly one
    ArrayRecord and one MetricRecord; UpdateRejected when it is malformed. `expected`: the adapter the upload
    must fit (checks a packed layout before it is unpacked)."""
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise UpdateRejected(f"reply must carry exactly one ArrayRecord and one MetricRecord, got "
                             f"{len(content.array_records)} and {len(content.metric_records)}")
    metrics = schema.check(next(iter(content.metric_records.values())), where)
    encoded = decode_arrays(next(iter(content.array_records.values())), expected)
    try:
        arrays = decode_upload(encoded, max_elements)
    except Exception as exc:  # malformed encoding (parts, dtypes, shapes): this site only
        raise UpdateRejected(f"undecodable upload: {type(exc).__name__}: {exc}") from None
    return arrays, metrics[NUM_EXAMPLES], metrics


def decode_eval_reply(msg: Message, schema: MetricSchema, where: str) -> dict[str, int | float]:
    """Checked metrics of an evaluate reply: exactly one MetricRecord and no arrays; UpdateRejected otherwise."""
    content = msg.content
    if content.array_records or len(content.metric_records) != 1:
        raise UpdateRejected(f"evaluate reply must carry exactly one MetricRecord and no ArrayRecord, got "
                             f"{len(content.metric_records)} and {len(content.array_records)}")
    return schema.check(next(iter(content.metric_records.values())), where)


# The train reply's optional ConfigRecord of the site's data fingerprint (client/task.py data_fingerprint):
# federation.protocol.DATA_FINGERPRINT_RECORD.
_SHA256_HEX = frozenset("0123456789abcdef")


def decode_data_fingerprint(msg: Message, where: str) -> dict[str, str | int] | None:
    """{"sha256", "examples"} from a train reply, or None when it has none or a malformed one (logged, not fatal:
    provenance is reported, the update itself was checked on its own)."""
    record = msg.content.config_records.get(DATA_FINGERPRINT_RECORD) if not msg.has_error() else None
    if record is None:
        return None
    digest, examples = record.get("sha256"), record.get("examples")
    try:
        examples = COUNT(examples)
    except ValueError as exc:
        log.warning("%s: ignoring data fingerprint: examples %s", where, exc)
        return None
    if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
        log.warning("%s: ignoring data fingerprint: sha256 must be 64 lowercase hex digits, got %s", where,
                    _short(digest))
        return None
    return {"sha256": digest, "examples": examples}


def metric_or_none(metrics: Mapping[str, object] | None, name: str, kind: type = float) -> int | float | None:
    """metrics[name] as `kind`, or None when there are no metrics or no such metric (for the metrics row)."""
    if metrics is None or name not in metrics:
        return None
    return kind(metrics[name])
