"""simulations/bench/site_overhead.py: a CPU smoke run on the tiny model prints every phase, and they add up."""

import json

import pytest

from simulations.bench.site_overhead import LOGGED_PHASES, PHASES, main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_site_overhead_prints_every_phase_and_they_add_up_to_the_handler_time(tmp_path, model_cache, capsys):
    out = tmp_path / "overhead.json"
    assert main(["--rounds", "2", "--out", str(out), f"model.cache_dir={model_cache}", "train.local_steps=2",
                 "train.batch_size=4"]) == 0
    printed = capsys.readouterr().out
    for phase in (*PHASES, "serialize", "gc"):
        assert f"\n  {phase} " in printed
    assert "outside the training loop:" in printed
    result = json.loads(out.read_text())
    assert result["settings"]["error_feedback"] and result["settings"]["upload_codec"] == "bf16"
    assert result["machine"]["cpu_model"] and "gpu" not in result["machine"]
    assert len(result["rounds"]) == 2  # the warm-up round is left out
    for phases in result["rounds"]:
        assert all(phases[name] > 0 for name in LOGGED_PHASES)
        logged = sum(phases[name] for name in LOGGED_PHASES)
        # The logged phases are parts of the handler call: together at most its time, and most of it.
        assert logged <= phases["total"] and phases["other"] < 0.5 * phases["total"]
        assert phases["other"] == pytest.approx(phases["total"] - logged)
    medians = result["phases"]
    assert all(medians[name]["min"] <= medians[name]["median"] <= medians[name]["max"] for name in medians)
    outside = result["outside_training_loop"]
    assert 0 < outside["share_of_round_median"] < 1
