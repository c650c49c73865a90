"""One Triton kernel for the fused LoRA SwiGLU MLP's backward (client/fused_lora.py _LoRASwiGLU), CUDA only.

From dL/dh and the saved e (gate output) and g (up output) it writes, in place and in one pass over the three
(tokens, intermediate) tensors, h = silu(e) * g into dL/dh's buffer (down's lora_A gradient needs h), dL/de into
e's and dL/dg into g's. The unfused order needs h in a fresh (tokens, intermediate) tensor next to dL/dh (235 MB
at llama-8b with 8,192 tokens, at the backward's peak) and two kernels. Hand-written because no maintained
library has it: Liger's swiglu_backward writes the two gradients but not h, and Unsloth's equivalent
(swiglu_DWf_DW_dfg_kernel) comes with Unsloth, which patches transformers when imported.
Imported only where Triton and CUDA are (fused_lora._silu_mul_ops); the math is _silu_mul_backward_torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program: a multiple of the 128-thread warp group, small enough for any intermediate size.
BLOCK_SIZE = 1024


@triton.jit
def _swiglu_backward_with_h_kernel(dh_ptr, e_ptr, g_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0).to(tl.float32)
    e = tl.load(e_ptr + offsets, mask=mask, other=0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0).to(tl.float32)
    sig = tl.sigmoid(e)
    silu = e * sig
    tl.store(dh_ptr + offsets, (silu * g).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(e_ptr + offsets, (dh * g * sig * (1.0 + e * (1.0 - sig))).to(e_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + offsets, (dh * silu).to(g_ptr.dtype.element_ty), mask=mask)


def swiglu_backward_with_h(e: torch.Tensor, g: torch.Tensor,
                           dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, dL/de, dL/dg), each (..., I), written into dh's, e's and g's buffers (contiguous, same shape)."""
    if not (e.is_contiguous() and g.is_contiguous() and dh.is_contiguous()) or not e.shape == g.shape == dh.shape:
        raise ValueError("swiglu_backward_with_h needs contiguous e, g and dh of one shape")
    n = dh.numel()
    _swiglu_backward_with_h_kernel[(triton.cdiv(n, BLOCK_SIZE),)](dh, e, g, n, BLOCK=BLOCK_SIZE)
    return dh, e, g
