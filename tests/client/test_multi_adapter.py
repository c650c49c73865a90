"""Multi-adapter batched training gives every client the adapter that training it alone gives (fp32, CPU, tiny)."""

from __future__ import annotations

import contextlib
import importlib.util

import numpy as np
import pytest
import torch

import client.kernels as kernels
from client.fast_train import FastLocalTrainer, FastPathSettings, linear_cross_entropy_per_token
from client.fused_lora import use_nf4_kernel
from client.multi_adapter import MultiAdapterTrainer, StackedLoRA, combine_batches, train_replies
from client.trainer import LocalTrainer
from federation.adapter import get_adapter_arrays, lora_parameters, set_adapter_arrays
from federation.data import IGNORE_INDEX, load_site_split
from tests.flower_messages import instruction

# fp32 on CPU: batched and solo gradients differ only in summation order (checked to GRAD_REL_TOL below). AdamW
# divides by sqrt(v) + eps, which magnifies that rounding in coordinates whose gradient is near zero (peft starts
# B at zero), so trained adapters are compared relative to the update's norm, below bf16's unit roundoff 2^-8.
REL_TOL = 2.5e-3
GRAD_REL_TOL = 1e-5


def _setup(make_cfg, *overrides):
    from federation.model import build_lora_model

    cfg = make_cfg("federation.num_clients=3", "train.local_steps=3", "train.batch_size=3", *overrides)
    # The tiny base model's random init draws from the global RNG: seeded, so the model (and how far three Adam
    # steps carry float differences between batched and solo, more for some inits than others) does not depend on
    # which tests ran before in the process.
    torch.manual_seed(0)
    model, tokenizer, _ = build_lora_model(cfg.model, cfg.lora)
    datasets = [load_site_split(cfg.data, tokenizer, pid, 3)[0] for pid in range(3)]
    return cfg, model, tokenizer, datasets


def _solo_adapters(trainer, model, start, datasets, seeds, proximal_mu=0.0):
    out = []
    for ds, seed in zip(datasets, seeds):
        set_adapter_arrays(model, start)
        result = trainer.train(ds, seed=seed, proximal_mu=proximal_mu)
        out.append((result, get_adapter_arrays(model)))
    return out


def _max_rel_update_error(batched: dict, solo: dict, start: dict) -> float:
    """max over tensors of ||batched - solo|| / ||solo - start||: error relative to the update itself."""
    worst = 0.0
    for key in solo:
        update = np.linalg.norm(solo[key].astype(np.float64) - start[key])
        if update == 0:
            assert np.array_equal(batched[key], solo[key]), key
            continue
        worst = max(worst, float(np.linalg.norm(batched[key].astype(np.float64) - solo[key]) / update))
    return worst


def _graph_node_names(tensor: torch.Tensor) -> set[str]:
    """The type names of every autograd node tensor's value was computed through."""
    names, seen, todo = set(), set(), [tensor.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("fast_path", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("variant", ["plain", "clipped+fedprox+accum", "ffa"])
def test_batched_clients_match_solo_training(make_cfg, fast_path, variant):
    overrides = {"plain": [],
                 # a clip far below the gradient norms: per-client clipping is active at every step
                 "clipped+fedprox+accum": ["train.max_grad_norm=0.05", "train.grad_accum=2"],
                 "ffa": ["strategy=ffa_lora"]}[variant]
    cfg, model, tokenizer, datasets = _setup(make_cfg, f"train.fast_path={fast_path}", *overrides)
    from client.task import configure_trainable

    configure_trainable(model, cfg)
    start = get_adapter_arrays(model)
    solo_cls = FastLocalTrainer if fast_path else LocalTrainer
    trainer = solo_cls(model, tokenizer.pad_token_id, cfg.train)
    forwards = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    assert any(forwards.values()) == fast_path  # the fast trainer's fused LoRA forward (client/fused_lora.py)
    seeds = [11, 12, 13]
    mu = 0.5 if variant.startswith("clipped") else 0.0
    solo = _solo_adapters(trainer, model, start, datasets, seeds, mu)
    set_adapter_arrays(model, start)
    batched = MultiAdapterTrainer(trainer).train(datasets, seeds, start, proximal_mu=mu)

    assert len(batched) == 3
    for (b_result, b_arrays), (s_result, s_arrays) in zip(batched, solo):
        assert _max_rel_update_error(b_arrays, s_arrays, start) < REL_TOL
        assert b_result.steps == s_result.steps
        assert b_result.target_tokens == s_result.target_tokens
        assert b_result.input_tokens == s_result.input_tokens
        assert b_result.train_loss == pytest.approx(s_result.train_loss, rel=1e-5)
    # The three clients had different data, so their adapters differ: nothing was averaged in between.
    some_b = next(k for k in start if ".lora_B." in k)
    assert not np.allclose(batched[0][1][some_b], batched[1][1][some_b])
    if variant == "ffa":
        for _, arrays in batched:
            assert all(np.array_equal(arrays[k], start[k]) for k in start if ".lora_A." in k)
    # The model's own LoRA layers are untouched and back to the forward they had (PEFT's, or the fused one).
    assert all(np.array_equal(v, start[k]) for k, v in get_adapter_arrays(model).items())
    assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == forwards


@pytest.fixture
def cpu_kernels(monkeypatch):
    """On a CPU: varlen attention allowed and run by the reference kernel, and a kernel set "reference" whose
    linear_ce_sum is full-logits torch cross-entropy. Records each varlen call's cu_seqlens and each loss call's size."""
    calls = {"varlen": [], "linear_ce_sum": [], "apply": []}

    def varlen(*args):
        calls["varlen"].append(args[3].tolist())
        return kernels.reference_varlen_kernel(*args)

    def linear_ce_sum(hidden, weight, targets):
        calls["linear_ce_sum"].append(hidden.shape[0])
        return torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")

    monkeypatch.setattr(kernels, "varlen_kernel", varlen)
    monkeypatch.setitem(kernels.ATTENTION_PATHS, "varlen", kernels.AttentionPath("varlen", lambda device_type: None))
    monkeypatch.setitem(kernels.KERNEL_SETS, "reference", kernels.KernelSet(
        "reference", unavailable=lambda device_type: None, apply=calls["apply"].append, linear_ce_sum=linear_ce_sum))
    return calls


@pytest.mark.parametrize(("kernel_set", "attention"), [("none", "varlen"), ("reference", "sdpa"),
                                                       ("reference", "varlen")])
def test_batched_clients_match_solo_training_with_the_same_kernels(make_cfg, cpu_kernels, kernel_set, attention):
    """train.kernels / train.attention on the batched path: each client's adapter and loss are its solo ones."""
    cfg, model, tokenizer, datasets = _setup(make_cfg, "train.grad_accum=2")
    start = get_adapter_arrays(model)
    # Rows of two examples (the demo's are 18-24 tokens), of another width per client: varlen must keep every
    # example and every padding tail of the combined batch its own sequence.
    pack_len = 2 * max(len(ds[i]["input_ids"]) for ds in datasets for i in range(len(ds)))
    trainer = FastLocalTrainer(model, tokenizer.pad_token_id, cfg.train,
                               FastPathSettings(pack_len=pack_len, kernels=kernel_set, attention=attention))
    seeds = [11, 12, 13]
    solo = _solo_adapters(trainer, model, start, datasets, seeds)
    solo_calls = {name: len(calls) for name, calls in cpu_kernels.items()}
    set_adapter_arrays(model, start)
    multi = MultiAdapterTrainer(trainer)
    batched = multi.train(datasets, seeds, start)

    for (b_result, b_arrays), (s_result, s_arrays) in zip(batched, solo):
        assert _max_rel_update_error(b_arrays, s_arrays, start) < REL_TOL
        assert b_result.target_tokens == s_result.target_tokens
        assert b_result.train_loss == pytest.approx(s_result.train_loss, rel=1e-5)
    # The batched loop itself ran the switches, not only the solo runs it is compared with.
    varlen_calls = cpu_kernels["varlen"][solo_calls["varlen"]:]
    loss_calls = cpu_kernels["linear_ce_sum"][solo_calls["linear_ce_sum"]:]
    if attention == "varlen":
        assert varlen_calls and multi.varlen
    else:
        assert cpu_kernels["varlen"] == [] and not multi.varlen
    if kernel_set == "reference":
        assert cpu_kernels["apply"] == [model]  # applied once, to the resident model both trainers share
        micro_batches = cfg.train.local_steps * cfg.train.grad_accum
        assert len(loss_calls) == len(datasets) * micro_batches  # one per client and micro-batch
        assert sum(loss_calls) == sum(result.target_tokens for result, _ in batched)
    else:
        assert cpu_kernels["linear_ce_sum"] == [] and multi.linear_ce_sum is None


def test_auto_kernels_and_attention_on_cpu_train_together_exactly_like_the_defaults(make_cfg):
    """kernels=auto, attention=auto (the defaults) on a CPU: batched adapters and losses equal none/sdpa's exactly."""
    cfg, model, tokenizer, datasets = _setup(make_cfg)
    start = get_adapter_arrays(model)
    seeds = [11, 12, 13]
    runs = []
    for settings in (FastPathSettings(kernels="none", attention="sdpa"), FastPathSettings()):
        set_adapter_arrays(model, start)
        multi = MultiAdapterTrainer(FastLocalTrainer(model, tokenizer.pad_token_id, cfg.train, settings))
        assert multi.linear_ce_sum is None and not multi.varlen
        runs.append(multi.train(datasets, seeds, start))
    assert model.get_base_model().config._attn_implementation == "sdpa"
    for (default_result, default_arrays), (auto_result, auto_arrays) in zip(*runs):
        assert auto_result.train_loss == default_result.train_loss
        assert all(np.array_equal(auto_arrays[k], default_arrays[k]) for k in default_arrays)


@pytest.mark.parametrize("switch", ["train.kernels=liger", "train.attention=varlen"])
def test_batched_path_refuses_an_explicit_kernel_choice_that_cannot_run_on_cpu(make_cfg, switch):
    """The batched ClientApp path raises the solo trainer's error; it does not silently train without the switch."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from federation.adapter import to_array_record
    from federation.config import run_config_to_json
    from federation.model import initial_adapter
    from federation.protocol import RUN_CONFIG_KEY

    cfg = make_cfg("federation.num_clients=2", "train.fast_path=true", switch)
    content = RecordDict({"arrays": to_array_record(initial_adapter(cfg.model, cfg.lora)),
                          "config": ConfigRecord({RUN_CONFIG_KEY: run_config_to_json(cfg), "server-round": 1})})
    messages = [instruction(content, dst_node_id=k + 1) for k in range(2)]
    contexts = [Context(run_id=1, node_id=k + 1, node_config={"partition-id": k, "num-partitions": 2},
                        state=RecordDict(), run_config={}) for k in range(2)]
    with pytest.raises(ValueError, match=f"{switch}: .*CUDA device"):
        train_replies(messages, contexts)


def test_stacked_lora_routes_each_row_through_its_own_adapter(make_cfg):
    """Row k of a batch under StackedLoRA gives the logits of the model with adapter k loaded."""
    cfg, model, tokenizer, datasets = _setup(make_cfg)
    start = get_adapter_arrays(model)
    rng = np.random.default_rng(0)
    adapters = [{k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in start.items()} for _ in range(3)]
    ids = torch.tensor([list(datasets[0][i]["input_ids"][:6]) for i in range(3)])
    model.eval()
    expected = []
    with torch.no_grad():
        for arrays in adapters:
            set_adapter_arrays(model, arrays)
            expected.append(model(input_ids=ids).logits)
        set_adapter_arrays(model, start)
        with StackedLoRA(model, start, 3) as stacked:
            for layer in stacked.layers:
                for k, arrays in enumerate(adapters):
                    layer.lora_a[k].copy_(torch.from_numpy(arrays[layer.key_a]))
                    layer.lora_b[k].copy_(torch.from_numpy(arrays[layer.key_b]))
            rows = torch.tensor([2, 0, 1])
            stacked.row_adapter = rows
            routed = model(input_ids=ids).logits
    for row, k in enumerate(rows.tolist()):
        torch.testing.assert_close(routed[row], expected[k][row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast_path", [False, True], ids=["padded", "packed"])
def test_batched_gradients_equal_each_clients_solo_gradient(make_cfg, fast_path):
    """One batched backward of 3 clients' batches gives each client's stacked slice its solo gradient."""
    cfg, model, tokenizer, datasets = _setup(make_cfg, f"train.fast_path={fast_path}")
    rng = np.random.default_rng(1)
    start = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in get_adapter_arrays(model).items()}
    solo = (FastLocalTrainer if fast_path else LocalTrainer)(model, tokenizer.pad_token_id, cfg.train)
    batches = [solo._collate([ds[i] for i in range(3)]) for ds in datasets]
    set_adapter_arrays(model, start)
    expected = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        summed, tokens = solo._batch_loss_sum(batch)
        (summed / tokens).backward()
        expected.append({k: p.grad.clone() for k, p in lora_parameters(model).items()})
    model.zero_grad(set_to_none=True)
    multi = MultiAdapterTrainer(solo)
    # The fast trainer's base matmuls (client/fused_lora.py fused_base_forward); PEFT's trainer: the base's own.
    assert multi.fused_base == fast_path
    with StackedLoRA(model, start, 3, fused_base=multi.fused_base) as stacked:
        combined = combine_batches(batches, tokenizer.pad_token_id)
        stacked.row_adapter = combined["row_adapter"]
        sums, tokens = multi._adapter_loss_sums(combined, 3, torch.device("cpu"))
        assert ("_FrozenLinearBackward" in _graph_node_names(sums)) == fast_path
        (sums / tokens).sum().backward()
        for layer in stacked.layers:
            for k in range(3):
                for key, grad in ((layer.key_a, layer.lora_a.grad[k]), (layer.key_b, layer.lora_b.grad[k])):
                    err = float((grad - expected[k][key]).norm() / expected[k][key].norm())
                    assert err < GRAD_REL_TOL, (key, k, err)


def test_fused_base_trains_the_adapters_the_base_layers_own_forward_trains(make_cfg):
    """Batched training with the fast trainer's base matmuls (fused_lora on) and with the base layers' own forward
    (fused_lora off): the same losses and adapters up to rounding."""
    cfg, model, tokenizer, datasets = _setup(make_cfg)
    start = get_adapter_arrays(model)
    seeds = [11, 12, 13]
    runs = []
    for fused in (True, False):
        set_adapter_arrays(model, start)
        multi = MultiAdapterTrainer(FastLocalTrainer(model, tokenizer.pad_token_id, cfg.train,
                                                     FastPathSettings(fused_lora=fused)))
        assert multi.fused_base == fused
        runs.append(multi.train(datasets, seeds, start))
    for (fused_result, fused_arrays), (own_result, own_arrays) in zip(*runs):
        assert fused_result.train_loss == pytest.approx(own_result.train_loss, rel=1e-6)
        assert _max_rel_update_error(fused_arrays, own_arrays, start) < REL_TOL


def _stacked_4bit_run(device: str, fused_base: bool, x: torch.Tensor, compute_dtype: torch.dtype,
                      nf4_kernel: bool = False):
    """(output, dL/dx, dL/d stacked A, dL/d stacked B) of one bitsandbytes NF4 LoRA layer under StackedLoRA with 2
    adapters (B random), rows 1, 0, 1, ...: the base through fused_base_forward (fused_base) or its own forward."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from peft.tuners.lora import bnb as lora_bnb

    torch.manual_seed(0)
    features = x.shape[-1]
    base = bnb.nn.Linear4bit(features, 96, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
    # Quantized from compute-dtype values (as a bf16 checkpoint is): bitsandbytes' dequantize into the compute
    # dtype and dense_weight's (into quant_state.dtype, then cast) are then the same values.
    base.weight = bnb.nn.Params4bit((torch.randn(96, features) / features ** 0.5).to(compute_dtype),
                                    requires_grad=False, quant_type="nf4")
    layer = lora_bnb.Linear4bit(base.to(device), "default", LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    model = torch.nn.Sequential(layer.to(device))
    assert use_nf4_kernel(model, nf4_kernel) == int(nf4_kernel)
    x = x.detach().to(device).clone().requires_grad_(True)
    bf16 = compute_dtype == torch.bfloat16
    autocast = torch.autocast(device, dtype=compute_dtype) if bf16 else contextlib.nullcontext()
    with StackedLoRA(model, get_adapter_arrays(model), 2, fused_base=fused_base) as stacked:
        gen = torch.Generator().manual_seed(1)
        for param in (stacked.layers[0].lora_a, stacked.layers[0].lora_b):
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        stacked.row_adapter = (torch.arange(x.shape[0], device=device) + 1) % 2
        with autocast:
            out = model(x)
        assert ("_FrozenLinearBackward" in _graph_node_names(out)) == fused_base
        probe = torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape)
        (out.float() * probe).sum().backward()
        layer_grads = stacked.layers[0].lora_a.grad, stacked.layers[0].lora_b.grad
    return out.detach(), x.grad, *layer_grads


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "autocast-bf16"])
def test_stacked_forward_on_a_4bit_layer_with_the_fused_base_equals_bitsandbytes(compute_dtype):
    """CPU: the stacked NF4 layer through fused_base_forward gives bitsandbytes' MatMul4Bit outputs and gradients."""
    x = torch.randn(3, 5, 64).to(compute_dtype)
    fused = _stacked_4bit_run("cpu", True, x, compute_dtype)
    own = _stacked_4bit_run("cpu", False, x, compute_dtype)
    tolerance = 1e-2 if compute_dtype == torch.bfloat16 else 1e-6
    for got, want, what in zip(fused, own, ("output", "x grad", "A grad", "B grad")):
        assert got.dtype == want.dtype, what
        assert float((got.double() - want.double()).norm() / want.double().norm()) < tolerance, what


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and Triton")
def test_cuda_stacked_forward_on_a_4bit_layer_with_the_nf4_kernel_equals_bitsandbytes_bit_for_bit():
    """The stacked NF4 layer with fused_base and the one-kernel dequantize (as the fast trainer sets them) against
    bitsandbytes' own 4-bit matmul under bf16 autocast: outputs and gradients bit for bit.

    2,048 rows: above 1,536 bitsandbytes (0.50) runs dequantize + F.linear as fused_base_forward does; below it may
    pick its fused 4-bit GEMM, equal only to rounding.
    """
    x = torch.randn(2, 1024, 256).to(torch.bfloat16)
    fused = _stacked_4bit_run("cuda", True, x, torch.bfloat16, nf4_kernel=True)
    own = _stacked_4bit_run("cuda", False, x, torch.bfloat16)
    for got, want, what in zip(fused, own, ("output", "x grad", "A grad", "B grad")):
        assert got.dtype == want.dtype and torch.equal(got, want), what


def test_clients_with_different_step_counts_are_refused(make_cfg):
    cfg, model, tokenizer, datasets = _setup(make_cfg, "train.local_epochs=1")
    trainer = LocalTrainer(model, tokenizer.pad_token_id, cfg.train)
    short = torch.utils.data.Subset(datasets[0], [0])
    with pytest.raises(ValueError, match="same number of steps"):
        MultiAdapterTrainer(trainer).train([datasets[1], short], [1, 2], get_adapter_arrays(model))


def test_combine_batches_pads_rows_and_labels_each_with_its_client():
    packed_a = {"input_ids": torch.tensor([[5, 6, 7]]), "position_ids": torch.tensor([[0, 1, 2]]),
                "target_ids": torch.tensor([[6, 7, IGNORE_INDEX]])}
    packed_b = {"input_ids": torch.tensor([[8], [9]]), "position_ids": torch.tensor([[0], [0]]),
                "target_ids": torch.tensor([[IGNORE_INDEX], [IGNORE_INDEX]])}
    out = combine_batches([packed_a, packed_b], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1], [0, 0, 1]]  # padding: its own segment
    assert out["targets"].tolist() == [[6, 7, -100], [-100] * 3, [-100] * 3]
    assert out["row_adapter"].tolist() == [0, 1, 1]
    # varlen attention over the combined rows: every row, example and padding tail is its own sequence
    assert kernels.packed_cu_seqlens(out["position_ids"])[0].tolist() == [0, 3, 4, 6, 7, 9]
    padded_a = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 1]]),
                "labels": torch.tensor([[-100, 6]])}
    padded_b = {"input_ids": torch.tensor([[8, 9, 4]]), "attention_mask": torch.tensor([[1, 1, 1]]),
                "labels": torch.tensor([[-100, 9, 4]])}
    out = combine_batches([padded_a, padded_b], pad_token_id=0)
    assert out["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert out["targets"].tolist() == [[6, -100, -100], [9, 4, -100]]  # shifted as HF's loss shifts


def test_per_token_cross_entropy_and_weighted_gradient_match_autograd():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 20, (10,), generator=gen)
    weights = torch.rand(10, generator=gen, dtype=torch.float64)
    losses = linear_cross_entropy_per_token(hidden, weight, targets, chunk_size=3)
    (losses * weights).sum().backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    (reference * weights).sum().backward()
    torch.testing.assert_close(losses.double(), reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, hidden.grad, rtol=1e-5, atol=1e-6)  # softmax in fp32
    with pytest.raises(ValueError, match="frozen head"):
        linear_cross_entropy_per_token(hidden, weight.clone().requires_grad_(), targets)
