"""data=hf: local parquet / json / arrow pools read through `datasets`, column mapping, errors, partitioners."""

from __future__ import annotations

import json

import pytest

from federation.compose import compose_config
from federation.data import load_site_split, load_union_eval
from federation.hf_data import read_hf_records
from federation.records import DataFormatError
from federation.tokenizer import build_char_tokenizer
from federation.validation import ConfigError, validate_simulation_data

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CATEGORIES = ("math", "code", "chat")


def qa_rows(start, stop):
    """Alpaca-like rows under other column names: question / context / answer, a category and a user id."""
    return [{"question": f"q{i}", "context": f"c{i}" if i % 2 else None, "answer": f"a{i}",
             "category": CATEGORIES[i % 3], "user": f"user{i % 4}"} for i in range(start, stop)]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def qa_dir(tmp_path):
    """A directory of one parquet and one JSONL file (60 rows), as a real dataset export might be."""
    write_parquet(tmp_path / "qa" / "part-000.parquet", qa_rows(0, 36))
    write_jsonl(tmp_path / "qa" / "shard-2" / "part-001.jsonl", qa_rows(36, 60))
    return tmp_path / "qa"


QA_COLUMNS = ["data.columns.instruction=question", "data.columns.input=context", "data.columns.output=answer"]


def hf_cfg(tmp_path, source, *overrides):
    return compose_config(["data=hf", f"data.source={source}", f"data.cache_dir={tmp_path / 'hf-cache'}",
                           *QA_COLUMNS, *overrides])


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


# ------------------------------------------------------------------------------------------- reading


def test_directory_of_parquet_and_jsonl_maps_columns_to_alpaca_records(tmp_path, qa_dir):
    cfg = hf_cfg(tmp_path, qa_dir, "data.partition_by=category")
    records = read_hf_records(str(qa_dir), cfg.data, "train")
    assert len(records) == 60
    assert [r["instruction"] for r in records[:3]] == ["q0", "q1", "q2"]  # files in sorted path order, rows in file order
    assert records[35]["instruction"] == "q35" and records[36]["instruction"] == "q36"  # parquet, then the JSONL
    assert {r["format"] for r in records} == {"alpaca"}
    assert (records[0]["input"], records[1]["input"], records[1]["output"]) == ("", "c1", "a1")  # null input: empty
    assert [r["category"] for r in records[:4]] == ["math", "code", "chat", "math"]


def test_chat_messages_column_and_format_auto(tmp_path):
    rows = [{"conversation": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}],
             "source": "greet"} for i in range(4)]
    path = write_parquet(tmp_path / "chat.parquet", rows)
    cfg = compose_config(["data=hf", f"data.source={path}", "data.columns.messages=conversation",
                          f"data.cache_dir={tmp_path / 'c'}"])
    records = read_hf_records(str(path), cfg.data, "train")
    assert [r["format"] for r in records] == ["chat"] * 4
    assert records[2]["messages"][-1] == {"role": "assistant", "content": "yo 2"}
    assert records[0]["source"] == "greet"


def test_save_to_disk_dataset_dict_and_its_eval_split(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(qa_rows(0, 30)), "test": Dataset.from_list(qa_rows(30, 42))}
                ).save_to_disk(str(saved))
    cfg = hf_cfg(tmp_path, saved, "data.eval_split=test", "data.partitioner=iid", "federation.num_clients=2")
    union = load_union_eval(cfg.data, tokenizer, 2)
    assert union.num_examples == 12  # the test split, not a held-out share of train
    train, _ = load_site_split(cfg.data, tokenizer, 0, 2)
    assert train.num_examples == 15
    with pytest.raises(DataFormatError, match=r"no split 'validation' .*splits: train, test"):
        read_hf_records(str(saved), cfg.data, "validation")


def test_hub_ids_go_to_load_dataset_and_local_paths_do_not(tmp_path, monkeypatch):
    """A hub id reaches datasets.load_dataset with data.split / subset / cache_dir (stubbed here: no downloads)."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, cache_dir=None, **kwargs):
        calls.append((path, name, split, cache_dir))
        return datasets.Dataset.from_list(qa_rows(0, 3))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = hf_cfg(tmp_path, "someone/qa", "data.subset=en", "data.split='train[:3]'")
    assert len(read_hf_records("someone/qa", cfg.data, "train[:3]")) == 3
    assert calls == [("someone/qa", "en", "train[:3]", str(tmp_path / "hf-cache"))]
    with pytest.raises(DataFormatError, match="^/no/such/dir: not found$"):
        read_hf_records("/no/such/dir", cfg.data, "train")
    assert len(calls) == 1


# -------------------------------------------------------------------------------------------- errors


def test_missing_column_names_file_and_column_in_one_config_error(tmp_path, qa_dir):
    bad = write_parquet(qa_dir / "zz-bad.parquet", [{"question": "q", "reply": "r", "category": "math"}])
    with pytest.raises(ConfigError) as caught:
        validate_simulation_data(hf_cfg(tmp_path, qa_dir, "data.format=alpaca"))
    assert caught.value.key == "data.source"
    assert str(caught.value) == (f"data.source: {bad}: no column 'answer' (data.columns.output, needed by "
                                 "data.format=alpaca); columns: question, reply, category")


def test_missing_partition_column_and_bad_values_name_file_column_and_row(tmp_path, qa_dir):
    with pytest.raises(ConfigError, match=f"data.source: {qa_dir / 'part-000.parquet'}: no column 'topic' "
                                          r"\(data.partition_by, which data.partitioner=dirichlet groups by\)"):
        validate_simulation_data(hf_cfg(tmp_path, qa_dir, "data.partitioner=dirichlet", "data.partition_by=topic"))
    rows = qa_rows(0, 4)
    rows[2]["answer"] = None
    nulls = write_parquet(tmp_path / "nulls.parquet", rows)
    with pytest.raises(DataFormatError) as caught:
        read_hf_records(str(nulls), hf_cfg(tmp_path, nulls).data, "train")
    assert str(caught.value) == (f"{nulls}: row 2: field 'output' must be a string, got NoneType "
                                 "(data.columns: instruction=question, output=answer, input=context)")


def test_unreadable_files_and_empty_directories_are_one_line(tmp_path, capsys):
    from simulations.cli import main

    broken = tmp_path / "broken"
    write_parquet(broken / "a.parquet", qa_rows(0, 8))
    (broken / "b.parquet").write_bytes(b"not a parquet file")
    assert main(["simulate", "--engine", "inprocess", f"output_dir={tmp_path / 'run'}", "data=hf",
                 f"data.source={broken}", f"data.cache_dir={tmp_path / 'c'}", *QA_COLUMNS]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: data.source: {broken / 'b.parquet'}: cannot read as "
                                               "parquet (")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no data files"):
        validate_simulation_data(hf_cfg(tmp_path, tmp_path / "empty"))


# ---------------------------------------------------------------------------------------- partitioners


def site_values(cfg, tokenizer, num_sites, column):
    """Per site: the set of `column` values of its train records and of its eval records."""
    from federation.data import _load_pools, _partition_pools

    train, held_out = _load_pools(cfg.data)
    train_parts, eval_parts = _partition_pools(train, held_out, num_sites, cfg.data)
    return ([{train[i][column] for i in part} for part in train_parts],
            [{held_out[i][column] for i in part} for part in eval_parts])


def test_natural_id_gives_each_site_one_id_for_train_and_eval(tmp_path, qa_dir, tokenizer):
    cfg = hf_cfg(tmp_path, qa_dir, "data.partitioner=natural_id", "data.partition_by=user",
                 "federation.num_clients=4")
    validate_simulation_data(cfg)
    train_ids, eval_ids = site_values(cfg, tokenizer, 4, "user")
    assert train_ids == [{"user0"}, {"user1"}, {"user2"}, {"user3"}]
    assert eval_ids == train_ids
    with pytest.raises(ConfigError, match="data.partitioner=natural_id over federation.num_clients=3 sites: .*"
                                          "the data has 4 .* must be 4"):
        validate_simulation_data(hf_cfg(tmp_path, qa_dir, "data.partitioner=natural_id", "data.partition_by=user",
                                        "federation.num_clients=3"))


def test_dirichlet_on_a_column_is_reproducible_by_seed(tmp_path, qa_dir, tokenizer):
    def site_inputs(seed):
        cfg = hf_cfg(tmp_path, qa_dir, "data.partitioner=dirichlet", "data.partition_by=category", "data.alpha=0.3",
                     f"data.seed={seed}", "federation.num_clients=3")
        return [sorted(tuple(x["input_ids"].tolist()) for x in load_site_split(cfg.data, tokenizer, site, 3)[0])
                for site in range(3)]

    first = site_inputs(0)
    assert first == site_inputs(0)
    assert first != site_inputs(1)
    assert sum(len(site) for site in first) == 54  # 60 minus the stratified 10% held out, nothing lost


def test_pathological_sites_evaluate_on_their_own_labels(tmp_path, qa_dir, tokenizer):
    cfg = hf_cfg(tmp_path, qa_dir, "data.partitioner=pathological", "data.partition_by=category",
                 "data.classes_per_site=1", "federation.num_clients=3")
    train_labels, eval_labels = site_values(cfg, tokenizer, 3, "category")
    assert all(len(labels) == 1 for labels in train_labels) and eval_labels == train_labels
    assert set().union(*train_labels) == set(CATEGORIES)


# ------------------------------------------------------------------------------------------ federation


def test_short_federation_on_a_parquet_directory(tmp_path, qa_dir):
    """Two rounds of the tiny model over 4 natural-id sites read from parquet + JSONL through data=hf."""
    from simulations.simulate import simulate

    cfg = hf_cfg(tmp_path, qa_dir, "data.partitioner=natural_id", "data.partition_by=user",
                 "federation.num_clients=4", "federation.rounds=2", "train.local_steps=2", "train.batch_size=4",
                 "data.max_seq_len=48", "data.eval_fraction=0.2", "eval.max_examples=2", "eval.max_new_tokens=4",
                 f"model.cache_dir={tmp_path / 'models'}", f"output_dir={tmp_path / 'run'}")
    validate_simulation_data(cfg)
    rows = simulate(cfg, engine="inprocess")
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients_ok"] == 4 and row["missing"] == [] for row in rows[1:])
    assert all(row["eval_loss"] == row["eval_loss"] for row in rows)  # finite, not NaN
