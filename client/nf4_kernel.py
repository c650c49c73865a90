"""A bitsandbytes NF4 weight dequantized by one Triton kernel (client/fused_lora.py dense_weight), CUDA only.

bitsandbytes' dequantize_4bit of a double-quantized weight (QLoRA's default) is three kernels behind three
torch.library custom-op calls: the 8-bit absmax codes to fp32 (kDequantizeBlockwise<float>), `absmax += offset`,
then the 4-bit values (kDequantizeBlockwise<bf16, NF4>). The fused LoRA functions dequantize every base weight
two or three times a step; on the H200 (BENCHMARKS.md, 2026-12-04 evening) that dispatch cost ~23 ms of CPU per
llama-1b step while the GPU waited for it, and the kernels took 19.5 ms per llama-8b step against 11.4 for
Unsloth's own Triton dequantize. This kernel reads the packed bytes and the absmax codes once and does the same
fp32 operations in the same order (code2[q] * absmax2, + offset, NF4 value * absmax, rounded to the output dtype,
with no FMA contraction), so its output is bit-identical to bitsandbytes' (tests/client/test_nf4_kernel.py).
Hand-written because no maintained library has it apart from Unsloth, which patches transformers when imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Packed bytes per program (two weights each): a multiple of the 128-thread warp group.
BYTES_PER_PROGRAM = 1024


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, nf4_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
                           n_bytes, n_elements, HALF_BLOCK: tl.constexpr, BLOCK2: tl.constexpr,
                           NESTED: tl.constexpr, BYTES: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    in_range = byte < n_bytes
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    block = byte // HALF_BLOCK  # a byte's two weights lie in one quantization block
    if NESTED:
        code = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + code) * tl.load(absmax2_ptr + block // BLOCK2, mask=in_range, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    high = tl.load(nf4_ptr + (packed >> 4)) * scale
    low = tl.load(nf4_ptr + (packed & 15)) * scale
    values = tl.interleave(high, low)  # weight 2k is byte k's high nibble, 2k+1 its low one
    index = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < n_elements)


def nf4_kernel_supports(weight: torch.Tensor) -> bool:
    """True for a CUDA Params4bit whose NF4 layout the kernel reads (uint8 storage, even block size)."""
    state = getattr(weight, "quant_state", None)
    return (weight.device.type == "cuda" and state is not None and state.quant_type == "nf4"
            and weight.data.dtype == torch.uint8 and weight.data.is_contiguous() and state.blocksize % 2 == 0
            and state.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and (not state.nested or state.state2.absmax.dtype == torch.float32))


def dequantize_nf4(weight: torch.Tensor) -> torch.Tensor:
    """The dense weight (quant_state.shape, quant_state.dtype) of an NF4 Params4bit (see nf4_kernel_supports)."""
    state = weight.quant_state
    out = torch.empty(state.shape, dtype=state.dtype, device=weight.device)
    n_bytes = (out.numel() + 1) // 2
    if state.nested:
        inner = state.state2
        tables = (state.absmax, inner.code, inner.absmax, state.offset.reshape(1))
        block2 = inner.blocksize
    else:  # code2, absmax2 and offset are not read: any pointer will do
        tables = (state.absmax, state.absmax, state.absmax, state.absmax)
        block2 = 1
    grid = (triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)
    _nf4_dequantize_kernel[grid](weight.data, state.code, *tables, out, n_bytes, out.numel(),
                                 HALF_BLOCK=state.blocksize // 2, BLOCK2=block2, NESTED=state.nested,
                                 BYTES=BYTES_PER_PROGRAM, enable_fp_fusion=False)
    return out
