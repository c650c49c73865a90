"""A site's examples: reading pools, prompt formatting, masked tokenization, batching, and partitioning.

Records (federation/records.py) are dicts that remember their format ("alpaca" | "chat" | "plain"). The loss is
computed only on response tokens: prompt tokens get label -100 (ignored by torch's cross entropy).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from federation.config import DataConfig
from federation.demo_task import generate_demo_task
from federation.records import DataFormatError, parse_record, read_jsonl_records

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHAT_TEMPLATE_NAME = "chat_template"
# The fields a str.format data.prompt_template may use (format_example fills them).
PROMPT_FIELDS = ("instruction", "input")
# Joins alpaca's instruction and input, and the non-final chat contents under a str.format template.
PART_SEPARATOR = "\n\n"
TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"


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
        record = parse_record(record, "record: ")
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
    """Each item goes to its label's sites (round-robin among several); items of a label with no site are left out."""
    parts: list[list[int]] = [[] for _ in range(num_sites)]
    dealt = dict.fromkeys(label_sites, 0)
    for index, label in enumerate(labels):
        sites = label_sites.get(label)
        if not sites:
            continue
        parts[sites[dealt[label] % len(sites)]].append(index)
        dealt[label] += 1
    return parts


def partition_by_source(labels: Sequence[str], num_sites: int) -> list[list[int]]:
    """Distinct labels (sorted) round-robin over sites; a label shared by several sites is split evenly among them."""
    # Hand-written on purpose: no flwr-datasets partitioner gives every label to exactly one site while a site may
    # hold several labels (PathologicalPartitioner drops the labels beyond the site count; GroupedNaturalId makes
    # its own number of groups). The demo task's one-skill-per-site default and its tests depend on this rule.
    labels = [str(label) for label in labels]
    _check_partition_args(len(labels), num_sites)
    parts = _assign_by_label(labels, _sites_per_label(set(labels), num_sites), num_sites)
    return _check_non_empty(parts, f"source partition of {len(labels)} items over {num_sites} sites")


# The columns of the small index Dataset a flwr-datasets partitioner splits: the item's position in the pool and its
# label (the records themselves stay Python dicts; only this index goes through `datasets`).
ROW_COLUMN = "row"
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class PartitionerSpec:
    """How data.partitioner=<name> splits a pool over simulated sites."""

    # (num_sites, data_cfg) -> a flwr_datasets Partitioner over a Dataset of ROW_COLUMN, LABEL_COLUMN; None: the
    # hand-written partition_by_source.
    build: Callable[[int, DataConfig], Any] | None
    # The partitioner groups by the data.partition_by label (the others ignore it).
    needs_labels: bool = False
    # It cuts contiguous slices (IidPartitioner and the size-skewed ones): it sees the pool in a seeded random order.
    shuffle_first: bool = False
    # Eval examples go to the sites that train on their label (round-robin among several) instead of an
    # independent partition of the eval pool, so a site evaluates on the labels (ids) it holds.
    eval_follows_labels: bool = False


def _flwr_partitioners() -> Any:
    import flwr_datasets.partitioner as partitioners  # imports `datasets`: only when such a partitioner runs

    return partitioners


PARTITIONERS: dict[str, PartitionerSpec] = {
    "source": PartitionerSpec(None, needs_labels=True, eval_follows_labels=True),
    "iid": PartitionerSpec(lambda n, cfg: _flwr_partitioners().IidPartitioner(n), shuffle_first=True),
    "dirichlet": PartitionerSpec(
        lambda n, cfg: _flwr_partitioners().DirichletPartitioner(
            n, LABEL_COLUMN, float(cfg.alpha), min_partition_size=cfg.min_partition_size, self_balancing=False,
            shuffle=True, seed=cfg.seed),
        needs_labels=True,
    ),
    "pathological": PartitionerSpec(
        lambda n, cfg: _flwr_partitioners().PathologicalPartitioner(
            n, LABEL_COLUMN, cfg.classes_per_site, class_assignment_mode=cfg.class_assignment, shuffle=True,
            seed=cfg.seed),
        needs_labels=True,
        eval_follows_labels=True,
    ),
    # One site per distinct value (a natural id: user, hospital, document); federation.num_clients must match.
    "natural_id": PartitionerSpec(
        lambda n, cfg: _flwr_partitioners().NaturalIdPartitioner(LABEL_COLUMN), needs_labels=True,
        eval_follows_labels=True,
    ),
    # Size-skewed: site k (1-based) holds a share proportional to k, k^2 or e^k of the pool.
    "linear": PartitionerSpec(lambda n, cfg: _flwr_partitioners().LinearPartitioner(n), shuffle_first=True),
    "square": PartitionerSpec(lambda n, cfg: _flwr_partitioners().SquarePartitioner(n), shuffle_first=True),
    "exponential": PartitionerSpec(lambda n, cfg: _flwr_partitioners().ExponentialPartitioner(n),
                                   shuffle_first=True),
}
CLASS_ASSIGNMENTS = ("first-deterministic", "deterministic", "random")  # PathologicalPartitioner's modes


def partition_indices(labels: Sequence[Any], num_sites: int, data_cfg: DataConfig) -> list[list[int]]:
    """Per-site sorted indices into a pool whose item i has label labels[i], split by data_cfg.partitioner."""
    spec = PARTITIONERS.get(data_cfg.partitioner)
    if spec is None:
        raise ValueError(f"unknown data.partitioner {data_cfg.partitioner!r}; expected one of {list(PARTITIONERS)}")
    labels = [str(label) for label in labels]
    _check_partition_args(len(labels), num_sites)
    if spec.build is None:
        return partition_by_source(labels, num_sites)
    from datasets import Dataset

    pool = Dataset.from_dict({ROW_COLUMN: list(range(len(labels))), LABEL_COLUMN: labels})
    if spec.shuffle_first:
        pool = pool.shuffle(seed=data_cfg.seed)
    partitioner = spec.build(num_sites, data_cfg)
    partitioner.dataset = pool
    # Dirichlet's per-retry notes, Pathological's unused labels and NaturalId's progress bar are not the user's
    # business here: the outcome is checked below.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore", UserWarning)
        if partitioner.num_partitions != num_sites:  # natural_id: as many partitions as distinct values
            distinct = sorted(set(labels))
            raise ValueError(f"natural_id gives each distinct {data_cfg.partition_by!r} value its own site: the data "
                             f"has {len(distinct)} ({', '.join(distinct[:5])}{', ...' if len(distinct) > 5 else ''}), "
                             f"so federation.num_clients must be {len(distinct)}")
        parts = [sorted(partitioner.load_partition(site)[ROW_COLUMN]) for site in range(num_sites)]
    return _check_non_empty(parts, f"{data_cfg.partitioner} partition of {len(labels)} items over {num_sites} sites")


# ---------------------------------------------------------------------------------------------- loading


def _record_labels(records: Sequence[dict], partition_by: str) -> list[str]:
    return [str(record.get(partition_by, "")) for record in records]


def _split_held_out(
    records: list[dict], partition_by: str, eval_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Seeded split stratified by label: round(eval_fraction * n) of each label's n items are held out.

    A label with n >= 2 items keeps at least one on each side when eval_fraction > 0; a single item trains.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    labels = np.asarray(_record_labels(records, partition_by))
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


def _read_jsonl_pool(source: str, data_cfg: DataConfig, split: str) -> list[dict]:
    return read_jsonl_records(source)


def _read_hf_pool(source: str, data_cfg: DataConfig, split: str) -> list[dict]:
    from federation.hf_data import read_hf_records  # imports `datasets`: only for data.loader=hf

    return read_hf_records(source, data_cfg, split, PARTITIONERS[data_cfg.partitioner].needs_labels)


# data.loader -> (source, data_cfg, split) -> records; a reader's DataFormatError starts with the file it names.
POOL_READERS: dict[str, Callable[[str, DataConfig, str], list[dict]]] = {
    "jsonl": _read_jsonl_pool,
    "hf": _read_hf_pool,
}


def _read_pools(source: str, eval_path: str, data_cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of `source`: eval from eval_path, data.eval_split, or a held-out split."""
    read = POOL_READERS[data_cfg.loader]
    records = read(source, data_cfg, data_cfg.split)
    if eval_path:
        return records, read(eval_path, data_cfg, data_cfg.split)
    if data_cfg.loader == "hf" and data_cfg.eval_split:
        return records, read(source, data_cfg, data_cfg.eval_split)
    return _split_held_out(records, data_cfg.partition_by, data_cfg.eval_fraction, data_cfg.seed)


def _load_pools(data_cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train pool, eval pool) of the whole simulated federation."""
    if data_cfg.loader == "jsonl" and data_cfg.source == "demo":
        return generate_demo_task(data_cfg.demo)
    return _read_pools(data_cfg.source, data_cfg.eval_path, data_cfg)


def _partition_pools(
    train_records: list[dict], eval_records: list[dict], num_sites: int, data_cfg: DataConfig
) -> tuple[list[list[int]], list[list[int]]]:
    """Per-site indices into the train pool and the eval pool, partitioned consistently."""
    train_labels = _record_labels(train_records, data_cfg.partition_by)
    eval_labels = _record_labels(eval_records, data_cfg.partition_by)
    train_parts = partition_indices(train_labels, num_sites, data_cfg)
    if not PARTITIONERS[data_cfg.partitioner].eval_follows_labels:
        try:
            return train_parts, partition_indices(eval_labels, num_sites, data_cfg)
        except ValueError as exc:
            raise ValueError(f"the eval pool of {len(eval_labels)} items: {exc}") from None
    # Site k evaluates on exactly the labels it trains on, so the mapping comes from the train partition.
    label_sites: dict[str, list[int]] = {}
    for site, part in enumerate(train_parts):
        for label in sorted({train_labels[i] for i in part}):
            label_sites.setdefault(label, []).append(site)
    unseen = sorted(set(eval_labels) - set(train_labels))
    if unseen:
        raise ValueError(f"eval {data_cfg.partition_by!r} values {unseen} do not occur in the training data")
    eval_parts = _assign_by_label(eval_labels, label_sites, num_sites)
    what = f"{data_cfg.partitioner} partition of {len(eval_labels)} eval items"
    return train_parts, _check_non_empty(eval_parts, what)


def _check_partition_id(partition_id: int, num_partitions: int) -> None:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")


@dataclass(frozen=True)
class PartitionedPools:
    """A simulated federation's train and eval pools and each site's indices into them."""

    train_records: list[dict]
    eval_records: list[dict]
    train_parts: list[list[int]]
    eval_parts: list[list[int]]


def _source_stamp(path: str) -> tuple[int, int] | None:
    """(mtime_ns, size) of a local data source, so a rewritten file is read again; None for a hub id / demo."""
    try:
        stat = Path(path).expanduser().stat()
    except (OSError, ValueError):
        return None
    return stat.st_mtime_ns, stat.st_size


# The one pool partitioning a process keeps (load_site_split): a simulation's virtual clients share it. Reading the
# pool and partitioning it over all N sites costs O(pool + N) (flwr-datasets builds every partition), ~1.8 s for 1,000
# sites on a CPU core; redoing that for each of 1,000 clients made a new client's first round O(N). One entry: the
# memory is the data set itself, whatever the number of clients.
_POOLS_CACHE: dict[str, PartitionedPools] = {}


def partitioned_pools(data_cfg: DataConfig, num_partitions: int) -> PartitionedPools:
    """The pools of data_cfg split over num_partitions sites, computed once per (data config, N, source files)."""
    key = json.dumps([asdict(data_cfg), num_partitions, _source_stamp(data_cfg.source),
                      _source_stamp(data_cfg.eval_path) if data_cfg.eval_path else None], sort_keys=True, default=str)
    if key not in _POOLS_CACHE:
        train_records, eval_records = _load_pools(data_cfg)
        train_parts, eval_parts = _partition_pools(train_records, eval_records, num_partitions, data_cfg)
        _POOLS_CACHE.clear()
        _POOLS_CACHE[key] = PartitionedPools(train_records, eval_records, train_parts, eval_parts)
    return _POOLS_CACHE[key]


def load_site_split(
    data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, partition_id: int, num_partitions: int
) -> tuple[SiteDataset, SiteDataset]:
    """(train, eval) datasets of simulated site `partition_id` out of `num_partitions`."""
    _check_partition_id(partition_id, num_partitions)
    pools = partitioned_pools(data_cfg, num_partitions)
    train_records, eval_records = pools.train_records, pools.eval_records
    train_parts, eval_parts = pools.train_parts, pools.eval_parts
    site_train = [train_records[i] for i in train_parts[partition_id]]
    site_eval = [eval_records[i] for i in eval_parts[partition_id]]
    return (
        SiteDataset(site_train, tokenizer, data_cfg.max_seq_len, data_cfg.prompt_template),
        SiteDataset(site_eval, tokenizer, data_cfg.max_seq_len, data_cfg.prompt_template),
    )


def load_union_eval(data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, num_partitions: int) -> SiteDataset:
    """All sites' eval examples together (the union of load_site_split's eval sets), in pool order."""
    pools = partitioned_pools(data_cfg, num_partitions)
    union = sorted(i for part in pools.eval_parts for i in part)
    records = [pools.eval_records[i] for i in union]
    return SiteDataset(records, tokenizer, data_cfg.max_seq_len, data_cfg.prompt_template)


def load_site_files(
    data_path: str, data_cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[SiteDataset, SiteDataset]:
    """(train, eval) of a real site: a JSONL file (seeded eval_fraction split) or a dir with train.jsonl [+ eval.jsonl].

    data_cfg.eval_path is not used here (it belongs to simulation); a directory without eval.jsonl is split.
    """
    path = Path(data_path).expanduser()
    # JSONL only, whatever data.loader says: the site daemon checks its data before it knows a run's config
    # (client/daemon.py validate_site_data), so a site reads the format it was checked in.
    if path.is_dir():
        train_records = read_jsonl_records(path / TRAIN_FILE)
        if (path / EVAL_FILE).exists():
            eval_records = read_jsonl_records(path / EVAL_FILE)
        else:
            train_records, eval_records = _split_held_out(
                train_records, data_cfg.partition_by, data_cfg.eval_fraction, data_cfg.seed
            )
    elif path.exists():
        train_records, eval_records = _split_held_out(
            read_jsonl_records(path), data_cfg.partition_by, data_cfg.eval_fraction, data_cfg.seed
        )
    else:
        raise DataFormatError(f"{data_path}: not found")
    return (
        SiteDataset(train_records, tokenizer, data_cfg.max_seq_len, data_cfg.prompt_template),
        SiteDataset(eval_records, tokenizer, data_cfg.max_seq_len, data_cfg.prompt_template),
    )
