"""Site records: one JSON value (a JSONL line, a dataset row) checked and normalized to alpaca / chat / plain.

A record is a dict that remembers its format; every problem is a DataFormatError whose message starts with where
it is ("{path}:{line_no}: ", "{file}: row {n}: " or "{path}: ").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHAT_ROLES = ("system", "user", "assistant")


class DataFormatError(ValueError):
    """Bad site data; the message starts with "{path}:{line_no}: " (1-based) or "{path}: "."""


# ---------------------------------------------------------------------------------------------- parsing


def _require_str(obj: dict, key: str, where: str, required: bool = True) -> str:
    if key not in obj:
        if required:
            raise DataFormatError(f"{where}missing required field {key!r}")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DataFormatError(f"{where}field {key!r} must be a string, got {type(value).__name__}")
    return value


def _parse_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{where}field 'messages' must be a non-empty list")
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataFormatError(f"{where}messages[{position}] must be an object")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise DataFormatError(f"{where}messages[{position}] has role {role!r}; expected one of {CHAT_ROLES}")
        content = _require_str(message, "content", f"{where}messages[{position}]: ")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise DataFormatError(f"{where}the last message must be from the assistant, got {messages[-1]['role']!r}")
    # The prompt is the chat template applied to the earlier messages, which must not be empty.
    if len(messages) < 2:
        raise DataFormatError(f"{where}a chat needs at least one message before the final assistant message")
    return messages


def parse_record(obj: Any, where: str) -> dict[str, Any]:
    """Normalize one JSON value; the format is chosen by key: "messages", else "instruction"/"output", else "text"."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}expected a JSON object, got {type(obj).__name__}")
    # Other keys (e.g. a custom label field for partitioning) are kept as they are.
    record = dict(obj)
    record["source"] = _require_str(obj, "source", where, required=False)
    if "messages" in obj:
        record.update(format="chat", messages=_parse_messages(obj["messages"], where))
    elif "instruction" in obj or "output" in obj:
        record.update(
            format="alpaca",
            instruction=_require_str(obj, "instruction", where),
            input=_require_str(obj, "input", where, required=False),
            output=_require_str(obj, "output", where),
        )
    elif "text" in obj:
        record.update(format="plain", text=_require_str(obj, "text", where))
    else:
        raise DataFormatError(
            f"{where}none of the format keys: need 'messages' (chat), 'instruction'+'output' (alpaca) or 'text' (plain)"
        )
    return record


def read_jsonl_records(path: str | Path) -> list[dict]:
    """Parse a JSONL file of alpaca / chat / plain records; any problem is a DataFormatError naming file and line."""
    file = Path(path)
    if not file.exists():
        raise DataFormatError(f"{path}: not found")
    if not file.is_file():
        raise DataFormatError(f"{path}: not a file")
    records = []
    with file.open("rb") as handle:
        for line_no, raw_line in enumerate(handle, start=1):
            where = f"{path}:{line_no}: "
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataFormatError(f"{where}not valid UTF-8 ({error.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{where}invalid JSON ({error.msg}, column {error.colno})") from None
            records.append(parse_record(obj, where))
    if not records:
        raise DataFormatError(f"{path}: no examples")
    return records
