"""data.loader=hf: a pool read through Hugging Face `datasets` and mapped onto federation.records' records.

data.source is a directory (every parquet / arrow / json / jsonl / csv file under it, in sorted order, each read on
its own so that an error names its file), one such file, a `save_to_disk` directory, or a hub id. A local path never
touches the network; a hub id is downloaded (or taken from the `datasets` cache) by `load_dataset`.
data.columns maps dataset columns onto the record fields; each row then goes through the same record check as a
JSONL line, so a bad value is a DataFormatError naming the file, the row and the column.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from federation.config import DataConfig
from federation.records import DataFormatError, parse_record

# File suffix -> the `datasets` packaged builder that reads it.
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
# data.format -> the record fields it needs; "auto" takes the first format whose required columns all exist.
FORMAT_FIELDS = {"chat": ("messages",), "alpaca": ("instruction", "output"), "plain": ("text",)}
FORMATS = ("auto", *FORMAT_FIELDS)
OPTIONAL_FIELDS = {"alpaca": ("input",)}  # alpaca's input is empty where the column is absent
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")  # what Dataset(Dict).save_to_disk writes


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or log lines from `datasets` while reading: a failure comes back as one DataFormatError."""
    import datasets

    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    previous = datasets.utils.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(previous)
        if was_enabled:
            datasets.enable_progress_bars()


def _reason(exc: BaseException) -> str:
    """The first line of the innermost useful error (datasets wraps a reader's error in DatasetGenerationError)."""
    chain = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    if any(type(e).__name__ == "SchemaInferenceError" for e in chain):
        return "no examples"
    useful = [e for e in chain if type(e).__name__ != "DatasetGenerationError" and str(e).strip()] or chain
    return next(line.strip() for line in f"{useful[0]}\n{type(useful[0]).__name__}".splitlines() if line.strip())


def data_files(path: Path) -> list[Path]:
    """The readable data files of a directory (recursive, sorted, hidden ones skipped), or [path] for a file."""
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise DataFormatError(f"{path}: not a data file; readable suffixes: {', '.join(BUILDERS)}")
        return [path]
    files = sorted(
        file for file in path.rglob("*")
        if file.is_file() and file.suffix.lower() in BUILDERS
        and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )
    if not files:
        raise DataFormatError(f"{path}: no data files (readable suffixes: {', '.join(BUILDERS)})")
    return files


def _load_file(file: Path, data_cfg: DataConfig) -> Any:
    """One data file as a datasets.Dataset."""
    from datasets import load_dataset

    builder = BUILDERS[file.suffix.lower()]
    try:
        with _quiet_datasets():
            return load_dataset(builder, data_files=str(file), split="train", cache_dir=data_cfg.cache_dir or None)
    except Exception as exc:  # whatever the builder raised: pyarrow, json, datasets' own errors
        raise DataFormatError(f"{file}: cannot read as {builder} ({_reason(exc)})") from None


def _pick_split(dataset: Any, split: str, where: str) -> Any:
    from datasets import DatasetDict

    if not isinstance(dataset, DatasetDict):
        return dataset
    if split not in dataset:
        raise DataFormatError(f"{where}: no split {split!r} (data.split / data.eval_split); splits: "
                              f"{', '.join(dataset)}")
    return dataset[split]


def _load_hub(source: str, data_cfg: DataConfig, split: str) -> Any:
    from datasets import load_dataset

    try:
        with _quiet_datasets():
            return load_dataset(source, name=data_cfg.subset or None, split=split,
                                cache_dir=data_cfg.cache_dir or None)
    except Exception as exc:  # no network, unknown id, unknown split or subset
        raise DataFormatError(f"{source}: not a local file or directory, and loading it as a hub id failed "
                              f"({_reason(exc)})") from None


def _record_format(columns: list[str], data_cfg: DataConfig, where: str) -> str:
    """The record format of a dataset with these columns (data.format, or the first whose columns all exist)."""
    mapping = dataclasses.asdict(data_cfg.columns)
    candidates = list(FORMAT_FIELDS) if data_cfg.format == "auto" else [data_cfg.format]
    for fmt in candidates:
        if all(mapping[name] in columns for name in FORMAT_FIELDS[fmt]):
            return fmt
    if data_cfg.format != "auto":
        missing = next(name for name in FORMAT_FIELDS[data_cfg.format] if mapping[name] not in columns)
        raise DataFormatError(f"{where}: no column {mapping[missing]!r} (data.columns.{missing}, needed by "
                              f"data.format={data_cfg.format}); columns: {', '.join(columns)}")
    wanted = " | ".join("+".join(repr(mapping[name]) for name in fields) for fields in FORMAT_FIELDS.values())
    raise DataFormatError(f"{where}: none of the record columns {wanted} (data.columns.*; chat | alpaca | plain); "
                          f"columns: {', '.join(columns)}")


def dataset_records(dataset: Any, data_cfg: DataConfig, where: str, label_required: bool = False) -> list[dict]:
    """A datasets.Dataset's rows as records (alpaca / chat / plain), keeping the data.partition_by value.

    label_required: the data.partitioner groups by data.partition_by, so a dataset without that column is an error.
    """
    columns = list(dataset.column_names)
    fmt = _record_format(columns, data_cfg, where)
    label = data_cfg.partition_by
    if label_required and label not in columns:
        raise DataFormatError(f"{where}: no column {label!r} (data.partition_by, which data.partitioner="
                              f"{data_cfg.partitioner} groups by); columns: {', '.join(columns)}")
    mapping = dataclasses.asdict(data_cfg.columns)
    fields = [name for name in (*FORMAT_FIELDS[fmt], *OPTIONAL_FIELDS.get(fmt, ())) if mapping[name] in columns]
    kept = list(dict.fromkeys([*(mapping[name] for name in fields), *(c for c in (label, "source") if c in columns)]))
    renamed = {name: mapping[name] for name in fields if mapping[name] != name}
    note = f" (data.columns: {', '.join(f'{k}={v}' for k, v in renamed.items())})" if renamed else ""
    records = []
    for row_no, row in enumerate(dataset.select_columns(kept).to_list()):
        obj = {name: row[mapping[name]] for name in fields}
        if obj.get("input") is None:  # a null input (parquet fills absent values with null) is an empty one
            obj.pop("input", None)
        try:
            record = parse_record(obj, f"{where}: row {row_no}: ")
        except DataFormatError as exc:
            raise DataFormatError(f"{exc}{note}") from None
        record["source"] = "" if row.get("source") is None else str(row["source"])
        if label in row and label != "source":
            record[label] = row[label]
        records.append(record)
    return records


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES)


def read_hf_records(source: str, data_cfg: DataConfig, split: str, label_required: bool = False) -> list[dict]:
    """Records of a local directory / file / save_to_disk directory, or of a hub id's `split` (see dataset_records).

    Any problem is a DataFormatError whose message starts with the file (or directory, or hub id) it concerns.
    """
    path = Path(source).expanduser()
    if _is_saved_dataset(path):
        from datasets import load_from_disk

        try:
            with _quiet_datasets():
                dataset = load_from_disk(str(path))
        except Exception as exc:
            raise DataFormatError(f"{path}: cannot load the saved dataset ({_reason(exc)})") from None
        records = dataset_records(_pick_split(dataset, split, str(path)), data_cfg, str(path), label_required)
    elif path.exists():
        records = []
        for file in data_files(path):
            records.extend(dataset_records(_load_file(file, data_cfg), data_cfg, str(file), label_required))
    elif source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1:
        raise DataFormatError(f"{source}: not found")  # a path, not a hub id (owner/name)
    else:
        dataset = _load_hub(source, data_cfg, split)
        records = dataset_records(dataset, data_cfg, source, label_required)
    if not records:
        raise DataFormatError(f"{source}: no examples")
    return records
