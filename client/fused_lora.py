"""LoRA linear layers whose update is added into the base layer's output by one in-place addmm (fast trainer).

PEFT's forward of a LoRA linear (peft/tuners/lora/layer.py Linear, bnb.py Linear4bit) adds the LoRA term out of
place: it clones the 4-bit base output, writes B's (tokens, out) output, multiplies it by the scaling into
another (tokens, out) tensor and adds that into a third; its backward multiplies the (tokens, out) gradient by the
scaling once more. The fused forward (as Unsloth's fast_lora) computes

    result = base(x)                                       # bnb's own 4-bit matmul, or nn.Linear
    result.addmm_(x @ A^T, B^T, alpha=scaling)             # in place: reads and writes result once

and autograd's addmm backward applies the scaling to the small (tokens, r) and (r, out) gradients only. The
in-place add is allowed because no base layer saves its output for backward (bnb's MatMul4Bit keeps only the
quantized weight); the base runs on 2-D input so its output is not a view (autograd forbids in-place changes to
a view made inside a custom Function, the reason PEFT's 4-bit forward clones).

Only where it is exact: one active adapter, LoRA dropout 0, no DoRA or other variant, no LoRA bias, not merged,
no hooks on the LoRA modules (Opacus's per-example gradients hook them), no extra forward arguments; any other
call runs PEFT's own forward. Equal to PEFT's forward up to rounding (tests/client/test_fused_lora.py).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def _fusable_layer_types() -> tuple[type, ...]:
    """PEFT's LoRA linear layer types whose forward the fused one reproduces: plain and bitsandbytes 4-bit."""
    from peft.tuners.lora import bnb as lora_bnb
    from peft.tuners.lora.layer import Linear

    # peft defines its bnb Linear4bit only where bitsandbytes' 4-bit support imports.
    return (Linear, lora_bnb.Linear4bit) if hasattr(lora_bnb, "Linear4bit") else (Linear,)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def fused_adapter(layer: nn.Module) -> str | None:
    """The adapter the fused forward runs for this LoRA layer now, or None when only PEFT's forward is exact."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.use_dora.get(name, False):
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if (not isinstance(layer.lora_dropout[name], nn.Identity) or lora_a.bias is not None or lora_b.bias is not None
            or not getattr(layer, "cast_input_dtype_enabled", True) or _hooked(lora_a) or _hooked(lora_b)):
        return None
    return name


def fused_lora_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """base(x) + scaling * (x A^T) B^T with the LoRA term added in place by one addmm; PEFT's forward where unsafe."""
    name = None if args or kwargs else fused_adapter(layer)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    weight_a, weight_b = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in), (out, r)
    scaling = layer.scaling[name]
    rows = x.reshape(-1, x.shape[-1])
    result = layer.base_layer(rows)
    # As PEFT: the LoRA matmuls in the adapter's dtype, unless autocast picks the compute dtype.
    lora_in = rows if torch.is_autocast_enabled(x.device.type) else rows.to(weight_a.dtype)
    down = F.linear(lora_in, weight_a)  # (tokens, r)
    if result.dtype == down.dtype and result._base is None:
        result.addmm_(down, weight_b.t().to(down.dtype), alpha=scaling)
    else:  # base output in another dtype (no autocast, bf16 base, fp32 adapter) or a view: PEFT's sum
        result = result + (F.linear(down, weight_b) * scaling).to(result.dtype)
    return result.reshape(*x.shape[:-1], result.shape[-1])


def is_fused(layer: nn.Module) -> bool:
    """True when the layer's forward is the fused one (an instance attribute set by use_fused_lora)."""
    forward = layer.__dict__.get("forward")
    return isinstance(forward, partial) and forward.func is fused_lora_forward


def use_fused_lora(model: nn.Module, enabled: bool) -> int:
    """Give every PEFT LoRA linear layer of model the fused forward (enabled) or PEFT's back; idempotent.

    A layer whose forward another owner replaced (client/multi_adapter.StackedLoRA while it is active) is left
    alone. Returns how many layers have the fused forward afterwards.
    """
    fusable = _fusable_layer_types()
    count = 0
    for module in model.modules():
        if type(module) not in fusable:
            continue
        if enabled and "forward" not in module.__dict__:
            module.forward = partial(fused_lora_forward, module)  # an instance attribute shadows the class's
        elif not enabled and is_fused(module):
            del module.forward
        count += is_fused(module)
    return count
