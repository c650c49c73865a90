import json
import logging

import numpy as np
import pytest
import torch

from federation.config import DataConfig, DemoTaskConfig
from federation.data import (
    DataFormatError,
    SiteDataset,
    collate_batch,
    format_example,
    load_site_files,
    load_site_split,
    load_union_eval,
    PARTITIONERS,
    partition_by_source,
    partition_indices,
    read_jsonl_records,
    tokenize_example,
)
from federation.tokenizer import build_char_tokenizer

ALPACA = {"instruction": "Reverse: abc", "output": "cba", "source": "rev"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
}
PLAIN = {"text": "hello"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def check_partition(parts, num_items, num_sites):
    assert len(parts) == num_sites
    assert all(part == sorted(part) and part for part in parts)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(num_items))  # disjoint and covering


# ------------------------------------------------------------------------------------------- reading


def test_reads_three_formats_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, "", "   ", CHAT, PLAIN])
    alpaca, chat, plain = read_jsonl_records(path)
    assert alpaca["format"] == "alpaca" and (alpaca["instruction"], alpaca["input"], alpaca["output"]) == (
        "Reverse: abc",
        "",
        "cba",
    )
    assert alpaca["source"] == "rev"
    assert chat["format"] == "chat" and chat["messages"] == CHAT["messages"] and chat["source"] == ""
    assert plain["format"] == "plain" and plain["text"] == "hello"


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"foo": "bar"}, "none of the format keys"),
    ({"instruction": "x"}, "missing required field 'output'"),
    ({"output": "x"}, "missing required field 'instruction'"),
    ({"instruction": 3, "output": "x"}, "'instruction' must be a string"),
    ({"instruction": "x", "input": None, "output": "x"}, "'input' must be a string"),
    ({"text": ["a"]}, "'text' must be a string"),
    ({"text": "a", "source": 7}, "'source' must be a string"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "y"}]}, "'content' must be"),
    ({"messages": [{"role": "user", "content": "x"}]}, "last message must be from the assistant"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "at least one message before"),
]


@pytest.mark.parametrize("line, fragment", BAD_LINES)
def test_errors_name_file_and_line(tmp_path, line, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", [ALPACA, "", line, PLAIN])
    with pytest.raises(DataFormatError) as caught:
        read_jsonl_records(path)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert fragment in str(caught.value)


def test_missing_and_empty_files(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataFormatError, match="not found") as caught:
        read_jsonl_records(missing)
    assert str(caught.value).startswith(f"{missing}: ")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataFormatError, match="no examples") as caught:
        read_jsonl_records(empty)
    assert str(caught.value).startswith(f"{empty}: ")


# ---------------------------------------------------------------------------------------- formatting


def test_format_alpaca_with_chat_template(tokenizer):
    record = {"instruction": "Sum", "input": "1 2", "output": "3"}
    assert format_example(record, tokenizer, "chat_template") == ("<|user|>\nSum\n\n1 2\n<|assistant|>\n", "3</s>")


def test_format_chat_with_chat_template(tokenizer):
    prompt, response = format_example(CHAT, tokenizer, "chat_template")
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"
    assert response == "yo</s>"


def test_format_with_str_template(tokenizer):
    template = "Q: {instruction} | {input}\nA: "
    record = {"instruction": "Sum", "input": "1 2", "output": "3"}
    assert format_example(record, tokenizer, template) == ("Q: Sum | 1 2\nA: ", "3</s>")
    assert format_example(CHAT, tokenizer, template) == ("Q: Be brief.\n\nhi | \nA: ", "yo</s>")


def test_format_plain_text_has_empty_prompt(tokenizer):
    assert format_example(PLAIN, tokenizer, "chat_template") == ("", "hello</s>")
    assert format_example(PLAIN, tokenizer, "{instruction}") == ("", "hello</s>")


# ---------------------------------------------------------------------------------------- tokenizing


def test_labels_mask_exactly_the_prompt(tokenizer):
    tokens = tokenize_example("<|user|>\nab\n<|assistant|>\n", "c</s>", tokenizer, max_seq_len=96)
    prompt_ids = ids(tokenizer, "<|user|>\nab\n<|assistant|>\n")
    assert prompt_ids[5] == 6 and len(prompt_ids) == 7  # <|assistant|> then "\n"
    assert tokens["input_ids"] == prompt_ids + ids(tokenizer, "c") + [2]
    assert tokens["labels"] == [-100] * 7 + ids(tokenizer, "c") + [2]
    # The boundary: the last masked token is <|assistant|>'s newline, the first target is "c".
    assert tokens["input_ids"][6] == ids(tokenizer, "\n")[0] and tokens["labels"][6] == -100
    assert tokens["labels"][7] == tokens["input_ids"][7] == ids(tokenizer, "c")[0]


def test_no_truncation_when_it_fits(tokenizer):
    tokens = tokenize_example("abc", "de", tokenizer, max_seq_len=5)
    assert tokens["input_ids"] == ids(tokenizer, "abcde")
    assert tokens["labels"] == [-100] * 3 + ids(tokenizer, "de")


@pytest.mark.parametrize(
    "prompt, response, max_seq_len, kept_prompt, kept_response",
    [
        # keep min(6, 10 // 2) = 5 response tokens: prompt cut from the left to 5, then right cut to 10
        ("abcdefgh", "uvwxyz", 10, "defgh", "uvwxy"),
        # short prompt stays whole; the response fills the rest
        ("ab", "klmnopqrstuvwxyz", 10, "ab", "klmnopqr"),
        # short response stays whole; the prompt keeps its last 10 - 3 tokens
        ("abcdefghijklmnopqrst", "xyz", 10, "nopqrst", "xyz"),
        # odd length: 11 // 2 = 5 response tokens guaranteed, so the prompt keeps 6; then right cut to 11
        ("abcdefghij", "uvwxyz", 11, "efghij", "uvwxy"),
    ],
)
def test_truncation_rule(tokenizer, prompt, response, max_seq_len, kept_prompt, kept_response):
    tokens = tokenize_example(prompt, response, tokenizer, max_seq_len)
    assert tokens["input_ids"] == ids(tokenizer, kept_prompt + kept_response)
    assert tokens["labels"] == [-100] * len(kept_prompt) + ids(tokenizer, kept_response)


# ------------------------------------------------------------------------------------ dataset, batches


def test_site_dataset_counts_and_items(tokenizer):
    records = [{"instruction": "ab", "output": "c", "source": "s1"}, {"text": "xy"}]
    dataset = SiteDataset(records, tokenizer, max_seq_len=96, prompt_template="chat_template")
    assert dataset.num_examples == len(dataset) == 2
    assert dataset.sources == ["s1", ""]
    # "c</s>" and "xy</s>" are the targets
    assert dataset.num_target_tokens == 2 + 3
    item = dataset[1]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (3,)
    assert item["labels"].tolist() == ids(tokenizer, "xy") + [2]


def test_site_dataset_drops_examples_without_targets(tokenizer, caplog):
    records = [{"instruction": "ab", "output": "c", "source": "s1"}, {"text": "xy", "source": "s2"}]
    with caplog.at_level(logging.WARNING, logger="federation.data"):
        # max_seq_len 1: the alpaca example keeps only a prompt token, the plain one keeps "x"
        dataset = SiteDataset(records, tokenizer, max_seq_len=1, prompt_template="chat_template")
    assert dataset.num_examples == 1 and dataset.sources == ["s2"] and dataset.num_target_tokens == 1
    assert "dropped 1 of 2" in caplog.text


def test_site_dataset_from_jsonl(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, CHAT, PLAIN])
    dataset = SiteDataset.from_jsonl(path, tokenizer, DataConfig(max_seq_len=64))
    assert dataset.num_examples == 3 and dataset.sources == ["rev", "", ""]


def test_collate_pads_right_and_masks():
    batch = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
    ]
    out = collate_batch(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())


# -------------------------------------------------------------------------------------- partitioning


def part_cfg(partitioner, **overrides):
    return DataConfig(partitioner=partitioner, **overrides)


def test_iid_partition_covers_and_is_deterministic():
    labels = ["x"] * 10
    parts = partition_indices(labels, 3, part_cfg("iid", seed=1))
    check_partition(parts, 10, 3)
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert parts == partition_indices(labels, 3, part_cfg("iid", seed=1))
    assert parts != partition_indices(labels, 3, part_cfg("iid", seed=2))
    assert parts != [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # shuffled first: not flwr-datasets' contiguous shards


def test_partition_needs_an_item_per_site():
    for partitioner in PARTITIONERS:
        with pytest.raises(ValueError, match="at least one"):
            partition_indices(["a", "b"], 3, part_cfg(partitioner))


def test_dirichlet_partition_covers_and_is_deterministic():
    labels = [f"l{i % 4}" for i in range(200)]
    cfg = part_cfg("dirichlet", alpha=0.5, seed=0)
    parts = partition_indices(labels, 5, cfg)
    check_partition(parts, 200, 5)
    assert parts == partition_indices(labels, 5, cfg)
    assert parts != partition_indices(labels, 5, part_cfg("dirichlet", alpha=0.5, seed=1))


def label_shares(labels, parts):
    """(num_labels, num_sites) fraction of each label's items held by each site."""
    names = sorted(set(labels))
    counts = np.array([[sum(labels[i] == name for i in part) for part in parts] for name in names], float)
    return counts / counts.sum(axis=1, keepdims=True)


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_balanced():
    labels = [f"l{i % 4}" for i in range(400)]
    skewed = label_shares(labels, partition_indices(labels, 4, part_cfg("dirichlet", alpha=0.05)))
    balanced = label_shares(labels, partition_indices(labels, 4, part_cfg("dirichlet", alpha=1000.0)))
    assert skewed.max(axis=1).mean() > 0.8
    assert np.abs(balanced - 0.25).max() < 0.1


def test_dirichlet_raises_when_min_partition_size_is_impossible():
    with pytest.raises(ValueError, match="max number of attempts"):
        partition_indices(["a", "b", "a"], 2, part_cfg("dirichlet", alpha=1.0, min_partition_size=2))


def test_pathological_gives_each_site_its_number_of_labels():
    labels = [f"l{i % 5}" for i in range(100)]
    cfg = part_cfg("pathological", classes_per_site=2, class_assignment="deterministic")
    parts = partition_indices(labels, 4, cfg)
    held = [sorted({labels[i] for i in part}) for part in parts]
    # deterministic: site k holds sorted labels k and k+1
    assert held == [["l0", "l1"], ["l1", "l2"], ["l2", "l3"], ["l3", "l4"]]
    assert sum(map(len, parts)) == 100 and len({i for part in parts for i in part}) == 100
    randomly = partition_indices(labels, 4, part_cfg("pathological", classes_per_site=2, class_assignment="random",
                                                     seed=3))
    assert all(len({labels[i] for i in part}) == 2 for part in randomly)


def test_natural_id_partition_is_one_id_per_site():
    labels = [f"user{i % 4}" for i in range(30)]
    parts = partition_indices(labels, 4, part_cfg("natural_id", partition_by="user"))
    check_partition(parts, 30, 4)
    assert [sorted({labels[i] for i in part}) for part in parts] == [["user0"], ["user1"], ["user2"], ["user3"]]
    with pytest.raises(ValueError, match="distinct 'user' value its own site: the data has 4 .* must be 4"):
        partition_indices(labels, 3, part_cfg("natural_id", partition_by="user"))


@pytest.mark.parametrize("partitioner", ["linear", "square", "exponential"])
def test_size_skewed_partitions_grow_with_the_site_id(partitioner):
    parts = partition_indices(["x"] * 300, 4, part_cfg(partitioner, seed=0))
    check_partition(parts, 300, 4)
    sizes = [len(part) for part in parts]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    growth = {"linear": 4, "square": 16, "exponential": np.e**3}[partitioner]  # size of site 4 / size of site 1
    assert sizes[-1] / sizes[0] == pytest.approx(growth, rel=0.3)


def test_by_source_one_skill_per_site():
    labels = ["vowels", "add", "reverse", "add", "uppercase", "vowels", "reverse", "uppercase"]
    parts = partition_by_source(labels, 4)
    check_partition(parts, 8, 4)
    # sorted labels: add, reverse, uppercase, vowels
    assert parts == [[1, 3], [2, 6], [4, 7], [0, 5]]


def test_by_source_fewer_sites_round_robin():
    labels = ["a", "b", "c", "d", "a"]
    assert partition_by_source(labels, 3) == [[0, 3, 4], [1], [2]]


def test_by_source_more_sites_than_labels_splits_evenly():
    # a -> sites 0, 2; b -> sites 1, 3; each label's items dealt round-robin among its sites
    assert partition_by_source(["a", "a", "b", "b", "b"], 4) == [[0], [2, 4], [1], [3]]


def test_by_source_raises_when_a_site_would_be_empty():
    with pytest.raises(ValueError, match=r"site\(s\) \[2\]"):
        partition_by_source(["a", "b", "b"], 3)


def test_partition_indices_dispatch():
    labels = ["a", "b", "a", "b"]
    assert partition_indices(labels, 2, DataConfig(partitioner="source")) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="unknown data.partitioner 'random'"):
        partition_indices(labels, 2, DataConfig(partitioner="random"))


# ------------------------------------------------------------------------------------------- loading


def demo_cfg(**overrides):
    demo = DemoTaskConfig(examples_per_skill=12, eval_examples_per_skill=5, seed=1)
    return DataConfig(demo=demo, **overrides)


def as_keys(dataset):
    return sorted(tuple(item["input_ids"].tolist()) for item in dataset)


def test_source_split_gives_each_site_its_own_skill_for_train_and_eval(tokenizer):
    cfg = demo_cfg(partitioner="source")
    for site in range(4):
        train, evaluation = load_site_split(cfg, tokenizer, site, 4)
        assert len(set(train.sources)) == 1 and set(evaluation.sources) == set(train.sources)
        assert (train.num_examples, evaluation.num_examples) == (12, 5)
        assert not set(as_keys(train)) & set(as_keys(evaluation))


@pytest.mark.parametrize("partition, num_sites", [("source", 3), ("source", 6), ("iid", 3), ("dirichlet", 2)])
def test_union_eval_equals_union_of_site_eval_sets(tokenizer, partition, num_sites):
    cfg = demo_cfg(partitioner=partition, alpha=1.0)
    site_sets = [load_site_split(cfg, tokenizer, site, num_sites) for site in range(num_sites)]
    union_of_sites = sorted(key for _, evaluation in site_sets for key in as_keys(evaluation))
    assert union_of_sites == as_keys(load_union_eval(cfg, tokenizer, num_sites))
    assert len(union_of_sites) == 4 * 5
    if partition == "source":
        for train, evaluation in site_sets:
            assert set(evaluation.sources) == set(train.sources)


def test_jsonl_source_split_is_seeded_and_stratified(tmp_path, tokenizer):
    lines = [{"instruction": f"q{i}", "output": f"a{i}", "source": "ab"[i % 2]} for i in range(20)]
    path = write_jsonl(tmp_path / "pool.jsonl", lines)
    cfg = DataConfig(source=str(path), partitioner="source", eval_fraction=0.2, seed=0)
    train0, eval0 = load_site_split(cfg, tokenizer, 0, 2)
    train1, eval1 = load_site_split(cfg, tokenizer, 1, 2)
    assert (train0.sources, eval0.sources) == (["a"] * 8, ["a"] * 2)
    assert (train1.sources, eval1.sources) == (["b"] * 8, ["b"] * 2)
    assert not set(as_keys(train0)) & set(as_keys(eval0))
    assert as_keys(eval0) == as_keys(load_site_split(cfg, tokenizer, 0, 2)[1])


def test_jsonl_eval_path_with_unseen_source_is_an_error(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "source": "a"}, {"text": "y", "source": "b"}])
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"text": "z", "source": "c"}])
    cfg = DataConfig(source=str(train_path), eval_path=str(eval_path), partitioner="source")
    with pytest.raises(ValueError, match=r"\['c'\] do not occur in the training data"):
        load_site_split(cfg, tokenizer, 0, 2)


def test_load_site_files_single_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "site.jsonl", [{"text": f"t{i}"} for i in range(10)])
    train, evaluation = load_site_files(str(path), DataConfig(eval_fraction=0.3, seed=0), tokenizer)
    assert (train.num_examples, evaluation.num_examples) == (7, 3)
    assert not set(as_keys(train)) & set(as_keys(evaluation))


def test_load_site_files_directory(tmp_path, tokenizer):
    write_jsonl(tmp_path / "train.jsonl", [ALPACA, {**ALPACA, "output": "x"}])
    write_jsonl(tmp_path / "eval.jsonl", [CHAT])
    train, evaluation = load_site_files(str(tmp_path), DataConfig(), tokenizer)
    assert (train.num_examples, evaluation.num_examples) == (2, 1)
    (tmp_path / "eval.jsonl").unlink()
    train, evaluation = load_site_files(str(tmp_path), DataConfig(eval_fraction=0.5), tokenizer)
    assert (train.num_examples, evaluation.num_examples) == (1, 1)


def test_load_site_files_errors_name_the_file(tmp_path, tokenizer):
    with pytest.raises(DataFormatError, match="not found"):
        load_site_files(str(tmp_path / "missing"), DataConfig(), tokenizer)
    with pytest.raises(DataFormatError) as caught:
        load_site_files(str(tmp_path), DataConfig(), tokenizer)
    assert str(caught.value) == f"{tmp_path / 'train.jsonl'}: not found"
    write_jsonl(tmp_path / "train.jsonl", [PLAIN, {"text": 1}])
    with pytest.raises(DataFormatError) as caught:
        load_site_files(str(tmp_path), DataConfig(), tokenizer)
    assert str(caught.value).startswith(f"{tmp_path / 'train.jsonl'}:2: ")
    write_jsonl(tmp_path / "train.jsonl", [PLAIN, PLAIN])
    write_jsonl(tmp_path / "eval.jsonl", [""])
    with pytest.raises(DataFormatError, match="eval.jsonl: no examples"):
        load_site_files(str(tmp_path), DataConfig(), tokenizer)


def test_sites_of_a_federation_share_one_partitioning_with_the_same_splits(tmp_path, tokenizer, monkeypatch):
    import federation.data as data

    partitionings, real = [], data._partition_pools
    monkeypatch.setattr(data, "_partition_pools", lambda *args: partitionings.append(args[2]) or real(*args))
    path = write_jsonl(tmp_path / "pool.jsonl", [{"text": f"t{i}", "source": "ab"[i % 2]} for i in range(40)])
    cfg = DataConfig(source=str(path), partitioner="iid", eval_fraction=0.25, seed=0)
    shared = [[as_keys(ds) for ds in load_site_split(cfg, tokenizer, site, 5)] for site in range(5)]
    assert partitionings == [5]  # once for the five sites, not once per site
    afresh = []
    for site in range(5):
        data._POOLS_CACHE.clear()
        afresh.append([as_keys(ds) for ds in load_site_split(cfg, tokenizer, site, 5)])
    assert shared == afresh
    load_site_split(cfg, tokenizer, 0, 4)  # another number of sites is another partitioning
    assert partitionings[-1] == 4


def test_a_rewritten_pool_file_is_read_again(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pool.jsonl", [{"text": f"t{i}"} for i in range(12)])
    cfg = DataConfig(source=str(path), partitioner="iid", eval_fraction=0.25, seed=0)
    before = as_keys(load_site_split(cfg, tokenizer, 0, 3)[0])
    write_jsonl(path, [{"text": f"new text {i}"} for i in range(12)])
    after = as_keys(load_site_split(cfg, tokenizer, 0, 3)[0])
    assert before != after and len(after) == len(before)
