"""The one-kernel NF4 dequantize (client/nf4_kernel.py) is bitsandbytes' dequantize_4bit, bit for bit.

On the CPU: the layout and arithmetic the kernel encodes (high nibble first, one absmax per block, the nested
absmax as code2[q] * absmax2 + offset, products in fp32, then rounded) written out in torch reproduce
bitsandbytes' own dequantize exactly, and the kernel is never chosen off CUDA. On CUDA: the kernel itself
against bitsandbytes, and a fused LoRA layer with and without it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from client.fused_lora import NF4_KERNEL_ATTRIBUTE, dense_weight, use_fused_lora, use_nf4_kernel

bnb = pytest.importorskip("bitsandbytes")
CUDA_TRITON = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def _dequantize_written_out(packed: torch.Tensor, state) -> torch.Tensor:
    """What the kernel computes, in torch: (quant_state.shape) in quant_state.dtype."""
    data = packed.reshape(-1).to(torch.int64)
    codes = torch.stack([data >> 4, data & 15], dim=1).reshape(-1)  # weight 2k: byte k's high nibble
    if state.nested:
        inner = state.state2
        blocks = torch.arange(state.absmax.numel(), device=packed.device)
        scale = inner.code[state.absmax.to(torch.int64)] * inner.absmax[blocks // inner.blocksize]
        scale = scale + state.offset
    else:
        scale = state.absmax
    n = torch.Size(state.shape).numel()
    block = torch.arange(codes.numel(), device=packed.device) // state.blocksize
    values = state.code[codes] * scale[block]
    return values[:n].to(state.dtype).reshape(state.shape)


def _params4bit(shape, dtype, blocksize, nested, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(shape) + blocksize)
    dense = (torch.randn(*shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 3).to(dtype)
    weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", blocksize=blocksize,
                               compress_statistics=nested)
    return weight.to(device)  # quantizes


CASES = [((96, 256), torch.bfloat16, 64, True), ((96, 256), torch.bfloat16, 64, False),
         ((40, 300), torch.float16, 128, True), ((33, 70), torch.float32, 64, True)]


@pytest.mark.parametrize("shape,dtype,blocksize,nested", CASES)
def test_the_kernels_arithmetic_written_out_is_bitsandbytes_dequantize(shape, dtype, blocksize, nested):
    weight = _params4bit(shape, dtype, blocksize, nested, "cpu")
    expected = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    got = _dequantize_written_out(weight.data, weight.quant_state)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


def test_the_kernel_is_not_chosen_off_cuda_and_dense_weight_uses_bitsandbytes():
    base = bnb.nn.Linear4bit(256, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = _params4bit((96, 256), torch.bfloat16, 64, True, "cpu")
    model = nn.Sequential(base)
    assert use_nf4_kernel(model, True) == 0
    assert NF4_KERNEL_ATTRIBUTE not in base.__dict__
    expected = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    assert torch.equal(dense_weight(base, torch.bfloat16), expected)


@pytest.mark.skipif(not CUDA_TRITON, reason="needs CUDA and Triton")
@pytest.mark.parametrize("shape,dtype,blocksize,nested", CASES + [((4096, 1024), torch.bfloat16, 64, True)])
def test_cuda_nf4_kernel_is_bitsandbytes_dequantize_bit_for_bit(shape, dtype, blocksize, nested):
    from client.nf4_kernel import dequantize_nf4, nf4_kernel_supports

    weight = _params4bit(shape, dtype, blocksize, nested, "cuda")
    assert nf4_kernel_supports(weight)
    expected = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    got = dequantize_nf4(weight)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.skipif(not CUDA_TRITON, reason="needs CUDA and Triton")
def test_cuda_fused_lora_layer_with_the_kernel_matches_it_without_bit_for_bit():
    from peft import LoraConfig
    from peft.tuners.lora import bnb as lora_bnb

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(256, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(96, 256) / 16, requires_grad=False, quant_type="nf4")
    layer = lora_bnb.Linear4bit(base.to("cuda"), "default", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
                                r=4, lora_alpha=8).to("cuda")
    model = nn.Sequential(layer)
    assert use_fused_lora(model, True) == 1
    x = torch.randn(3, 17, 256, device="cuda")
    results = []
    for enabled in (False, True):
        assert use_nf4_kernel(model, enabled) == int(enabled)
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(xi)
        out.float().square().sum().backward()
        results.append((out.detach(), xi.grad, layer.lora_A["default"].weight.grad))
    for without, with_kernel in zip(*results):
        assert torch.equal(without, with_kernel)
