"""The fused LoRA forward (one in-place addmm into the base output) gives PEFT's outputs and gradients (CPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from client.fused_lora import fused_adapter, fused_lora_forward, is_fused, use_fused_lora

IN, OUT, RANK = 32, 24, 4


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _lora_config(**kwargs):
    """r=4, alpha=8, B random (not PEFT's zeros) so the LoRA term and every gradient is non-zero."""
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, **kwargs)


def _lora_linear(**kwargs) -> nn.Module:
    """PEFT's LoRA layer on an nn.Linear; kwargs go to LoraConfig."""
    from peft.tuners.lora.layer import Linear

    torch.manual_seed(0)
    return Linear(nn.Linear(IN, OUT, bias=False), "default", _lora_config(**kwargs), r=RANK, lora_alpha=8)


def _lora_linear_4bit(compute_dtype: torch.dtype) -> nn.Module:
    """PEFT's LoRA layer on a bitsandbytes NF4 Linear4bit, quantized on the CPU (bitsandbytes' default backend)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import bnb as lora_bnb

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(OUT, IN) / IN ** 0.5, requires_grad=False, quant_type="nf4")
    base = base.to("cpu")  # quantizes
    return lora_bnb.Linear4bit(base, "default", _lora_config(), r=RANK, lora_alpha=8)


def _forward_backward(layer: nn.Module, forward, x: torch.Tensor):
    """(output, grad of x, grad of lora_A, grad of lora_B) for loss = sum(output * fixed weights)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = forward(x)
    probe = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out.float() * probe).sum().backward()
    return out.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def _grad_fn_names(tensor: torch.Tensor, depth: int = 3) -> list[str]:
    names, fn = [], tensor.grad_fn
    while fn is not None and len(names) < depth:
        names.append(type(fn).__name__)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return names


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_fused_forward_and_backward_equal_peft_on_a_linear_base(autocast):
    """fp32: outputs and grads to rel err < 1e-6; CPU autocast bf16 (as CUDA's in the trainer): to bf16 rounding."""
    layer = _lora_linear()
    x = torch.randn(2, 5, IN)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    with context():
        expected = _forward_backward(layer, lambda t: type(layer).forward(layer, t), x)
        fused = _forward_backward(layer, lambda t: fused_lora_forward(layer, t), x)
        assert "AddmmBackward0" in _grad_fn_names(fused_lora_forward(layer, x.requires_grad_(True)))
    tolerance = 1e-2 if autocast else 1e-6
    for got, want, what in zip(fused, expected, ("output", "x grad", "A grad", "B grad")):
        assert got.shape == want.shape and got.dtype == want.dtype, what
        assert _rel_err(got, want) < tolerance, what


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "autocast-bf16"])
def test_fused_forward_adds_in_place_into_bitsandbytes_4bit_output(compute_dtype):
    """The in-place addmm on MatMul4Bit's output passes autograd's checks and gives PEFT's outputs and grads."""
    layer = _lora_linear_4bit(compute_dtype)
    x = torch.randn(2, 5, IN, dtype=compute_dtype)
    bf16 = compute_dtype == torch.bfloat16
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    with context():
        expected = _forward_backward(layer, lambda t: type(layer).forward(layer, t), x)
        fused = _forward_backward(layer, lambda t: fused_lora_forward(layer, t), x)
        names = _grad_fn_names(fused_lora_forward(layer, x.requires_grad_(True)))
    assert "AddmmBackward0" in names  # the in-place path, not the out-of-place fallback
    tolerance = 1e-2 if bf16 else 1e-5
    for got, want, what in zip(fused, expected, ("output", "x grad", "A grad", "B grad")):
        assert got.dtype == want.dtype, what
        assert _rel_err(got, want) < tolerance, what


def test_bf16_base_without_autocast_adds_out_of_place_as_peft():
    """A bf16 base output and an fp32 adapter without autocast cannot share an addmm: PEFT's sum, to bf16 rounding."""
    layer = _lora_linear()
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    expected = _forward_backward(layer, lambda t: type(layer).forward(layer, t), x)
    fused = _forward_backward(layer, lambda t: fused_lora_forward(layer, t), x)
    for got, want in zip(fused, expected):
        assert got.dtype == want.dtype and _rel_err(got, want) < 1e-2


def test_unsafe_layers_run_peft_forward():
    """Dropout > 0, DoRA, disabled or merged adapters, hooked LoRA modules: no fused adapter, PEFT's exact output."""
    assert fused_adapter(_lora_linear()) == "default"
    assert fused_adapter(_lora_linear(lora_dropout=0.5)) is None
    assert fused_adapter(_lora_linear(use_dora=True)) is None
    disabled = _lora_linear()
    disabled.enable_adapters(False)
    assert fused_adapter(disabled) is None
    merged = _lora_linear()
    merged.merge()
    assert fused_adapter(merged) is None

    dropout = _lora_linear(lora_dropout=0.5).train()
    x = torch.randn(4, IN)
    torch.manual_seed(3)
    expected = type(dropout).forward(dropout, x)
    torch.manual_seed(3)
    assert torch.equal(fused_lora_forward(dropout, x), expected)  # the same dropout mask: PEFT's forward ran

    hooked = _lora_linear()
    calls = []
    hooked.lora_B["default"].register_forward_hook(lambda *args: calls.append(1))  # as Opacus's grad sampler
    assert fused_adapter(hooked) is None
    fused_lora_forward(hooked, x)
    assert calls == [1]


def test_use_fused_lora_installs_and_removes_only_its_own_forward():
    model = nn.Sequential(_lora_linear(), nn.ReLU(), _lora_linear())
    assert use_fused_lora(model, True) == 2 and use_fused_lora(model, True) == 2
    other = lambda x: x  # noqa: E731 - another owner's forward (StackedLoRA's while it is active)
    model[2].forward = other
    assert use_fused_lora(model, False) == 0
    assert "forward" not in model[0].__dict__ and model[2].forward is other
    assert use_fused_lora(model, True) == 1 and is_fused(model[0]) and not is_fused(model[2])


def test_fast_trainer_trains_the_same_adapter_with_and_without_fusion(tiny_lora):
    """Two FastLocalTrainer runs (checkpointing on) from one adapter and seed: losses and deltas agree to rounding."""
    from client.fast_train import FastLocalTrainer, FastPathSettings
    from federation.adapter import get_adapter_arrays, set_adapter_arrays
    from federation.data import load_site_split

    cfg, model, tokenizer, _ = tiny_lora
    train_ds, _ = load_site_split(cfg.data, tokenizer, 0, 2)
    start = get_adapter_arrays(model)
    runs = []
    for fused in (False, True):
        set_adapter_arrays(model, start)
        trainer = FastLocalTrainer(model, tokenizer.pad_token_id, cfg.train, FastPathSettings(fused_lora=fused))
        layers = sum(is_fused(m) for m in model.modules())
        assert (layers > 0) == fused
        runs.append((trainer.train(train_ds, seed=7), get_adapter_arrays(model)))
    (plain, plain_adapter), (fused, fused_adapter_arrays) = runs
    assert abs(fused.train_loss - plain.train_loss) < 1e-6 * plain.train_loss
    delta = sum(float(((plain_adapter[k] - start[k]) ** 2).sum()) for k in start) ** 0.5
    diff = sum(float(((fused_adapter_arrays[k] - plain_adapter[k]) ** 2).sum()) for k in start) ** 0.5
    assert delta > 0 and diff / delta < 1e-4
