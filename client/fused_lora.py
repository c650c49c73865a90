"""LoRA linear layers whose update is added into the base layer's output by one in-place addmm (fast trainer).

PEFT's forward of a LoRA linear (peft/tuners/lora/layer.py Linear, bnb.py Linear4bit) adds the LoRA term out of
place: it clones the 4-bit base output, writes B's (tokens, out) output, multiplies it by the scaling into
another (tokens, out) tensor and adds that into a third; its backward multiplies the (tokens, out) gradient by the
scaling once more. The fused forward (as Unsloth's fast_lora) computes

    result = base(x)                                       # bnb's own 4-bit matmul, or nn.Linear
    result.addmm_(x @ A^T, B^T, alpha=scaling)             # in place: reads and writes result once

and the backward applies the scaling to the small (tokens, r) and (r, out) gradients only. Where the base is an
nn.Linear or a bitsandbytes 4-bit layer this runs as one autograd function (_LoRALinear) whose backward also
writes the input gradient once (dy W, then the LoRA part added by addmm) instead of autograd's separate base and
LoRA input gradients and their sum. Otherwise base(x) then the in-place addmm: allowed because no base layer
saves its output for backward (bnb's MatMul4Bit keeps only the quantized weight); the base runs on 2-D input so
its output is not a view (autograd forbids in-place changes to a view made inside a custom Function, the reason
PEFT's 4-bit forward clones).

fused_base_forward runs the base layer alone the same way (_FrozenLinear: dequantized again in backward, nothing
dense kept) for the multi-adapter trainer, which adds its stacked LoRA term itself.

Only where it is exact: one active adapter, LoRA dropout 0, no DoRA or other variant, no LoRA bias, not merged,
no hooks on the LoRA modules (Opacus's per-example gradients hook them), no extra forward arguments; any other
call runs PEFT's own forward. Equal to PEFT's forward up to rounding (tests/client/test_fused_lora.py).
"""

from __future__ import annotations

import functools
import importlib.util
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


def dense_weight(base_layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight (out, in) in dtype: dequantized for a bitsandbytes 4-bit layer.

    By the layer's one-kernel NF4 dequantize where use_nf4_kernel gave it one, else by PEFT's helper
    (bitsandbytes' dequantize_4bit).
    """
    weight = base_layer.weight
    if type(weight).__name__ == "Params4bit":
        dequantize = base_layer.__dict__.get(NF4_KERNEL_ATTRIBUTE)
        if dequantize is not None:
            return dequantize(weight).to(dtype)
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight).to(dtype)
    return weight.to(dtype)


# The instance attribute of a bitsandbytes 4-bit layer holding its one-kernel dequantize (use_nf4_kernel).
NF4_KERNEL_ATTRIBUTE = "fedtune_dequantize"


def use_nf4_kernel(model: nn.Module, enabled: bool) -> int:
    """Let dense_weight dequantize model's NF4 layers with client/nf4_kernel.py (enabled, CUDA with Triton) or not.

    Only the fused functions call dense_weight; bitsandbytes' own 4-bit matmul (unfused layers) is untouched.
    Returns how many layers use the kernel afterwards; idempotent.
    """
    # Modules owning a 4-bit weight (bitsandbytes' Linear4bit), not PEFT's wrappers that only expose theirs.
    layers = [m for m in model.modules() if type(m._parameters.get("weight")).__name__ == "Params4bit"]
    for layer in layers:
        layer.__dict__.pop(NF4_KERNEL_ATTRIBUTE, None)
    if not enabled or not layers or importlib.util.find_spec("triton") is None:
        return 0
    if not any(layer.weight.device.type == "cuda" for layer in layers):
        return 0
    from client.nf4_kernel import dequantize_nf4, nf4_kernel_supports

    count = 0
    for layer in layers:
        if nf4_kernel_supports(layer.weight):
            layer.__dict__[NF4_KERNEL_ATTRIBUTE] = dequantize_nf4
            count += 1
    return count


def _base_project(inputs: torch.Tensor, base: nn.Module, dtype: torch.dtype, bias: bool = True) -> torch.Tensor:
    """inputs W^T (+ the base's bias) (N, out) for inputs (N, in) in dtype; the dense W is freed on return."""
    return F.linear(inputs, dense_weight(base, dtype), base.bias.to(dtype) if bias and base.bias is not None else None)


def _base_input_grad(dy: torch.Tensor, base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """dy W (N, in) for dy (N, out) in dtype: W dequantized again (none kept since forward), freed on return."""
    return dy @ dense_weight(base, dtype)


def _lora_project(inputs: torch.Tensor, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float,
                  dtype: torch.dtype, bias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs W^T (+ bias) + s (inputs A^T) B^T (N, out), inputs A^T (N, r)); inputs, a (r, in), b (out, r) in dtype."""
    out = _base_project(inputs, base, dtype, bias)  # its dequantized W is freed before the next one is made
    down = F.linear(inputs, a)
    out.addmm_(down, b.t(), alpha=scaling)
    return out, down


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (a @ b) for a (n, k), b (k, m) by one GEMM whose alpha is scale (beta 0: the input is never read).

    One kernel instead of a matmul and a multiply: two launches fewer per LoRA projection in backward (224 a
    llama-1b step, whose launches are what its CPU-bound step waits for). Bit-identical to (a @ b) * scale when
    scale is a power of two (LoRA's usual alpha = 2 r); otherwise scale is applied before the one rounding to the
    output dtype instead of after it.
    """
    ignored = a.new_empty((1, 1))  # broadcast (a view), never read with beta=0: no fill kernel
    return torch.addmm(ignored, a, b, beta=0, alpha=scale)


def _lora_output_grads(dy: torch.Tensor, down: torch.Tensor, b: torch.Tensor,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/d(inputs A^T) (N, r), dL/dB (out, r)) of _lora_project given dL/dout dy (N, out)."""
    return _scaled_mm(dy, b, scaling), _scaled_mm(dy.t(), down, scaling)


# ------------------------------------------------------------- compute-dtype copies of the LoRA weights
#
# The fused functions compute in bf16 while A and B stay fp32 for the optimizer. Casting each weight in each
# forward is two tiny kernels per layer (224 at llama-1b all-linear), each a Python dispatch that the GPU waits for
# where the step is CPU-bound (the profile's idle time before "bfloat16_copy": ~6 ms of a 210 ms llama-1b step).
# LoRACopies keeps one compute-dtype copy per weight and refreshes all of them with one multi-tensor copy once any
# weight has changed: the optimizer's in-place step and loading an adapter (param.copy_) both bump the weight's
# version counter; a replaced .data (model.to) changes its data pointer.


class LoRACopies:
    """Compute-dtype copies of a model's LoRA weights, refreshed together by one multi-tensor copy when stale."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.slot = {id(p): i for i, p in enumerate(params)}
        self.copies: list[torch.Tensor] = []
        self.stamps: list[tuple[int, int]] = []  # (version, data pointer) of each weight when copied
        self.dtype: torch.dtype | None = None
        self.refreshes = 0

    def get(self, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """param in dtype: its up-to-date copy (refreshing all copies if it changed), or a cast if not registered."""
        if param.dtype == dtype:
            return param
        i = self.slot.get(id(param))
        if i is None or self.params[i] is not param:
            return param.to(dtype)
        if dtype != self.dtype or self.stamps[i] != (param._version, param.data_ptr()):
            self.refresh(dtype)
        return self.copies[i]

    @torch.no_grad()
    def refresh(self, dtype: torch.dtype) -> None:
        """Copy every weight into its dtype copy (one multi-tensor kernel where shapes and devices allow)."""
        # Allocated outside inference mode: an inference tensor could not be updated by a later training step.
        with torch.inference_mode(False):
            if (dtype != self.dtype or len(self.copies) != len(self.params)
                    or any(c.shape != p.shape or c.device != p.device for c, p in zip(self.copies, self.params))):
                self.copies = [torch.empty_like(p, dtype=dtype) for p in self.params]
                self.dtype = dtype
            torch._foreach_copy_(self.copies, [p.detach() for p in self.params])
        self.stamps = [(p._version, p.data_ptr()) for p in self.params]
        self.refreshes += 1


# The attribute of every fused LoRA layer holding its model's LoRACopies (use_fused_lora).
LORA_COPIES_ATTRIBUTE = "_fedtune_lora_copies"


def _compute_copy(layer: nn.Module, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    copies = layer.__dict__.get(LORA_COPIES_ATTRIBUTE)
    return copies.get(param, dtype) if copies is not None else param.to(dtype)


class _FrozenLinear(torch.autograd.Function):
    """x W^T (+ bias) of a frozen base layer alone; backward dy W, W dequantized again by dense_weight.

    As bitsandbytes' MatMul4Bit (which keeps only the quantized weight), but through dense_weight: the one-kernel
    NF4 dequantize where use_nf4_kernel enabled it. Saves no tensor (no weight gradient, so not even x).
    x (N, in); base: the nn.Linear or 4-bit layer (frozen, _dense_base); dtype of both matmuls.
    """

    @staticmethod
    def forward(ctx, x, base, dtype):  # noqa: D102
        ctx.base, ctx.dtype, ctx.x_dtype = base, dtype, x.dtype
        return _base_project(x.to(dtype), base, dtype)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        return _base_input_grad(dy.to(ctx.dtype), ctx.base, ctx.dtype).to(ctx.x_dtype), None, None


class _LoRALinear(torch.autograd.Function):
    """x W^T (+ bias) + s (x A^T) B^T whose backward writes dL/dx once: dy W, then (s dy B) A added by addmm.

    Autograd over the module-by-module forward computes the base's and the LoRA path's input gradients apart
    and adds them with one more (tokens, in) pass per layer (4 per decoder layer on q/k/v/o); this keeps x and
    x A^T (N, r) as autograd would and dequantizes W again in backward, as bitsandbytes' own 4-bit matmul does.
    x (N, in), A (r, in), B (out, r) as parameters and as their dtype copies a, b; base: the nn.Linear or 4-bit
    layer (frozen); dtype of every matmul.
    """

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, a, b, base, scaling, dtype):  # noqa: D102
        xc = x.to(dtype)  # a, b: weight_a, weight_b in dtype (LoRACopies), kept for backward: tiny
        out, down = _lora_project(xc, base, a, b, scaling, dtype, bias=True)
        ctx.save_for_backward(xc, down, a, b)
        ctx.base, ctx.scaling, ctx.dtype, ctx.x_dtype = base, scaling, dtype, x.dtype
        ctx.param_dtypes = (weight_a.dtype, weight_b.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        xc, down, a, b = ctx.saved_tensors
        dtype, scaling = ctx.dtype, ctx.scaling
        a_dtype, b_dtype = ctx.param_dtypes
        dy = dy.to(dtype)
        d_down, grad_b = _lora_output_grads(dy, down, b, scaling)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _base_input_grad(dy, ctx.base, dtype).addmm_(d_down, a).to(ctx.x_dtype)
        grad_a = (d_down.t() @ xc).to(a_dtype) if ctx.needs_input_grad[1] else None
        grad_b = grad_b.to(b_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_a, grad_b, None, None, None, None, None


def _dense_base(base_layer: nn.Module) -> bool:
    """A frozen base layer dense_weight reads as (out, in): nn.Linear or bitsandbytes 4-bit, bias frozen or none.

    The fused functions return no gradient for the base's weight and bias, so a trainable one is not fused.
    """
    kind = type(base_layer)
    if not (kind is nn.Linear or (kind.__name__ == "Linear4bit" and type(base_layer.weight).__name__ == "Params4bit")):
        return False
    return not base_layer.weight.requires_grad and (base_layer.bias is None or not base_layer.bias.requires_grad)


def _exact_dtype(x: torch.Tensor, bases: list[nn.Module],
                 lora_weights: list[torch.Tensor] = ()) -> torch.dtype | None:
    """The dtype a fused function computes in where it is exact for these base layers and LoRA weights, else None.

    Under autocast: its dtype, as every matmul of PEFT's forward. Without it PEFT computes the LoRA term in the
    adapter's dtype and adds it in the base's: exact only when they are all x's dtype.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    dtypes = {x.dtype} | {weight.dtype for weight in lora_weights}
    dtypes |= {getattr(base, "compute_dtype", None) or base.weight.dtype for base in bases}
    return x.dtype if len(dtypes) == 1 else None


def fused_lora_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """base(x) + scaling * (x A^T) B^T with the LoRA term added in place by one addmm; PEFT's forward where unsafe.

    Where the base is dense or 4-bit and the dtypes allow (_exact_dtype), one autograd function (_LoRALinear)
    that also writes the input gradient once; otherwise base(x) then the in-place addmm.
    """
    name = None if args or kwargs else fused_adapter(layer)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    weight_a, weight_b = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in), (out, r)
    scaling = layer.scaling[name]
    rows = x.reshape(-1, x.shape[-1])
    dtype = _exact_dtype(x, [layer.base_layer], [weight_a]) if _dense_base(layer.base_layer) else None
    if dtype is not None:
        a, b = _compute_copy(layer, weight_a, dtype), _compute_copy(layer, weight_b, dtype)
        result = _LoRALinear.apply(rows, weight_a, weight_b, a, b, layer.base_layer, scaling, dtype)
        return result.reshape(*x.shape[:-1], result.shape[-1])
    result = layer.base_layer(rows)
    # As PEFT: the LoRA matmuls in the adapter's dtype, unless autocast picks the compute dtype.
    lora_in = rows if torch.is_autocast_enabled(x.device.type) else rows.to(weight_a.dtype)
    down = F.linear(lora_in, weight_a)  # (tokens, r)
    if result.dtype == down.dtype and result._base is None:
        result.addmm_(down, weight_b.t().to(down.dtype), alpha=scaling)
    else:  # base output in another dtype (no autocast, bf16 base, fp32 adapter) or a view: PEFT's sum
        result = result + (F.linear(down, weight_b) * scaling).to(result.dtype)
    return result.reshape(*x.shape[:-1], result.shape[-1])


def fused_base_forward(base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base_layer(x) (x (..., in)) through _FrozenLinear where that is exact, else base_layer(x) itself.

    For callers that add their own LoRA term (client/multi_adapter.py's stacked adapters). Exact for a frozen
    dense or 4-bit base without hooks, with x already in the compute dtype: then the base's own forward returns
    that dtype too (bitsandbytes casts its output back to x's dtype) and its backward computes dy W in it.
    """
    if not _dense_base(base_layer) or _hooked(base_layer) or _exact_dtype(x, [base_layer]) != x.dtype:
        return base_layer(x)
    result = _FrozenLinear.apply(x.reshape(-1, x.shape[-1]), base_layer, x.dtype)
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
    count, fused = 0, []
    for module in model.modules():
        if type(module) not in fusable:
            continue
        if enabled and "forward" not in module.__dict__:
            module.forward = partial(fused_lora_forward, module)  # an instance attribute shadows the class's
        elif not enabled and is_fused(module):
            del module.forward
        module.__dict__.pop(LORA_COPIES_ATTRIBUTE, None)
        if is_fused(module):
            fused.append(module)
        count += is_fused(module)
    # One LoRACopies for the model: a training step's forward then refreshes every layer's copies at once.
    copies = LoRACopies([m.lora_A[n].weight for m in fused for n in m.lora_A]
                        + [m.lora_B[n].weight for m in fused for n in m.lora_B])
    for module in fused:
        module.__dict__[LORA_COPIES_ATTRIBUTE] = copies
    return count


# ------------------------------------------------------------------------------------ fused LoRA SwiGLU MLP
#
# A SwiGLU MLP (Llama's: down(silu(gate(x)) * up(x))) whose three projections are LoRA layers keeps, through
# autograd, x, gate's and up's outputs e and g (tokens, intermediate) for the activation's backward, and h =
# silu(e) * g (tokens, intermediate) once more for down's lora_A gradient. One autograd function for the whole
# MLP (as Unsloth's LoRA_MLP) saves x, e and g only and recomputes h in backward from e and g: one
# (tokens, intermediate) tensor less per layer (235 MB per layer at llama-8b with 8,192 tokens), for one extra
# elementwise pass in backward. Same gradients as the module-by-module path (tests/client/test_fused_lora.py).


def _silu_mul_torch(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """h = silu(e) * g, (..., I) each, in their dtype (transformers' LlamaMLP computes it the same way)."""
    return F.silu(e) * g


def _silu_mul_backward_torch(e: torch.Tensor, g: torch.Tensor,
                             dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h = silu(e) * g, dL/de, dL/dg) given dL/dh, each (..., I)."""
    sig = torch.sigmoid(e)
    silu = e * sig
    return silu * g, dh * g * sig * (1 + e * (1 - sig)), dh * silu


@functools.cache
def _silu_mul_ops_for(device_type: str):
    """_silu_mul_ops by device type, decided once per process (it runs on every MLP forward and backward)."""
    if device_type != "cuda" or importlib.util.find_spec("triton") is None:
        return _silu_mul_torch, _silu_mul_backward_torch
    from client.swiglu_kernel import swiglu_backward_with_h

    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.ops.swiglu import swiglu_forward

        return (lambda e, g: swiglu_forward(e, g)[2]), swiglu_backward_with_h
    return _silu_mul_torch, swiglu_backward_with_h


def _silu_mul_ops(device: torch.device):
    """(forward, backward) of silu(e) * g: Triton kernels on CUDA where installed, else torch's.

    The backward returns (h, dL/de, dL/dg); client/swiglu_kernel.py's writes them into dL/dh's, e's and g's
    buffers (no new (tokens, I) tensor). The forward is Liger's SwiGLU kernel where Liger is installed (fp32
    sigmoid, as its own SwiGLU module).
    """
    return _silu_mul_ops_for(device.type)


class _LoRASwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) for LoRA projections p(x) = x W^T + s (x A^T) B^T; saves x, e, g (not h).

    x (N, d); A (r, in) and B (out, r) of gate, up, down in that order, and copies: the six in dtype (LoRACopies);
    bases: the three base layers; scalings their s; dtype the compute dtype of every matmul. Frozen W's are
    dequantized again in backward, as bitsandbytes' own 4-bit matmul does.
    """

    @staticmethod
    def forward(ctx, x, a_gate, b_gate, a_up, b_up, a_down, b_down, copies, bases, scalings, dtype):  # noqa: D102
        silu_mul, _ = _silu_mul_ops(x.device)
        xc = x.to(dtype)
        loras = [copies[i:i + 2] for i in (0, 2, 4)]  # the six weights in dtype (LoRACopies)
        e, down_gate = _lora_project(xc, bases[0], *loras[0], scalings[0], dtype)  # (N, I), (N, r)
        g, down_up = _lora_project(xc, bases[1], *loras[1], scalings[1], dtype)
        y, down_down = _lora_project(silu_mul(e, g), bases[2], *loras[2], scalings[2], dtype)  # h freed here
        # The compute-dtype copies of A and B are kept (tiny) so backward casts nothing again.
        ctx.save_for_backward(xc, e, g, down_gate, down_up, down_down, *(w for pair in loras for w in pair))
        ctx.bases, ctx.scalings, ctx.dtype, ctx.x_dtype = bases, scalings, dtype, x.dtype
        ctx.param_dtypes = tuple(w.dtype for w in (a_gate, b_gate, a_up, b_up, a_down, b_down))
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        xc, e, g, down_gate, down_up, down_down, a_gate, b_gate, a_up, b_up, a_down, b_down = ctx.saved_tensors
        dtype, bases, (s_gate, s_up, s_down) = ctx.dtype, ctx.bases, ctx.scalings
        _, silu_mul_backward = _silu_mul_ops(dy.device)
        dy = dy.reshape(-1, dy.shape[-1]).to(dtype)  # (N, d)
        # down: y = h Wd^T + s (h Ad^T) Bd^T
        d_down_down, grad_b_down = _lora_output_grads(dy, down_down, b_down, s_down)  # (N, r), (d, r)
        dh = _base_input_grad(dy, bases[2], dtype)  # (N, I)
        dh.addmm_(d_down_down, a_down)
        # h recomputed instead of saved; the CUDA kernel writes h, dL/de, dL/dg over dh, e, g (not read again)
        h, de, dg = silu_mul_backward(e, g, dh)
        del dh
        grad_a_down = d_down_down.t() @ h  # (r, I)
        del h
        # gate and up: e = x Wg^T + s (x Ag^T) Bg^T, g likewise
        d_down_gate, grad_b_gate = _lora_output_grads(de, down_gate, b_gate, s_gate)
        d_down_up, grad_b_up = _lora_output_grads(dg, down_up, b_up, s_up)
        dx = _base_input_grad(de, bases[0], dtype)  # (N, d)
        del de
        weight = dense_weight(bases[1], dtype)
        dx.addmm_(dg, weight)
        del weight, dg
        dx.addmm_(d_down_gate, a_gate).addmm_(d_down_up, a_up)
        grad_a_gate = d_down_gate.t() @ xc
        grad_a_up = d_down_up.t() @ xc
        grads = (grad_a_gate, grad_b_gate, grad_a_up, grad_b_up, grad_a_down, grad_b_down)
        return (dx.to(ctx.x_dtype), *(grad.to(d) for grad, d in zip(grads, ctx.param_dtypes)), None, None, None, None)


_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def fusable_mlp(mlp: nn.Module) -> bool:
    """True for a SwiGLU MLP (gate_proj, up_proj, down_proj, SiLU act_fn) whose projections are all LoRA layers."""
    fusable = _fusable_layer_types()
    # Children of this module itself: wrappers (PeftModel, LoraModel) forward attribute lookups to the model.
    children = mlp._modules
    return (all(type(children.get(name)) in fusable for name in _MLP_PROJECTIONS)
            and _is_silu(children.get("act_fn")))


def _fused_mlp_inputs(mlp: nn.Module, x: torch.Tensor):
    """(adapter names, compute dtype) when the fused MLP is exact for this call now, else None."""
    projections = [getattr(mlp, name) for name in _MLP_PROJECTIONS]
    # Each projection must run the fused LoRA forward now: not while another owner (multi-adapter stacking)
    # replaced it, not for a layer fused_adapter refuses (dropout, DoRA, hooks, several adapters, ...).
    if not all(is_fused(p) for p in projections):
        return None
    names = [fused_adapter(p) for p in projections]
    if None in names or any(p.base_layer.bias is not None for p in projections) or _hooked(mlp):
        return None
    if not all(_dense_base(p.base_layer) for p in projections):
        return None
    lora_a = [p.lora_A[n].weight for p, n in zip(projections, names)]
    dtype = _exact_dtype(x, [p.base_layer for p in projections], lora_a)
    return None if dtype is None else (names, dtype)


def fused_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP through _LoRASwiGLU where exact (x (..., d) -> (..., d)); the forward it had before otherwise."""
    found = _fused_mlp_inputs(mlp, x)
    if found is None:
        previous = mlp.__dict__.get("_fedtune_unfused_forward")
        return previous(x) if previous is not None else type(mlp).forward(mlp, x)
    names, dtype = found
    projections = [getattr(mlp, name) for name in _MLP_PROJECTIONS]
    loras = [w for p, n in zip(projections, names) for w in (p.lora_A[n].weight, p.lora_B[n].weight)]
    copies = tuple(_compute_copy(projections[i // 2], weight, dtype) for i, weight in enumerate(loras))
    y = _LoRASwiGLU.apply(x.reshape(-1, x.shape[-1]), *loras, copies, tuple(p.base_layer for p in projections),
                          tuple(p.scaling[n] for p, n in zip(projections, names)), dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def is_fused_mlp(mlp: nn.Module) -> bool:
    """True when the MLP's forward is fused_mlp_forward (an instance attribute set by use_fused_mlp)."""
    forward = mlp.__dict__.get("forward")
    return isinstance(forward, partial) and forward.func is fused_mlp_forward


def use_fused_mlp(model: nn.Module, enabled: bool) -> int:
    """Give every fusable SwiGLU MLP of model the fused forward (enabled) or its previous one back; idempotent.

    The forward the MLP had (its class's, or a kernel set's instance forward such as Liger's SwiGLU) is kept and
    runs whenever the fused one is not exact. Returns how many MLPs have the fused forward afterwards.
    """
    count = 0
    for module in model.modules():
        if enabled and not is_fused_mlp(module) and fusable_mlp(module):
            module._fedtune_unfused_forward = module.__dict__.get("forward")
            module.forward = partial(fused_mlp_forward, module)
        elif not enabled and is_fused_mlp(module):
            previous = module.__dict__.pop("_fedtune_unfused_forward", None)
            del module.forward
            if previous is not None:
                module.forward = previous
        count += is_fused_mlp(module)
    return count
