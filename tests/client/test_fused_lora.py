"""The fused LoRA forward (one in-place addmm into the base output) gives PEFT's outputs and gradients (CPU)."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch
from torch import nn

from client.fused_lora import (fused_adapter, fused_base_forward, fused_lora_forward, is_fused, is_fused_mlp,
                               use_fused_lora, use_fused_mlp)

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
    base = nn.Linear(IN, OUT, bias=False).requires_grad_(False)  # frozen, as get_peft_model leaves it
    return Linear(base, "default", _lora_config(**kwargs), r=RANK, lora_alpha=8)


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
        assert "_LoRALinearBackward" in _grad_fn_names(fused_lora_forward(layer, x.requires_grad_(True)))
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
    assert "_LoRALinearBackward" in names  # the fused function, not PEFT's or the out-of-place fallback
    tolerance = 1e-2 if bf16 else 1e-5
    for got, want, what in zip(fused, expected, ("output", "x grad", "A grad", "B grad")):
        assert got.dtype == want.dtype, what
        assert _rel_err(got, want) < tolerance, what


def test_fused_function_equals_peft_in_float64_with_a_frozen_bias_and_without_input_grad():
    """_LoRALinear to float64 rounding (bias included); with x not requiring grad only the LoRA grads are made."""
    from peft.tuners.lora.layer import Linear

    torch.manual_seed(0)
    layer = Linear(nn.Linear(IN, OUT, bias=True), "default", _lora_config(), r=RANK, lora_alpha=8).double()
    layer.base_layer.requires_grad_(False)
    x = torch.randn(3, 4, IN, dtype=torch.float64)
    expected = _forward_backward(layer, lambda t: type(layer).forward(layer, t), x)
    fused = _forward_backward(layer, lambda t: fused_lora_forward(layer, t), x)
    assert "_LoRALinearBackward" in _grad_fn_names(fused_lora_forward(layer, x.requires_grad_(True)))
    for got, want, what in zip(fused, expected, ("output", "x grad", "A grad", "B grad")):
        assert _rel_err(got, want) < 1e-12, what
    layer.zero_grad(set_to_none=True)
    fused_lora_forward(layer, x.detach()).sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_a_trainable_base_weight_is_not_fused_away():
    """The fused function gives no base-weight gradient, so an unfrozen base runs the addmm path and gets one."""
    layer = _lora_linear()
    layer.base_layer.weight.requires_grad_(True)
    out = fused_lora_forward(layer, torch.randn(3, IN))
    assert "_LoRALinearBackward" not in _grad_fn_names(out, depth=8)
    out.sum().backward()
    assert layer.base_layer.weight.grad is not None


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


def _without_copies(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) with every weight cast in the forward (no LoRACopies): the reference the copies must equal."""
    from client.fused_lora import LORA_COPIES_ATTRIBUTE

    layers = [m for m in model.modules() if LORA_COPIES_ATTRIBUTE in m.__dict__]
    held = [m.__dict__.pop(LORA_COPIES_ATTRIBUTE) for m in layers]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for m, copies in zip(layers, held):
            m.__dict__[LORA_COPIES_ATTRIBUTE] = copies


def test_compute_dtype_copies_follow_every_change_of_the_weights():
    """Under bf16 autocast the fused layers read A and B from one LoRACopies: refreshed once for all layers, and
    again after an optimizer step, a loaded adapter or a replaced .data; always equal to casting in the forward."""
    from client.fused_lora import LORA_COPIES_ATTRIBUTE

    model = nn.Sequential(_lora_linear(), nn.ReLU(), _lora_linear())
    model[2].base_layer = nn.Linear(OUT, OUT, bias=False).requires_grad_(False)
    model[2].lora_A["default"] = nn.Linear(OUT, RANK, bias=False)
    assert use_fused_lora(model, True) == 2
    copies = model[0].__dict__[LORA_COPIES_ATTRIBUTE]
    assert copies is model[2].__dict__[LORA_COPIES_ATTRIBUTE] and len(copies.params) == 4
    x = torch.randn(6, IN)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def check(expected_refreshes: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert torch.equal(out, _without_copies(model, x))
        assert copies.refreshes == expected_refreshes
        assert all(c.dtype == torch.bfloat16 for c in copies.copies)

    check(1)
    check(1)  # unchanged weights: no refresh
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().square().sum().backward()
    assert copies.refreshes == 1  # backward reads the copies the forward saved
    optimizer.step()
    check(2)
    with torch.no_grad():  # an adapter loaded as federation.adapter.set_adapter_arrays does
        model[0].lora_B["default"].weight.copy_(torch.randn(OUT, RANK))
    check(3)
    model[2].lora_A["default"].weight.data = torch.randn(RANK, OUT)  # replaced storage, version unchanged
    check(4)


def test_compute_dtype_copies_made_under_inference_mode_still_train():
    """Copies first made in an evaluation under inference_mode are plain tensors a later training step updates."""
    model = nn.Sequential(_lora_linear())
    use_fused_lora(model, True)
    x = torch.randn(3, IN)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    optimizer.step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), _without_copies(model, x))


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
    # On CUDA (bf16 autocast) Adam turns rounding differences of near-zero gradients into full-size steps.
    tolerance = 1e-4 if next(model.parameters()).device.type == "cpu" else 5e-2
    assert delta > 0 and diff / delta < tolerance


# ------------------------------------------------------------------------------- the frozen base layer alone


def _base_layer(kind: str) -> nn.Module:
    """A frozen base layer: nn.Linear with a bias (fp32) or bitsandbytes NF4 (fp32 or bf16 compute)."""
    if kind == "linear":
        torch.manual_seed(0)
        return nn.Linear(IN, OUT, bias=True).requires_grad_(False)
    return _lora_linear_4bit(torch.bfloat16 if kind == "4bit-bf16" else torch.float32).base_layer


def _base_run(forward, x: torch.Tensor):
    """(output, grad of x) for loss = sum(output * fixed weights)."""
    x = x.detach().clone().requires_grad_(True)
    out = forward(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize(("kind", "autocast"), [("linear", False), ("linear", True), ("4bit-fp32", False),
                                                ("4bit-bf16", True)])
def test_fused_base_forward_and_input_grad_equal_the_base_layers_own(kind, autocast):
    """Output and dL/dx of the base alone as its own forward gives them, with no tensor saved for backward."""
    base = _base_layer(kind)
    x = torch.randn(2, 5, IN, dtype=torch.bfloat16 if autocast else torch.float32)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    saved = []
    with context():
        expected = _base_run(base, x)
        fused = _base_run(lambda t: fused_base_forward(base, t), x)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fused_base_forward(base, x.requires_grad_(True))
    assert "_FrozenLinearBackward" in _grad_fn_names(out)
    assert saved == []  # not x, not a dequantized weight: dy W dequantizes again in backward
    tolerance = 1e-2 if autocast else 1e-6
    for got, want, what in zip(fused, expected, ("output", "x grad")):
        assert got.shape == want.shape and got.dtype == want.dtype, what
        assert _rel_err(got, want) < tolerance, what


def test_fused_base_forward_runs_the_base_layer_where_it_is_not_exact():
    """A trainable base weight, a hooked base, x not in the 4-bit layer's compute dtype: the base's own forward."""
    trainable = _base_layer("linear").requires_grad_(True)
    out = fused_base_forward(trainable, torch.randn(3, IN))
    assert "_FrozenLinearBackward" not in _grad_fn_names(out, depth=8)
    out.sum().backward()
    assert trainable.weight.grad is not None and trainable.bias.grad is not None

    hooked = _base_layer("linear")
    calls = []
    hooked.register_forward_hook(lambda *args: calls.append(1))
    fused_base_forward(hooked, torch.randn(3, IN))
    assert calls == [1]

    bits4 = _base_layer("4bit-fp32")
    x = torch.randn(3, IN, dtype=torch.bfloat16, requires_grad=True)
    out = fused_base_forward(bits4, x)
    assert "_FrozenLinearBackward" not in _grad_fn_names(out, depth=8)
    assert out.dtype == torch.bfloat16 and torch.equal(out, bits4(x))


# ---------------------------------------------------------------------------------------- fused SwiGLU MLP

HIDDEN, INTERMEDIATE = 16, 40


def _lora_mlp(dtype: torch.dtype = torch.float64, bits4: bool = False, **lora_kwargs) -> nn.Module:
    """transformers' LlamaMLP with PEFT LoRA on gate/up/down (B random), on nn.Linear or bitsandbytes NF4 bases."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, hidden_act="silu", num_attention_heads=2,
                                 num_key_value_heads=2))
    if bits4:
        bnb = pytest.importorskip("bitsandbytes")
        for name in ("gate_proj", "up_proj", "down_proj"):
            dense = getattr(mlp, name)
            layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=dtype,
                                      quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
            setattr(mlp, name, layer.to("cpu"))  # quantizes
    else:
        mlp.to(dtype)
    lora = LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False,
                      target_modules=["gate_proj", "up_proj", "down_proj"], **lora_kwargs)
    model = get_peft_model(mlp, lora)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
    use_fused_lora(model, True)
    return model


def _mlp_module(model: nn.Module) -> nn.Module:
    return model.get_base_model()


def _mlp_run(model: nn.Module, x: torch.Tensor):
    """(output, x grad, every LoRA grad by name) for loss = sum(output * fixed weights)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = _mlp_module(model)(x)
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device).reshape(out.shape)
    (out.double() * probe).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one forward of the MLP (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _mlp_module(model)(x.detach().clone().requires_grad_(True))
    return sum(seen.values())


def test_fused_mlp_equals_the_module_by_module_path_float64():
    """Output, input grad and all six LoRA grads equal the unfused path's to float64 rounding."""
    model = _lora_mlp()
    x = torch.randn(3, 7, HIDDEN, dtype=torch.float64)
    expected = _mlp_run(model, x)
    assert use_fused_mlp(model, True) == 1 and is_fused_mlp(_mlp_module(model))
    fused = _mlp_run(model, x)
    assert "_LoRASwiGLUBackward" in _grad_fn_names(_mlp_module(model)(x.requires_grad_(True)))
    assert _rel_err(fused[0], expected[0]) < 1e-12 and _rel_err(fused[1], expected[1]) < 1e-12
    assert set(fused[2]) == set(expected[2]) and len(fused[2]) == 6
    for name, grad in expected[2].items():
        assert grad.abs().sum() > 0 and _rel_err(fused[2][name], grad) < 1e-12, name


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "autocast-bf16"])
def test_fused_mlp_on_bitsandbytes_4bit_bases(compute_dtype):
    """On NF4 bases (dequantized in forward and backward) the fused MLP gives the unfused outputs and grads."""
    model = _lora_mlp(torch.float32, bits4=True)
    x = torch.randn(2, 5, HIDDEN, dtype=compute_dtype)
    bf16 = compute_dtype == torch.bfloat16
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    with context():
        expected = _mlp_run(model, x)
        use_fused_mlp(model, True)
        fused = _mlp_run(model, x)
        assert "_LoRASwiGLUBackward" in _grad_fn_names(_mlp_module(model)(x.requires_grad_(True)))
    tolerance = 2e-2 if bf16 else 1e-5
    assert fused[0].dtype == expected[0].dtype and _rel_err(fused[0], expected[0]) < tolerance
    assert _rel_err(fused[1], expected[1]) < tolerance
    for name, grad in expected[2].items():
        assert fused[2][name].dtype == grad.dtype and _rel_err(fused[2][name], grad) < tolerance, name


def test_fused_mlp_keeps_one_intermediate_activation_less():
    """What autograd keeps: the unfused path saves h = silu(gate) * up for down's lora_A; the fused one does not."""
    model = _lora_mlp(torch.float32)
    tokens = 64
    x = torch.randn(tokens, HIDDEN)
    unfused = _saved_bytes(model, x)
    use_fused_mlp(model, True)
    fused = _saved_bytes(model, x)
    intermediate_bytes = tokens * INTERMEDIATE * 4
    assert unfused - fused >= intermediate_bytes


def test_fused_mlp_falls_back_where_it_is_not_exact():
    """LoRA dropout, projections that are not fused (multi-adapter stacking) or unequal dtypes: the previous forward."""
    x = torch.randn(4, HIDDEN, dtype=torch.float64)
    dropout = _lora_mlp(lora_dropout=0.5)
    assert use_fused_mlp(dropout, True) == 1
    mlp = _mlp_module(dropout).train()
    torch.manual_seed(3)
    expected = type(mlp).forward(mlp, x)
    torch.manual_seed(3)
    assert torch.equal(mlp(x), expected)  # the same dropout masks: the module-by-module forward ran

    stacked = _lora_mlp()
    use_fused_mlp(stacked, True)
    mlp = _mlp_module(stacked)
    mlp.up_proj.forward = lambda t: torch.zeros(*t.shape[:-1], INTERMEDIATE, dtype=t.dtype)  # another owner's
    assert torch.equal(mlp(x), torch.zeros(4, HIDDEN, dtype=torch.float64))

    mixed = _lora_mlp(torch.float32)  # float32 bases, float64 adapters, no autocast: PEFT adds across dtypes
    for param in mixed.parameters():
        if param.requires_grad:
            param.data = param.data.double()
    use_fused_mlp(mixed, True)
    out = _mlp_module(mixed)(x.float().requires_grad_(True))
    assert "_LoRASwiGLUBackward" not in _grad_fn_names(out, depth=8)
    use_fused_mlp(mixed, False)
    assert torch.equal(out, _mlp_module(mixed)(x.float()))


def test_use_fused_mlp_keeps_and_restores_a_kernel_sets_forward():
    """An instance forward from a kernel set (Liger's SwiGLU) is kept for fallbacks and put back when disabled."""
    model = _lora_mlp()
    mlp = _mlp_module(model)
    kernel_set_forward = lambda t: mlp.down_proj(mlp.act_fn(mlp.gate_proj(t)) * mlp.up_proj(t))  # noqa: E731
    mlp.forward = kernel_set_forward
    assert use_fused_mlp(model, True) == 1 and use_fused_mlp(model, True) == 1
    assert mlp._fedtune_unfused_forward is kernel_set_forward
    assert use_fused_mlp(model, False) == 0 and mlp.forward is kernel_set_forward
    plain = _lora_mlp()
    use_fused_mlp(plain, True)
    use_fused_mlp(plain, False)
    assert "forward" not in _mlp_module(plain).__dict__
    assert use_fused_mlp(nn.Sequential(_lora_linear()), True) == 0  # no SwiGLU MLP: nothing to fuse


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bitsandbytes NF4 kernels, Liger's SwiGLU)")
def test_fused_mlp_on_cuda_nf4_under_autocast():
    """On the GPU path the trainer runs (NF4 bases, bf16 autocast, Liger's kernels if installed): grads agree."""
    model = _lora_mlp(torch.float32, bits4=True).to("cuda")
    x = torch.randn(2, 64, HIDDEN, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = _mlp_run(model, x)
        use_fused_mlp(model, True)
        fused = _mlp_run(model, x)
    assert _rel_err(fused[0], expected[0]) < 2e-2 and _rel_err(fused[1], expected[1]) < 2e-2
    for name, grad in expected[2].items():
        assert _rel_err(fused[2][name], grad) < 2e-2, name


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_writes_h_and_both_gradients_in_place(dtype):
    """client/swiglu_kernel.py vs the torch formulas: h over dh, dL/de over e, dL/dg over g."""
    from client.fused_lora import _silu_mul_backward_torch
    from client.swiglu_kernel import swiglu_backward_with_h

    gen = torch.Generator(device="cuda").manual_seed(0)
    e, g, dh = (torch.randn(37, 1000, device="cuda", generator=gen).to(dtype) for _ in range(3))
    expected = _silu_mul_backward_torch(e.float(), g.float(), dh.float())
    pointers = [t.data_ptr() for t in (dh, e, g)]
    got = swiglu_backward_with_h(e, g, dh)
    assert [t.data_ptr() for t in got] == pointers
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for value, want in zip(got, expected):
        assert _rel_err(value, want) < tolerance


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scaled_mm_is_matmul_then_multiply_bit_for_bit_at_power_of_two_scales(dtype):
    from client.fused_lora import _scaled_mm

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 64, generator=gen).to(dtype), torch.randn(64, 8, generator=gen).to(dtype)
    for scale in (2.0, 0.5, 1.0, 4.0):  # alpha / r of the usual LoRA settings
        got = _scaled_mm(a, b, scale)
        assert got.dtype == dtype and got.shape == (37, 8)
        assert torch.equal(got, (a @ b) * scale), scale
    # Any other scale: applied before the rounding instead of after, so within one rounding of the product.
    other = _scaled_mm(a, b, 2.0 / 3.0)
    assert torch.allclose(other.float(), (a.double() @ b.double() * (2.0 / 3.0)).float(),
                          rtol=2 * torch.finfo(dtype).eps, atol=1e-3 if dtype == torch.bfloat16 else 1e-5)


def test_addmm_ignores_its_input_at_beta_zero():
    """What _scaled_mm relies on (torch's documented addmm contract): an uninitialised input is never read."""
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    garbage = torch.full((1, 1), float("nan"))
    assert torch.equal(torch.addmm(garbage, a, b, beta=0, alpha=2.0), (a @ b) * 2.0)
