"""The Unsloth comparator's CPU-checkable parts: timed passes, the ratio table, and the skip without Unsloth."""

from __future__ import annotations

import json

import torch

from simulations.bench import unsloth_compare
from simulations.bench.unsloth_compare import comparison_rows, format_table, kernel_kind, measure_passes, profile_pass


def _linear_step(model):
    def prepare(examples):
        return torch.stack([e["x"] for e in examples])

    def step(x):
        loss = (model(x) ** 2).mean()
        loss.backward()
        return loss.detach(), x.shape[0]

    return prepare, step


def test_timed_passes_start_from_the_same_adapter_and_leave_it_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    steps = [[{"x": torch.randn(4)} for _ in range(2)] for _ in range(3)]
    passes = measure_passes(_linear_step(model), list(model.parameters()), steps, reps=2, device=torch.device("cpu"))
    assert [p["rep"] for p in passes] == [1, 2]
    assert passes[0]["losses"] == passes[1]["losses"]  # same start, same data, fresh optimizer: same trajectory
    assert passes[0]["losses"][0] != passes[0]["losses"][-1]  # the optimizer really stepped
    assert all(p["real_tokens"] == 6 and p["tokens_per_s"] > 0 and p["cpu_seconds"] >= 0 for p in passes)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_python_profile_names_the_functions_a_step_spends_its_time_in_and_leaves_the_adapter_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    steps = [[{"x": torch.randn(4)} for _ in range(2)] for _ in range(3)]
    report = unsloth_compare.python_profile_pass(_linear_step(model), list(model.parameters()), steps)
    assert report["wall_ms_per_step"] > 0
    functions = report["top_by_self_ms_per_step"]
    assert any("step" in name for name in functions)  # AdamW's step (or the bench's) is Python that ran
    assert all(calls > 0 and own >= 0 and cumulative >= own for calls, own, cumulative in functions.values())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_host_load_splits_the_hosts_jiffies_into_busy_and_stolen_fractions():
    load = unsloth_compare.host_load((100, 10, 1000), (400, 60, 2000))  # (busy, steal, total)
    assert load["host_busy_frac"] == 0.3 and load["host_steal_frac"] == 0.05
    assert unsloth_compare.host_load(None, (1, 1, 1)).keys() <= {"loadavg_1m"}
    sample = unsloth_compare.host_cpu_times()
    if sample is not None:  # Linux: real /proc/stat counters, busy and steal within the total
        assert 0 <= sample[0] <= sample[2] and 0 <= sample[1] <= sample[2]


def test_profiled_pass_reports_per_step_time_and_top_ops_and_leaves_the_adapter_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    steps = [[{"x": torch.randn(4)} for _ in range(2)] for _ in range(3)]
    report = profile_pass(_linear_step(model), list(model.parameters()), steps)
    assert report["wall_ms_per_step"] > 0
    assert any("linear" in name or "addmm" in name for name in report["top_cpu_ops_ms_per_step"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_kernel_kinds_sort_cuda_kernel_names():
    assert kernel_kind("flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == "attention"
    assert kernel_kind("kDequantize4bit<__nv_bfloat16, 512, 64, 8, NF4>") == "dequantize"
    assert kernel_kind("nvjet_hsh_256x128_64x4_1x2_h_bz_coopB_NTT") == "matmul"
    assert kernel_kind("_swiglu_backward_kernel") == "triton (Liger, Unsloth)"
    assert kernel_kind("some_kernel") == "other"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>") == "elementwise"


def _result(trainer, regime, scenario, rates, peak_gib, loss):
    passes = [{"tokens_per_s": r, "peak_bytes": peak_gib * 2**30, "losses": [loss, loss - 1]} for r in rates]
    return {"trainer": trainer, "shape": "llama-1b", "runs": [{"regime": regime, "scenario": scenario,
                                                              "passes": passes}]}


def test_rows_pair_both_sides_and_compute_ratios_and_spread():
    rows = comparison_rows([_result("ours", "fastest", "full", [90.0, 110.0], 3.0, 12.0),
                            _result("unsloth", "fastest", "full", [50.0, 50.0], 6.0, 12.01),
                            _result("ours", "memory-lean", "variable", [40.0, 40.0], 2.0, 12.0)])
    paired = next(r for r in rows if r["regime"] == "fastest")
    assert paired["speed_ratio"] == 2.0 and paired["memory_ratio"] == 0.5
    assert abs(paired["ours"]["spread"] - 0.2) < 1e-12 and paired["unsloth"]["spread"] == 0.0
    alone = next(r for r in rows if r["regime"] == "memory-lean")
    assert "speed_ratio" not in alone and "unsloth" not in alone
    table = "\n".join(format_table(rows))
    assert "2.00x" in table and "0.50x" in table and "not measured" in table and "12.0000 / 12.0100" in table


def test_without_unsloth_only_ours_runs_with_a_note(tmp_path, monkeypatch, capsys):
    find_spec = unsloth_compare.importlib.util.find_spec
    monkeypatch.setattr(unsloth_compare.importlib.util, "find_spec",
                        lambda name, *a: None if name == "unsloth" else find_spec(name, *a))
    started = []

    def fake_worker(argv, log_path, timeout):
        trainer, shape = argv[argv.index("--worker") + 1], argv[argv.index("--shape") + 1]
        started.append(trainer)
        result = _result(trainer, "fastest", "full", [100.0, 104.0], 1.0, 5.0) | {"env": {"device": "cpu"},
                                                                                   "shape": shape}
        (tmp_path / f"{trainer}_{shape}.json").write_text(json.dumps(result))
        return "ok"

    monkeypatch.setattr(unsloth_compare, "run_worker", fake_worker)
    assert unsloth_compare.main(["--out", str(tmp_path), "--shapes", "tiny"]) == 0
    out = capsys.readouterr().out
    assert started == ["default"]  # the site trainer's defaults unless --trainers says otherwise
    assert "unsloth: skipped, unsloth is not installed" in out
    assert "| tiny | fastest | full | (default) 100 / 104 |" in out
    assert json.loads((tmp_path / "unsloth_compare.json").read_text())["unsloth_skipped"]


def test_variant_table_compares_each_of_our_variants_with_plain_ours():
    from simulations.bench.unsloth_compare import format_variant_table

    liger = _result("ours+liger", "fastest", "full", [150.0, 150.0], 1.5, 12.0)
    for p in liger["runs"][0]["passes"]:
        p["mfu"] = 0.6
    rows = comparison_rows([_result("ours", "fastest", "full", [100.0, 100.0], 3.0, 12.0), liger,
                            _result("unsloth", "fastest", "full", [50.0, 50.0], 6.0, 12.01)])
    table = "\n".join(format_variant_table(rows))
    assert "| llama-1b | fastest | full | ours+liger | 150 | 0.0% | 1.50 | 0.600 | 1.50x | 0.50x | 3.00x | 12.0000 |" \
        in table
    assert "| llama-1b | fastest | full | ours | 100 | 0.0% | 3.00 | - | 1.00x | 1.00x | 2.00x | 12.0000 |" in table


def test_idle_gaps_count_only_time_when_no_stream_runs_anything_and_name_the_kernel_that_ended_them():
    # Two steps' worth: "copy" on a side stream overlaps "mm" (no gap there); 10 us before "ce", 30 before "mm2".
    timeline = [(0.0, 100.0, "mm"), (50.0, 120.0, "copy"), (130.0, 200.0, "ce"), (230.0, 260.0, "mm2"),
                (240.0, 250.0, "inside")]
    gaps = unsloth_compare.gpu_idle_gaps(timeline, steps=2)
    assert gaps["gpu_idle_ms_per_step"] == 0.02  # (10 + 30) us over 2 steps
    assert gaps["gpu_span_ms_per_step"] == 0.13
    assert gaps["idle_ms_per_step_before_kernel"] == {"mm2": 0.015, "ce": 0.005}
    assert gaps["largest_idle_gaps_ms"] == [[0.03, "ce", "mm2"], [0.01, "copy", "ce"]]
    assert unsloth_compare.gpu_idle_gaps([], steps=1) == {}
