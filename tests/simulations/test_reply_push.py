"""simulations/bench/reply_push.py: a CPU smoke run on the tiny model pushes real replies and prints every step."""

import json

import pytest

from simulations.bench.reply_push import STEPS, main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_reply_push_prints_every_step_and_counts_each_chunk_hashed_twice(tmp_path, capsys):
    out = tmp_path / "push.json"
    assert main(["--model", "tiny", "--repeats", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for step in (*STEPS, "sha256-calls", "sha256-mb"):
        assert f"\n  {step} " in printed
    result = json.loads(out.read_text())
    assert len(result["pushes"]) == 2  # the warm-up push is left out
    reply_bytes = result["settings"]["reply_bytes"]
    for push in result["pushes"]:
        assert all(push[step] > 0 for step in ("message-id", "object-tree", "push-messages-call", "push-object-calls",
                                               "push_message", "push_reply"))
        # Flower's push_message hashes every object twice: for the message id, then again for the object tree.
        assert 2 * reply_bytes <= push["sha256-mb"] * 1e6 < 2 * reply_bytes + 100_000
        assert 2 * reply_bytes <= push["push_message-sha256-mb"] * 1e6 < 2 * reply_bytes + 100_000
        # client/worker.py's push_reply computes every id once.
        assert reply_bytes <= push["push_reply-sha256-mb"] * 1e6 < reply_bytes + 100_000
