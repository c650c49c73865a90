"""simulations/bench/eval_throughput.py: CPU smoke run on the tiny model."""

import json


def test_eval_throughput_smoke(tmp_path, capsys):
    from simulations.bench.eval_throughput import main

    out = tmp_path / "rows.json"
    assert main(["--prompts", "4", "--batch-sizes", "2,4", "--max-new-tokens", "3", "--repeats", "1",
                 "--out", str(out), f"model.cache_dir={tmp_path}"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [2, 4]
    assert all(4 <= r["generated_tokens"] <= 12 and r["tokens_per_second"] > 0 for r in rows)
    assert "tokens/s" in capsys.readouterr().out
