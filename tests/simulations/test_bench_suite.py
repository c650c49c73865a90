"""`fedtune bench`: the suite runs the selected benchmarks and each writes its JSON."""

from __future__ import annotations

import json

import pytest
import torch

from simulations.bench.suite import main


def test_quick_suite_writes_each_benchmarks_json(tmp_path):
    assert main(["--quick", "--only", "aggregation", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "aggregation.json").read_text())
    cases = {(row["case"], row["upload"], row["accumulator"]) for row in result["rows"]}
    assert ("streaming", "bf16", "float32") in cases and ("naive", "fp32", "float64") in cases
    assert result["machine"]["logical_cores"] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without a GPU")
def test_gpu_benchmarks_are_skipped_without_a_gpu(tmp_path, capsys):
    assert main(["--only", "train_throughput", "--out", str(tmp_path)]) == 0
    assert "skipped: needs a CUDA GPU" in capsys.readouterr().out


def test_unknown_benchmark_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["--only", "nonsense", "--out", str(tmp_path)])
