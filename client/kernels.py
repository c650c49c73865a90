"""Optional kernels for the fast trainer: a kernel set (train.kernels) and the packed-attention path (train.attention).

Kernel sets (registered in KERNEL_SETS; ``auto`` resolves through resolve_kernel_set):

* ``none``  today's trainer: HF modules and client/fast_train's pure-torch chunked cross-entropy.
* ``liger`` Liger-Kernel's Triton RMSNorm, SwiGLU and RoPE patched onto the resident model, and its fused linear
  cross-entropy (reduction="sum") for the loss over target tokens: like ours it never materialises the
  (tokens, vocab) logits and computes the hidden-state gradient during the forward pass, but in Triton.

Attention paths for packed rows (ATTENTION_PATHS; ``auto`` resolves through resolve_attention):

* ``sdpa``   today's: transformers builds a block-diagonal mask from the restarting position ids, which keeps
  SDPA off the flash kernel and repeats K/V for grouped-query attention.
* ``varlen`` torch.nn.attention.varlen.varlen_attn (flash attention over cu_seqlens): every packed example is its
  own sequence, no mask, no K/V repeat where the installed torch takes enable_gqa. Registered with
  transformers as the attention implementation PACKED_ATTENTION; calls without cu_seq_lens (evaluation's padded
  batches) go to transformers' SDPA with its usual mask, so the model stays correct for every other caller.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

# The transformers attention implementation name the varlen path registers (AttentionInterface.register).
PACKED_ATTENTION = "fedtune_packed_varlen"


# ----------------------------------------------------------------------------------------------- kernel sets


@dataclass(frozen=True)
class KernelSet:
    """What a kernel set does to the resident model, and its loss over the selected target tokens."""

    name: str
    # Why it cannot run on this device type (None: it can).
    unavailable: Callable[[str], str | None]
    # Patch the (peft-wrapped) causal LM in place; idempotent.
    apply: Callable[[torch.nn.Module], None]
    # sum_i CE(hidden_i @ W^T, target_i) over hidden (n, d), W (V, d), targets (n,) -> 0-d fp32, or None:
    # client/fast_train's pure-torch chunked loss.
    linear_ce_sum: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None


KERNEL_SETS: dict[str, KernelSet] = {}


def register_kernel_set(kernel_set: KernelSet) -> KernelSet:
    """Add a kernel set under its name (train.kernels=<name>)."""
    KERNEL_SETS[kernel_set.name] = kernel_set
    return kernel_set


def _liger_unavailable(device_type: str) -> str | None:
    if device_type != "cuda":
        return f"Liger's Triton kernels need a CUDA device (the model is on {device_type})"
    if importlib.util.find_spec("liger_kernel") is None:
        return "the liger-kernel package is not installed (pip install liger-kernel)"
    return None


def _apply_liger(model: torch.nn.Module) -> None:
    """RMSNorm, SwiGLU (per module) and RoPE (transformers' module function) of Liger on the model's architecture.

    Liger's own fused-CE forward stays off: the fast trainer calls the decoder and computes the loss itself from
    the hidden states (liger_linear_ce_sum), so model.forward is left as it is.
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(causal_lm.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"train.kernels=liger: Liger has no kernels for model type {model_type!r}; "
                         f"it supports {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}")
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
              "fused_linear_cross_entropy": False}
    accepted = inspect.signature(apply_fn).parameters
    apply_fn(model=causal_lm, **{k: v for k, v in wanted.items() if k in accepted})


def liger_linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy, summed: hidden (n, d), weight (V, d), targets (n,) -> 0-d fp32."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if hidden.shape[0] == 0:  # Liger sizes its chunks by n; nothing to predict is a zero loss, still differentiable
        return hidden.sum().float() * 0.0
    return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum").float()


register_kernel_set(KernelSet("none", unavailable=lambda device_type: None, apply=lambda model: None,
                              linear_ce_sum=None))
register_kernel_set(KernelSet("liger", unavailable=_liger_unavailable, apply=_apply_liger,
                              linear_ce_sum=liger_linear_ce_sum))


def resolve_kernel_set(name: str, device_type: str) -> KernelSet:
    """train.kernels -> the KernelSet to run: auto = liger where it can run (CUDA + liger-kernel), else none.

    An explicit choice that cannot run here raises ValueError with the reason (no silent fallback).
    """
    name = str(name).lower()
    if name == "auto":
        return next(KERNEL_SETS[n] for n in ("liger", "none") if KERNEL_SETS[n].unavailable(device_type) is None)
    if name not in KERNEL_SETS:
        raise ValueError(f"train.kernels {name!r} unknown; valid: {', '.join([*KERNEL_SETS, 'auto'])}")
    reason = KERNEL_SETS[name].unavailable(device_type)
    if reason:
        raise ValueError(f"train.kernels={name}: {reason}")
    return KERNEL_SETS[name]


# ------------------------------------------------------------------------------------ packed varlen attention


def packed_cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Position ids (R, T) of pack_sequences -> (cu_seqlens (S+1,) int32 over the flattened R*T tokens, longest S).

    Every restart at 0 (and every row start) opens a sequence; a row's padding tail is its own sequence, as in
    the block mask. Computed on the host copy, so the device never syncs for max_len.
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero()[:, 0]
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


def packed_attention_kwargs(position_ids: torch.Tensor, device: torch.device) -> dict:
    """The decoder's keyword arguments that hand packed rows' sequence boundaries (packed_cu_seqlens) to varlen."""
    cu_seqlens, longest = packed_cu_seqlens(position_ids)
    cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": longest, "max_length_k": longest}


def _torch_varlen_kernel(query, key, value, cu_seqlens, max_len, scale):
    """torch.nn.attention.varlen.varlen_attn, causal; (N, Hq, D), (N, Hkv, D) x2 -> (N, Hq, D).

    Adapts to the installed signature, which changed between releases: the first one (torch 2.9/2.10 era) is
    varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None), with no scale and no GQA;
    later ones take keyword-only scale, window_size=(-1, 0) for causal, and enable_gqa. Without enable_gqa K/V
    are repeated to Hq heads; without scale a non-default scale is folded into the query.
    """
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale * query.shape[-1] ** 0.5 - 1.0) > 1e-6:
        query = query * (scale * query.shape[-1] ** 0.5)  # the kernel's own scale is 1/sqrt(D)
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)


def reference_varlen_kernel(query, key, value, cu_seqlens, max_len, scale):
    """Pure-torch equivalent of _torch_varlen_kernel (one causal SDPA per sequence); for CPU tests."""
    groups = query.shape[1] // key.shape[1]
    out = torch.empty_like(query)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q = query[start:end].transpose(0, 1)
        k = key[start:end].repeat_interleave(groups, dim=1).transpose(0, 1)
        v = value[start:end].repeat_interleave(groups, dim=1).transpose(0, 1)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale).transpose(0, 1)
    return out


# The kernel the registered attention runs for packed calls; tests swap in reference_varlen_kernel on a CPU.
varlen_kernel: Callable = _torch_varlen_kernel


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: varlen over cu_seq_lens_q when the caller packed, else SDPA.

    query (B, Hq, T, D), key/value (B, Hkv, T, D) -> ((B, T, Hq, D), None), like sdpa_attention_forward.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    batch, heads, length, head_dim = query.shape
    dtype = query.dtype
    # Flash kernels take fp16/bf16 only; an fp32 model (no autocast) runs them in bf16 and gets fp32 back.
    run_dtype = torch.bfloat16 if query.is_cuda and dtype == torch.float32 else dtype

    def flat(x):  # (B, H, T, D) -> (B*T, H, D)
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim).to(run_dtype)

    out = varlen_kernel(flat(query), flat(key), flat(value), cu_seqlens, int(kwargs["max_length_q"]), scaling)
    return out.to(dtype).view(batch, length, heads, head_dim), None


def register_packed_attention() -> None:
    """Register PACKED_ATTENTION with transformers (attention + SDPA's mask, for the unpacked fallback); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def _varlen_unavailable(device_type: str) -> str | None:
    if device_type != "cuda":
        return f"flash varlen attention needs a CUDA device (the model is on {device_type})"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


# attention path -> why it cannot run on a device type (None: it can)
ATTENTION_PATHS: dict[str, Callable[[str], str | None]] = {"sdpa": lambda device_type: None,
                                                           "varlen": _varlen_unavailable}


def resolve_attention(name: str, device_type: str) -> str:
    """train.attention -> sdpa | varlen: auto = varlen where it can run, else sdpa; an explicit one that cannot raises."""
    name = str(name).lower()
    if name == "auto":
        return "varlen" if ATTENTION_PATHS["varlen"](device_type) is None else "sdpa"
    if name not in ATTENTION_PATHS:
        raise ValueError(f"train.attention {name!r} unknown; valid: {', '.join([*ATTENTION_PATHS, 'auto'])}")
    reason = ATTENTION_PATHS[name](device_type)
    if reason:
        raise ValueError(f"train.attention={name}: {reason}")
    return name


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch the model's attention implementation to PACKED_ATTENTION (registering it first)."""
    register_packed_attention()
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    causal_lm.config._attn_implementation = PACKED_ATTENTION
