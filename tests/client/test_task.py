"""client/task.py: the tokenized site datasets a process keeps are bounded (least recently used dropped first)."""

from __future__ import annotations

from flwr.app import Context, RecordDict

from client import task


def _context(partition: int, partitions: int) -> Context:
    return Context(run_id=1, node_id=partition + 1, state=RecordDict(), run_config={},
                   node_config={"partition-id": partition, "num-partitions": partitions})


def _partitions(runtime) -> list[int]:
    """Partition ids of the cached datasets, least recently used first (keys 'partition:<id>/<n>:<hash>')."""
    return [int(key.split(":")[1].split("/")[0]) for key in runtime.datasets]


def _keys(dataset) -> list[tuple]:
    return [tuple(item["input_ids"].tolist()) + tuple(item["labels"].tolist()) for item in dataset]


def test_site_datasets_are_a_bounded_lru_and_a_dropped_one_comes_back_identical(make_cfg, monkeypatch):
    monkeypatch.setattr(task, "SITE_DATASETS_KEPT", 2)
    cfg = make_cfg("federation.num_clients=4", "data.partitioner=iid")
    runtime = task.get_runtime(cfg)
    runtime.datasets.clear()
    first_train, first_eval = task.site_datasets(runtime, cfg, _context(0, 4))
    first_fingerprint = dict(task.data_fingerprint(runtime, cfg, _context(0, 4)))
    task.site_datasets(runtime, cfg, _context(1, 4))
    task.site_datasets(runtime, cfg, _context(0, 4))  # used again: now the most recent
    task.site_datasets(runtime, cfg, _context(2, 4))  # drops 1, the least recently used
    assert _partitions(runtime) == [0, 2]
    task.data_fingerprint(runtime, cfg, _context(3, 4))  # the fingerprint goes through the same bounded cache
    assert _partitions(runtime) == [2, 3]
    again_train, again_eval = task.site_datasets(runtime, cfg, _context(0, 4))
    assert again_train is not first_train  # tokenized again ...
    assert (_keys(again_train), _keys(again_eval)) == (_keys(first_train), _keys(first_eval))  # ... to the same data
    assert task.data_fingerprint(runtime, cfg, _context(0, 4)) == first_fingerprint
    assert _partitions(runtime) == [3, 0]
