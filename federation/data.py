"""A site's examples: JSONL parsing, prompt formatting, masked tokenization, batching, and partitioning.

Records are dicts that remember their format ("alpaca" | "chat" | "plain"). The loss is computed only on
response tokens: prompt tokens get label -100 (ignored by torch's cross entropy).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from federation.config import DataConfig
from federation.demo_task import generate_demo_task

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHAT_TEMPLATE_NAME = "chat_template"
# The fields a str.format data.prompt_template may use (format_example fills them).
PROMPT_FIELDS = ("instruction", "input")
CHAT_ROLES = ("system", "user", "assistant")
# Joins alpaca's instruction and input, and the non-final chat contents under a str.format template.
PART_SEPARATOR = "\n\n"
TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"


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


def _parse_record(obj: Any, where: str) -> dict[str, Any]:
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
            records.append(_parse_record(obj, where))
    if not records:
        raise DataFormatError(f"{path}: no examples")
    return records


# ------------------------------------------------------------------------------------ formatting, tokens


def _chat_messages(record: dict) -> list[dict[str, str]]:
    if record["format"] == "chat":
        return record["messages"]
    user_content = record["instruction"] + (PART_SEPARATOR + record["input"] if record["input"] else "")
    return [{"role": "user", "content": user_content}, {"role": "assistant", "content": record["output"]}]


def format_example(record: dict, tokenizer: PreTrainedTokenizerBase, prompt_template: str) -> tuple[str, str]:
    """(prompt_text, response_text); the response ends with eos. Plain text records have an empty prompt.

    `record` is one of read_jsonl_records' dicts or a raw record in one of the same three formats.
    """
    if "format" not in record:
        # A raw record (e.g. from generate_demo_task) is validated and normalized here.
        record = _parse_record(record, "record: ")
    eos = tokenizer.eos_token
    if record["format"] == "plain":
        return "", record["text"] + eos
    messages = _chat_messages(record)
    if prompt_template == CHAT_TEMPLATE_NAME:
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return prompt_text, messages[-1]["content"] + eos
    if record["format"] == "chat":
        instruction = PART_SEPARATOR.join(message["content"] for message in messages[:-1])
        input_text = ""
    else:
        instruction, input_text = record["instruction"], record["input"]
    return prompt_template.format(instruction=instruction, input=input_text), messages[-1]["content"] + eos


def tokenize_example(
    prompt_text: str, response_text: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> dict[str, list[int]]:
    """input_ids = prompt ids + response ids; labels are -100 on prompt ids. Both lists have length <= max_seq_len.

    Truncation rule: when the pair is longer than max_seq_len, the prompt is cut from the LEFT (its end,
    next to the response, is kept) so that min(len(response_ids), max_seq_len // 2) response tokens fit;
    then the whole sequence is cut on the RIGHT to max_seq_len.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    # Tokenized separately so the prompt/response boundary is exact (no token spans it).
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    response_ids = list(tokenizer(response_text, add_special_tokens=False)["input_ids"])
    prompt_budget = max_seq_len - min(len(response_ids), max_seq_len // 2)
    if len(prompt_ids) > prompt_budget:
        prompt_ids = prompt_ids[len(prompt_ids) - prompt_budget :]
    input_ids = (prompt_ids + response_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_seq_len]
    return {"input_ids": input_ids, "labels": labels}


class SiteDataset(Dataset):
    """Tokenized examples; item i is {"input_ids": (T_i,) long, "labels": (T_i,) long}."""

    def __init__(
        self,
        records: Sequence[dict],
        tokenizer: PreTrainedTokenizerBase,
        max_seq_len: int,
        prompt_template: str = CHAT_TEMPLATE_NAME,
    ) -> None:
        self.examples: list[dict[str, torch.Tensor]] = []
        self.sources: list[str] = []
        for record in records:
            prompt_text, response_text = format_example(record, tokenizer, prompt_template)
            tokens = tokenize_example(prompt_text, response_text, tokenizer, max_seq_len)
            if all(label == IGNORE_INDEX for label in tokens["labels"]):
                continue
            self.examples.append({key: torch.tensor(ids, dtype=torch.long) for key, ids in tokens.items()})
            self.sources.append(record.get("source", ""))
        num_dropped = len(records) - len(self.examples)
        if num_dropped:
            logger.warning(
                "dropped %d of %d examples with no target tokens after truncation to max_seq_len=%d",
                num_dropped,
                len(records),
                max_seq_len,
            )
        self.num_examples = len(self.examples)
        self.num_target_tokens = int(sum((ex["labels"] != IGNORE_INDEX).sum() for ex in self.examples))

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig) -> SiteDataset:
        """Read, format and tokenize one JSONL file with data_cfg's max_seq_len and prompt_template."""
        return cls(read_jsonl_records(path), tokenizer, data_cfg.max_seq_len, data_cfg.prompt_template)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.examples[index]


def collate_batch(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids, attention_mask, labels, each (B, T) long; labels -100 on padding."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        length = len(item["input_ids"])
        input_ids[row, :length] = torch.as_tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.as_tensor(item["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ------------------------------------------------------------------------------------------ partitioning


def _check_partition_args(num_items: int, num_sites: int) -> None:
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if num_items < num_sites:
        raise ValueError(f"cannot give each of {num_sites} sites at least one of {num_items} items")


def _check_non_empty(parts: list[list[int]], what: str) -> list[list[int]]:
    empty = [site for site, part in enumerate(parts) if not part]
    if empty:
        raise ValueError(f"{what}: site(s) {empty} would get no items")
    return parts


def partition_iid(num_items: int, num_sites: int, seed: int) -> list[list[int]]:
    """A seeded shuffle of range(num_items) cut into num_sites near-equal parts, each sorted."""
    _check_partition_args(num_items, num_sites)
    permutation = np.random.default_rng(seed).permutation(num_items)
    return [sorted(int(i) for i in part) for part in np.array_split(permutation, num_sites)]


def partition_dirichlet(
    labels: Sequence[str],
    num_sites: int,
    alpha: float,
    seed: int,
    min_per_site: int = 1,
    max_tries: int = 100,
) -> list[list[int]]:
    """Per label, split its items over sites by Dirichlet(alpha) proportions (small alpha = skewed sites).

    As Flower Datasets' DirichletPartitioner (without self-balancing): all labels are redrawn until every
    site has >= min_per_site items, at most max_tries times.
    """
    # Re-implemented rather than importing flwr_datasets, which is not a dependency of this project.
    _check_partition_args(len(labels), num_sites)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    label_array = np.asarray([str(label) for label in labels])
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for label in sorted(set(label_array.tolist())):
            indices = np.nonzero(label_array == label)[0]
            rng.shuffle(indices)
            proportions = rng.dirichlet(np.full(num_sites, alpha))
            cut_points = (np.cumsum(proportions) * len(indices)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(indices, cut_points)):
                parts[site].extend(int(i) for i in chunk)
        sizes = [len(part) for part in parts]
        if min(sizes) >= min_per_site:
            return [sorted(part) for part in parts]
    raise ValueError(
        f"dirichlet partition (alpha={alpha}) of {len(labels)} items over {num_sites} sites left a site with "
        f"fewer than {min_per_site} items after {max_tries} tries (last sizes {sizes}); raise alpha or use fewer sites"
    )


def _sites_per_label(distinct_labels: Sequence[str], num_sites: int) -> dict[str, list[int]]:
    """Sorted labels round-robin over sites; with more sites than labels, site k shares label k % num_labels."""
    ordered = sorted(distinct_labels)
    if num_sites <= len(ordered):
        return {label: [position % num_sites] for position, label in enumerate(ordered)}
    return {
        label: [site for site in range(num_sites) if site % len(ordered) == position]
        for position, label in enumerate(ordered)
    }


def _assign_by_label(labels: Sequence[str], label_sites: dict[str, list[int]], num_sites: int) -> list[list[int]]:
    """Each item goes to its label's sites; a label shared by several sites is dealt round-robin among them."""
    parts: list[list[int]] = [[] for _ in range(num_sites)]
    dealt = dict.fromkeys(label_sites, 0)
    for index, label in enumerate(labels):
        sites = label_sites[label]
        parts[sites[dealt[label] % len(sites)]].append(index)
        dealt[label] += 1
    return parts


def partition_by_source(labels: Sequence[str], num_sites: int) -> list[list[int]]:
    """Distinct labels (sorted) round-robin over sites; a label shared by several sites is split evenly among them."""
    labels = [str(label) for label in labels]
    _check_partition_args(len(labels), num_sites)
    parts = _assign_by_label(labels, _sites_per_label(set(labels), num_sites), num_sites)
    return _check_non_empty(parts, f"source partition of {len(labels)} items over {num_sites} sites")


PARTITIONS = ("iid", "dirichlet", "source")  # data.partition: how a simulation's pool is split over sites


def partition_indices(labels: Sequence[str], num_sites: int, data_cfg: DataConfig) -> list[list[int]]:
    """Dispatch on data_cfg.partition: "iid" | "dirichlet" | "source"."""
    if data_cfg.partition == "iid":
        return partition_iid(len(labels), num_sites, data_cfg.seed)
    if data_cfg.partition == "dirichlet":
        return partition_dirichlet(labels, num_sites, data_cfg.dirichlet_alpha, data_cfg.seed)
    if data_cfg.partition == "source":
        return partition_by_source(labels, num_sites)
    raise ValueError(f"unknown data.partition {data_cfg.partition!r}; expected one of {PARTITIONS}")


# ---------------------------------------------------------------------------------------------- loading


def _record_labels(records: Sequence[dict], label_field: str) -> list[str]:
    return [str(record.get(label_field, "")) for record in records]


def _split_held_out(
    records: list[dict], label_field: str, eval_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Seeded split stratified by label: round(eval_fraction * n) of each label's n items are held out.

    A label with n >= 2 items keeps at least one on each side when eval_fraction > 0; a single item trains.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    labels = np.asarray(_record_labels(records, label_field))
    rng = np.random.default_rng(seed)
    held_out: set[int] = set()
    for label in sorted(set(labels.tolist())):
        indices = np.nonzero(labels == label)[0]
        rng.shuffle(indices)
        num_eval = round(eval_fraction * len(indices))
        if eval_fraction > 0 and len(indices) >= 2:
            num_eval = min(max(num_eval, 1), len(indices) - 1)
        held_out.update(int(i) for i in indices[:num_eval])
    train = [record for i, record in enumerate(records) if i not in held_out]
    evaluation = [record for i, record in enumerate(records) if i in held_out]
    return train, evaluation


def _load_pools(data_cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train pool, eval pool) of the whole simulated federation."""
    if data_cfg.source == "demo":
        return generate_demo_task(data_cfg.demo)
    records = read_jsonl_records(data_cfg.source)
    if data_cfg.eval_path:
        return records, read_jsonl_records(data_cfg.eval_path)
    return _split_held_out(records, data_cfg.label_field, data_cfg.eval_fraction, data_cfg.seed)


def _partition_pools(
    train_records: list[dict], eval_records: list[dict], num_sites: int, data_cfg: DataConfig
) -> tuple[list[list[int]], list[list[int]]]:
    """Per-site indices into the train pool and the eval pool, partitioned consistently."""
    train_labels = _record_labels(train_records, data_cfg.label_field)
    eval_labels = _record_labels(eval_records, data_cfg.label_field)
    train_parts = partition_indices(train_labels, num_sites, data_cfg)
    if data_cfg.partition != "source":
        return train_parts, partition_indices(eval_labels, num_sites, data_cfg)
    # Site k evaluates on exactly the sources it trains on, so the mapping comes from the train labels.
    label_sites = _sites_per_label(set(train_labels), num_sites)
    unseen = sorted(set(eval_labels) - set(label_sites))
    if unseen:
        raise ValueError(f"eval {data_cfg.label_field!r} values {unseen} do not occur in the training data")
    eval_parts = _assign_by_label(eval_labels, label_sites, num_sites)
    return train_parts, _check_non_empty(eval_parts, f"source partition of {len(eval_labels)} eval items")


def _check_partition_id(partition_id: int, num_partitions: int) -> None:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")


def load_site_split(
    data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, partition_id: int, num_partitions: int
) -> tuple[SiteDataset, SiteDataset]:
    """(train, eval) datasets of simulated site `partition_id` out of `num_partitions`."""
    _check_partition_id(partition_id, num_partitions)
    train_records, eval_records = _load_pools(data_cfg)
    train_parts, eval_parts = _partition_pools(train_records, eval_records, num_partitions, data_cfg)
    site_train = [train_records[i] for i in train_parts[partition_id]]
    site_eval = [eval_records[i] for i in eval_parts[partition_id]]
    return (
        SiteDataset(site_train, tokenizer, data_cfg.max_seq_len, data_cfg.prompt_template),
        SiteDataset(site_eval, tokenizer, data_cfg.max_seq_len, data_cfg.prompt_template),
    )


def load_union_eval(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, num_partitions: int) -> SiteDataset:
    """All sites' eval examples together (the union of load_site_split's eval sets), in pool order."""
    train_records, eval_records = _load_pools(data_cfg)
    _, eval_parts = _partition_pools(train_records, eval_records, num_partitions, data_cfg)
    union = sorted(i for part in eval_parts for i in part)
    records = [eval_records[i] for i in union]
    return SiteDataset(records, tokenizer, data_cfg.max_seq_len, data_cfg.prompt_template)


def load_site_files(
    data_path: str, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[SiteDataset, SiteDataset]:
    """(train, eval) of a real site: a JSONL file (seeded eval_fraction split) or a dir with train.jsonl [+ eval.jsonl].

    data_cfg.eval_path is not used here (it belongs to simulation); a directory without eval.jsonl is split.
    """
    path = Path(data_path).expanduser()
    if path.is_dir():
        train_records = read_jsonl_records(path / TRAIN_FILE)
        if (path / EVAL_FILE).exists():
            eval_records = read_jsonl_records(path / EVAL_FILE)
        else:
            train_records, eval_records = _split_held_out(
                train_records, data_cfg.label_field, data_cfg.eval_fraction, data_cfg.seed
            )
    elif path.exists():
        train_records, eval_records = _split_held_out(
            read_jsonl_records(path), data_cfg.label_field, data_cfg.eval_fraction, data_cfg.seed
        )
    else:
        raise DataFormatError(f"{data_path}: not found")
    return (
        SiteDataset(train_records, tokenizer, data_cfg.max_seq_len, data_cfg.prompt_template),
        SiteDataset(eval_records, tokenizer, data_cfg.max_seq_len, data_cfg.prompt_template),
    )
