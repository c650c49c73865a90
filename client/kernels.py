"""Kernels for the fast trainer: a kernel set (train.kernels) and the packed-attention path (train.attention).

Every kernel set and attention path says why it cannot run on a device type (``unavailable``) and why it cannot
run a given model (``unsupported``); ``auto`` (the default) takes the first in its preference order that can, and
logs once per model what it took and why it skipped the others. Kernel sets (KERNEL_SETS; ``auto`` resolves
through resolve_kernel_set):

* ``none``  the plain kernels: HF modules and client/fast_train's pure-torch chunked cross-entropy.
* ``liger`` Liger-Kernel's Triton RMSNorm, SwiGLU and RoPE patched onto the resident model, and its fused linear
  cross-entropy (reduction="sum") for the loss over target tokens: like ours it never materialises the
  (tokens, vocab) logits and computes the hidden-state gradient during the forward pass, but in Triton. We launch
  its kernels ourselves (liger_linear_ce_sum), without the host sync Liger's own wrapper makes every call.

Attention paths for packed rows (ATTENTION_PATHS; ``auto`` resolves through resolve_attention):

* ``sdpa``   transformers' own: it builds a block-diagonal mask from the restarting position ids, which keeps
  SDPA off the flash kernel and repeats K/V for grouped-query attention.
* ``varlen`` torch.nn.attention.varlen.varlen_attn (flash attention over cu_seqlens): every packed example is its
  own sequence, no mask, no K/V repeat where the installed torch takes enable_gqa. Registered with
  transformers as the attention implementation PACKED_ATTENTION; calls without cu_seq_lens (evaluation's padded
  batches) go to transformers' SDPA with its usual mask, so the model stays correct for every other caller.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("fedtune.client")

# The transformers attention implementation name the varlen path registers (AttentionInterface.register).
PACKED_ATTENTION = "fedtune_packed_varlen"
# The same attention under a name with no mask function: transformers' create_causal_mask returns None for it at
# once. A batch that carries its sequence boundaries (varlen) runs under it (mask_free_forward): under
# PACKED_ATTENTION transformers would find the packing from the position ids (find_packed_sequence_indices, whose
# `.all()` waits for the GPU every forward) and build a (R, 1, T, T) block-diagonal mask the varlen kernel never reads.
PACKED_ATTENTION_NO_MASK = "fedtune_packed_varlen_no_mask"


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _runs_any_model(model: torch.nn.Module) -> str | None:
    return None


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
    # Why it cannot run this (peft-wrapped) model (None: it can); asked only where it is available.
    unsupported: Callable[[torch.nn.Module], str | None] = _runs_any_model


KERNEL_SETS: dict[str, KernelSet] = {}


def register_kernel_set(kernel_set: KernelSet) -> KernelSet:
    """Add a kernel set under its name (train.kernels=<name>)."""
    KERNEL_SETS[kernel_set.name] = kernel_set
    return kernel_set


def _liger_unavailable(device_type: str) -> str | None:
    if device_type != "cuda":
        return f"Liger's Triton kernels need a CUDA device (the model is on {device_type})"
    if importlib.util.find_spec("liger_kernel") is None:
        return "the liger-kernel package is not installed (fedtune's gpu extra: pip install -e '.[gpu]')"
    return None


def _liger_model_types() -> set[str]:
    """The model types (config.model_type) Liger has kernels for."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def _liger_unsupported(model: torch.nn.Module) -> str | None:
    model_type = getattr(_causal_lm(model).config, "model_type", None)
    supported = _liger_model_types()
    if model_type not in supported:
        return f"Liger has no kernels for model type {model_type!r}; it supports {', '.join(sorted(supported))}"
    return None


def _apply_liger(model: torch.nn.Module) -> None:
    """RMSNorm, SwiGLU (per module) and RoPE (transformers' module function) of Liger on the model's architecture.

    Liger's own fused-CE forward stays off: the fast trainer calls the decoder and computes the loss itself from
    the hidden states (liger_linear_ce_sum), so model.forward is left as it is.
    """
    # Liger 0.8.5 tries its optional backends (CuTe DSL, Ascend) at first use and logs a WARNING for each one it
    # cannot import; on CUDA without them that is expected and only flooded the site log (seen on the H200).
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    causal_lm = _causal_lm(model)
    reason = _liger_unsupported(model)
    if reason:
        raise ValueError(f"train.kernels=liger: {reason}")
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN[causal_lm.config.model_type]
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
              "fused_linear_cross_entropy": False}
    accepted = inspect.signature(apply_fn).parameters
    apply_fn(model=causal_lm, **{k: v for k, v in wanted.items() if k in accepted})


# Why we launch Liger's kernels ourselves: Liger 0.8.5's fused_linear_cross_entropy_forward counts the targets that
# are not ignore_index with target_mask.sum().item() on every call (and its backward compares grad_output with 1.0
# by torch.equal), so each step waited there for all the GPU work queued before it (the multi-adapter trainer: once
# per adapter). On an H200 the llama-1b step spent ~7.6 ms of CPU in cudaStreamSynchronize; without these syncs its
# throughput did not measurably change (BENCHMARKS.md, 2026-12-04 late: the step is CPU-bound). Kept because a step
# with no host sync is what CUDA-graph capture of a training step needs, and it is bit-identical to Liger's (CUDA
# test). chunked_causal_lm_loss hands us target tokens only, so the count is n, known on the host.
# _LigerLinearCESum runs Liger's forward for our case (the same chunks, matmuls and Triton kernel, in the same
# order) with that count; where Liger's kernels do not take the arguments Liger 0.8.5 passes (the version
# pyproject's gpu extra pins), liger_linear_ce_sum falls back to Liger's own function.

# liger_cross_entropy_kernel's and element_mul_kernel's parameters as Liger 0.8.5 declares them; _LigerLinearCESum
# passes every one of them, as Liger does.
_LIGER_CE_KERNEL_ARGS = frozenset({
    "X_ptr", "X_stride", "Y_ptr", "Y_stride", "weight_ptr", "loss_ptr", "z_loss_ptr", "loss_stride",
    "token_accuracy_ptr", "token_accuracy_stride", "predicted_tokens_ptr", "predicted_tokens_stride", "n_cols",
    "n_non_ignore", "sum_non_ignore_weight", "weight_sum", "ignore_index", "lse_square_scale", "label_smoothing",
    "reduction", "softcap", "RETURN_Z_LOSS", "RETURN_TOKEN_ACCURACY", "RETURN_PREDICTED_TOKENS", "BLOCK_SIZE",
    "HAS_WEIGHT", "HAS_SOFTCAPPING", "HAS_GRADIENTS"})
_LIGER_MUL_KERNEL_ARGS = frozenset({"X_ptr", "X_stride", "grad_output_ptr", "n_cols", "BLOCK_SIZE", "X_col_stride"})
# Liger's MAX_FUSED_SIZE on CUDA: the widest block its kernels load per step.
_LIGER_MAX_BLOCK = 65536 // 2
# Liger's num_warps for these kernels on NVIDIA GPUs (ROCm takes 16: there we fall back).
_LIGER_NUM_WARPS = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(x: int) -> int:
    """The smallest power of 2 >= x (x >= 1), as triton.next_power_of_2."""
    return 1 << (x - 1).bit_length()


def _liger_chunk_rows(rows: int, hidden_size: int, vocab: int) -> int:
    """Rows per logits chunk as Liger 0.8.5 sizes them (chunk_mem_const=1): (chunk, V) logits about (rows, d) large."""
    return min(_next_power_of_2(_cdiv(rows, _cdiv(vocab, hidden_size))), rows)


def _kernel_args_differ(kernel, expected: frozenset[str]) -> str | None:
    """How a Triton kernel's parameters differ from the names we pass (None: they do not)."""
    names = getattr(kernel, "arg_names", None)
    if names is None:
        return f"{getattr(kernel, '__name__', kernel)!r} does not list its parameters (no arg_names)"
    extra, absent = sorted(set(names) - expected), sorted(expected - set(names))
    if not extra and not absent:
        return None
    return f"{kernel.__name__} also takes {extra} and does not take {absent}"


@functools.cache
def _liger_kernels() -> tuple | None:
    """(liger_cross_entropy_kernel, element_mul_kernel) where they take what _LigerLinearCESum passes, else None.

    Asked once per process, at first use; a None is logged once (liger_linear_ce_sum then runs Liger's own function).
    """
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
    from liger_kernel.ops.utils import element_mul_kernel

    reason = ("Liger launches its kernels with other settings on ROCm" if torch.version.hip else
              _kernel_args_differ(liger_cross_entropy_kernel, _LIGER_CE_KERNEL_ARGS)
              or _kernel_args_differ(element_mul_kernel, _LIGER_MUL_KERNEL_ARGS))
    if reason:
        log.warning("train.kernels=liger: the loss runs Liger's liger_fused_linear_cross_entropy, which syncs with "
                    "the GPU every call (%s; fedtune launches the kernels of liger-kernel 0.8.5 itself)", reason)
        return None
    return liger_cross_entropy_kernel, element_mul_kernel


def _liger_takes_mm_out(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether Liger computes these logits with torch.mm(out=) (its _can_use_mm_out), the only path we run ourselves."""
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return not torch.is_autocast_enabled("cuda") or torch.get_autocast_dtype("cuda") == hidden.dtype


class _LigerLinearCESum(torch.autograd.Function):
    """Liger 0.8.5's fused linear CE for reduction="sum" and a frozen head, with the target count from the host."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ce_kernel, mul_kernel):  # noqa: D102
        rows, vocab = hidden.shape[0], weight.shape[0]
        chunk_rows = _liger_chunk_rows(rows, hidden.shape[1], vocab)
        targets = targets.contiguous()
        with_grad = hidden.requires_grad  # Liger's HAS_GRADIENTS (input_requires_grad)
        # Every row gets its gradient from the matmul below, so no zero fill (Liger zero-fills).
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        losses = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        logits_storage = torch.empty((chunk_rows, vocab), dtype=hidden.dtype, device=hidden.device)
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            logits = logits_storage[:end - start]
            torch.mm(hidden[start:end], weight.t(), out=logits)
            loss_slice, target_slice = losses[start:end], targets[start:end]
            # Liger 0.8.5's call for reduction="sum", no class weights, z-loss, softcap or label smoothing; the kernel
            # writes each row's loss and, in place of its logits, their gradient. The counts only scale "mean".
            ce_kernel[(end - start,)](
                X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=target_slice, Y_stride=target_slice.stride(-1),
                weight_ptr=None, loss_ptr=loss_slice, z_loss_ptr=None, loss_stride=loss_slice.stride(-1),
                token_accuracy_ptr=None, token_accuracy_stride=0, predicted_tokens_ptr=None,
                predicted_tokens_stride=0, n_cols=vocab, n_non_ignore=rows, sum_non_ignore_weight=rows,
                weight_sum=0.0, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0, reduction="sum",
                softcap=None, RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False,
                HAS_WEIGHT=False, HAS_SOFTCAPPING=False, HAS_GRADIENTS=with_grad,
                BLOCK_SIZE=min(_LIGER_MAX_BLOCK, _next_power_of_2(vocab)), num_warps=_LIGER_NUM_WARPS)
            if with_grad:
                torch.mm(logits, weight, out=grad_hidden[start:end])
        ctx.save_for_backward(grad_hidden)
        ctx.mul_kernel = mul_kernel
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None, None, None
        # As Liger's fused_linear_cross_entropy_backward: in place (so one backward per forward, as Liger's) and by
        # the fp32 grad_output (a torch multiply would round it to bf16 first); but always, since its skip for
        # grad_output == 1 asks the GPU (torch.equal).
        width = grad_hidden.shape[1]
        ctx.mul_kernel[(grad_hidden.shape[0],)](
            grad_hidden, grad_hidden.stride(-2), grad_output, width,
            BLOCK_SIZE=min(_LIGER_MAX_BLOCK, _next_power_of_2(width)), X_col_stride=grad_hidden.stride(-1),
            num_warps=_LIGER_NUM_WARPS)
        return grad_hidden, None, None, None, None


def liger_linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy, summed: hidden (n, d), weight (V, d), targets (n,) -> 0-d fp32.

    Runs _LigerLinearCESum (no host sync) for a frozen weight on Liger's torch.mm(out=) path, else Liger's own
    function. The target count it gives Liger's kernel is n, Liger's own count where every target is a token (as
    chunked_causal_lm_loss selects them); the kernel reads it only for reduction="mean".
    """
    if hidden.shape[0] == 0:  # Liger sizes its chunks by n; nothing to predict is a zero loss, still differentiable
        return hidden.sum().float() * 0.0
    liger_kernels = _liger_kernels()
    if liger_kernels is not None and not weight.requires_grad and _liger_takes_mm_out(hidden, weight):
        return _LigerLinearCESum.apply(hidden, weight, targets, *liger_kernels)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum").float()


register_kernel_set(KernelSet("none", unavailable=lambda device_type: None, apply=lambda model: None,
                              linear_ce_sum=None))
register_kernel_set(KernelSet("liger", unavailable=_liger_unavailable, apply=_apply_liger,
                              linear_ce_sum=liger_linear_ce_sum, unsupported=_liger_unsupported))

# What train.kernels=auto tries, fastest first; the last must run anywhere.
AUTO_KERNEL_ORDER = ("liger", "none")


def resolve_kernel_set(name: str, device_type: str, model: torch.nn.Module | None = None) -> KernelSet:
    """train.kernels -> the KernelSet to run: auto = liger where it can run (CUDA, liger-kernel, a model type Liger
    supports), else none. Without a model only the device is checked.

    An explicit choice that cannot run here raises ValueError with the reason (no silent fallback).
    """
    return KERNEL_SETS[_resolve("train.kernels", name, KERNEL_SETS, AUTO_KERNEL_ORDER, device_type, model)]


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
    """The decoder's keyword arguments that hand packed rows' sequence boundaries (packed_cu_seqlens) to varlen.

    None when every row is one whole sequence (full rows: nothing packed, no padding tail): plain causal
    attention over (R, T) is exact then, and transformers' SDPA call (packed_attention_forward's fallback, no
    mask) runs it in the (B, H, T, D) layout the model already has, where cuDNN may run it (cuda_sdpa_priority).
    """
    cu_seqlens, longest = packed_cu_seqlens(position_ids)
    if cu_seqlens.numel() == position_ids.shape[0] + 1 and longest == position_ids.shape[-1]:
        return {}
    cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": longest, "max_length_k": longest}


@functools.cache
def _parameters(function: Callable) -> frozenset[str]:
    """A function's parameter names, read once (inspect.signature costs tens of us, once a layer a step here)."""
    return frozenset(inspect.signature(function).parameters)


def _torch_varlen_kernel(query, key, value, cu_seqlens, max_len, scale):
    """torch.nn.attention.varlen.varlen_attn, causal; (N, Hq, D), (N, Hkv, D) x2 -> (N, Hq, D).

    Adapts to the installed signature, which changed between releases: the first one (torch 2.9/2.10 era) is
    varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None), with no scale and no GQA;
    later ones take keyword-only scale, window_size=(-1, 0) for causal, and enable_gqa. Without enable_gqa K/V
    are repeated to Hq heads; without scale a non-default scale is folded into the query.
    """
    from torch.nn.attention.varlen import varlen_attn

    params = _parameters(varlen_attn)
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


def cuda_sdpa_priority(query: torch.Tensor, attention_mask: torch.Tensor | None):
    """Where cuDNN's SDPA backend is enabled (train.cudnn_attention) and the call is plain causal attention (no
    mask) on CUDA: SDPA tries cuDNN first (PyTorch's own order puts it last, after flash); otherwise nothing.

    cuDNN's Hopper kernels took 26.6 ms per step in backward against flash's 46.7 on an H200 at llama-8b full rows
    (BENCHMARKS.md), but build an execution plan per new shape: worth it where shapes repeat.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not (query.is_cuda and attention_mask is None and torch.backends.cuda.cudnn_sdp_enabled()):
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: varlen over cu_seq_lens_q when the caller packed, else SDPA.

    query (B, Hq, T, D), key/value (B, Hkv, T, D) -> ((B, T, Hq, D), None), like sdpa_attention_forward.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None or dropout:
        with cuda_sdpa_priority(query, attention_mask):
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
    batch, heads, length, head_dim = query.shape
    dtype = query.dtype
    # Flash kernels take fp16/bf16 only; an fp32 model (no autocast) runs them in bf16 and gets fp32 back.
    run_dtype = torch.bfloat16 if query.is_cuda and dtype == torch.float32 else dtype

    def flat(x):  # (B, H, T, D) -> (B*T, H, D)
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim).to(run_dtype)

    out = varlen_kernel(flat(query), flat(key), flat(value), cu_seqlens, int(kwargs["max_length_q"]), scaling)
    return out.to(dtype).view(batch, length, heads, head_dim), None


def register_packed_attention() -> None:
    """Register PACKED_ATTENTION (attention + SDPA's mask, for the unpacked fallback) and PACKED_ATTENTION_NO_MASK
    (the attention alone) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionInterface.register(PACKED_ATTENTION_NO_MASK, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def mask_free_forward(model: torch.nn.Module):
    """Within the block a PACKED_ATTENTION model runs as PACKED_ATTENTION_NO_MASK: no attention mask is made.

    For a forward whose attention needs none: packed rows with their varlen boundaries (packed_attention_kwargs),
    or rows that are each one whole sequence (plain causal attention, as SDPA does with no mask). Gradient
    checkpointing recomputes layers with the mask they were given (None), under either name. Other models: as is.
    """
    config = _causal_lm(model).config
    if config._attn_implementation != PACKED_ATTENTION:
        yield
        return
    config._attn_implementation = PACKED_ATTENTION_NO_MASK
    try:
        yield
    finally:
        config._attn_implementation = PACKED_ATTENTION


@dataclass(frozen=True)
class AttentionPath:
    """An attention path for packed rows and what it can run."""

    name: str
    # Why it cannot run on this device type (None: it can).
    unavailable: Callable[[str], str | None]
    # Why it cannot run this (peft-wrapped) model (None: it can); asked only where it is available.
    unsupported: Callable[[torch.nn.Module], str | None] = _runs_any_model


def _varlen_unavailable(device_type: str) -> str | None:
    if device_type != "cuda":
        return f"flash varlen attention needs a CUDA device (the model is on {device_type})"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def _varlen_unsupported(model: torch.nn.Module) -> str | None:
    """What of the model's attention packed_attention_forward (plain causal softmax attention) does not compute."""
    causal_lm = _causal_lm(model)
    config = causal_lm.config
    if not getattr(causal_lm, "is_backend_compatible", lambda: False)():
        return f"{type(causal_lm).__name__} does not take attention implementations registered with transformers"
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()) or (
            window is not None and getattr(config, "use_sliding_window", True) is not False):
        return f"the model uses sliding-window attention (sliding_window={window}), which varlen does not apply"
    if getattr(config, "attn_logit_softcapping", None):
        return f"the model soft-caps attention logits (attn_logit_softcapping={config.attn_logit_softcapping})"
    if (getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return f"the model trains with attention dropout (attention_dropout={config.attention_dropout})"
    return None


ATTENTION_PATHS: dict[str, AttentionPath] = {
    "sdpa": AttentionPath("sdpa", unavailable=lambda device_type: None),
    "varlen": AttentionPath("varlen", unavailable=_varlen_unavailable, unsupported=_varlen_unsupported)}

# What train.attention=auto tries, fastest first; the last must run anywhere.
AUTO_ATTENTION_ORDER = ("varlen", "sdpa")


def resolve_attention(name: str, device_type: str, model: torch.nn.Module | None = None) -> str:
    """train.attention -> sdpa | varlen: auto = varlen where it can run (CUDA, torch's varlen_attn, a model whose
    attention it computes), else sdpa; an explicit one that cannot raises. Without a model only the device is checked.
    """
    return _resolve("train.attention", name, ATTENTION_PATHS, AUTO_ATTENTION_ORDER, device_type, model)


# --------------------------------------------------------------------------------------------------- choosing


# model -> {setting: the auto choice last logged for it}: a site trains one resident model many times a run.
_logged_auto_choices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _why_not(option: KernelSet | AttentionPath, device_type: str, model: torch.nn.Module | None) -> str | None:
    """Why option cannot run on device_type (or this model), None where it can."""
    return option.unavailable(device_type) or (option.unsupported(model) if model is not None else None)


def _resolve(setting: str, name: str, options: dict, auto_order: tuple[str, ...], device_type: str,
             model: torch.nn.Module | None) -> str:
    """The option name a setting selects: auto = the first of auto_order that can run (logged once per model)."""
    name = str(name).lower()
    if name == "auto":
        skipped = []
        for candidate in auto_order:
            reason = _why_not(options[candidate], device_type, model)
            if reason is None:
                break
            skipped.append(f"{candidate}: {reason}")
        else:
            raise ValueError(f"{setting}=auto: nothing can run here ({'; '.join(skipped)})")
        if model is not None:
            _log_auto_choice(model, setting, candidate, skipped)
        return candidate
    if name not in options:
        raise ValueError(f"{setting} {name!r} unknown; valid: {', '.join([*options, 'auto'])}")
    reason = _why_not(options[name], device_type, model)
    if reason:
        raise ValueError(f"{setting}={name}: {reason}")
    return name


def _log_auto_choice(model: torch.nn.Module, setting: str, chosen: str, skipped: list[str]) -> None:
    """INFO in the site log, once per model and setting (again only if the choice changes)."""
    message = f"{setting}=auto runs {chosen}" + (f" (skipped {'; '.join(skipped)})" if skipped else "")
    logged = _logged_auto_choices.setdefault(model, {})
    if logged.get(setting) != message:
        logged[setting] = message
        log.info(message)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch the model's attention implementation to PACKED_ATTENTION (registering it first)."""
    register_packed_attention()
    _causal_lm(model).config._attn_implementation = PACKED_ATTENTION
