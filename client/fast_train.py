"""Faster local QLoRA training: sequence packing, chunked cross-entropy, bf16 frozen weights, checkpoint policy.

Each piece computes the same loss and gradients as the plain path in client/trainer.py (CPU tests in
tests/client/test_fast_train.py); they only remove work that does not change the result:

* packing: a step's examples are concatenated into rows of at most ``max_len`` tokens with position ids
  restarting at 0 for each example, so no compute is spent on padding. transformers turns position ids that
  restart into a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), so an example
  never attends into its neighbour; labels are shifted per example before packing, so no example predicts
  the next one's first token.
* chunked cross-entropy: the full (tokens, vocab) logits are never materialised (for a 128k vocabulary
  they outweigh the whole activation memory); the loss and its gradient are computed over chunks of
  target tokens only (prompt tokens, label -100, skip the lm_head entirely).
* frozen non-quantized weights (embeddings, norms, lm_head) kept in the compute dtype instead of peft's
  fp32 upcast, plus autocast, so the residual stream, attention and the 128k-wide lm_head run in bf16.
* gradient checkpointing on every ``checkpoint_every``-th decoder layer only: without re-entrance, or with the
  layers' saved inputs in pinned host memory (offload_checkpoints, client/offload_checkpoint.py).
* each LoRA linear adds its update into the base layer's output with one in-place addmm (client/fused_lora.py)
  instead of PEFT's out-of-place clone, scale and add over (tokens, out_features) tensors; a SwiGLU MLP of LoRA
  projections recomputes silu(gate) * up in backward instead of keeping it.

Supports Llama-family decoders (no logit scaling/soft-capping in the head).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from client.fused_lora import use_fused_lora, use_fused_mlp, use_nf4_kernel
from client.kernels import (mask_free_forward, packed_attention_kwargs, resolve_attention, resolve_kernel_set,
                            use_packed_attention)
from client.offload_checkpoint import set_offloaded_checkpointing
from client.trainer import LocalTrainer
from federation.config import TrainConfig
from federation.data import IGNORE_INDEX

# Target tokens per cross-entropy chunk: a (chunk, vocab) fp32 logits block is 1 GiB at 2048 x 128k.
DEFAULT_LOSS_CHUNK_TOKENS = 2048


# ------------------------------------------------------------------------------------------------ packing


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF-style labels (..., T) -> per-position targets (..., T): targets[t] = labels[t + 1], last = -100."""
    pad = torch.full_like(labels[..., :1], IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def pack_sequences(examples: list[dict[str, torch.Tensor]], max_len: int, pad_token_id: int,
                   fixed_width: bool = False) -> dict[str, torch.Tensor]:
    """Pack examples ({"input_ids": (T_i,), "labels": (T_i,)}) into rows of <= max_len tokens, first-fit decreasing.

    Returns input_ids, position_ids, target_ids, each (R, T_max) long, and num_real_tokens (0-d), where target_ids is already shifted
    (target_ids[r, t] is the token predicted at position t; -100 = no loss). The tail of a shorter row is
    padding that forms its own position-id segment (it attends only to itself, and has no targets).
    fixed_width pads every row to max_len, so every batch has width max_len (one shape for the kernels).
    """
    if not examples:
        raise ValueError("cannot pack an empty list of examples")
    lengths = [len(ex["input_ids"]) for ex in examples]
    if max(lengths) > max_len:
        raise ValueError(f"an example has {max(lengths)} tokens, more than the packing length {max_len}")
    # First-fit decreasing: few rows and close to full ones; the loss is a sum, so row order does not matter.
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(examples)), key=lambda i: -lengths[i]):
        for row, space in enumerate(free):
            if lengths[index] <= space:
                rows[row].append(index)
                free[row] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(max_len - lengths[index])
    width = max_len if fixed_width else max(max_len - space for space in free)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    target_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            end = start + lengths[index]
            input_ids[row, start:end] = examples[index]["input_ids"]
            target_ids[row, start:end] = shift_labels(torch.as_tensor(examples[index]["labels"]))
            position_ids[row, start:end] = torch.arange(lengths[index])
            start = end
        position_ids[row, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "position_ids": position_ids, "target_ids": target_ids,
            "num_real_tokens": torch.tensor(sum(lengths))}


# -------------------------------------------------------------------------------------- chunked CE loss


def _chunk_cross_entropy(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor,
                         with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token CE of one chunk, h (c, d), weight (V, d), t (c,) -> (losses (c,) fp32, dCE/dlogits (c, V) or None)."""
    logits = (h @ weight.t()).float()  # (c, V)
    lse = torch.logsumexp(logits, dim=-1)
    losses = lse - logits.gather(1, t[:, None])[:, 0]
    if not with_grad:
        return losses, None
    # d(CE)/d(logits) = softmax - onehot, built in place in the logits buffer.
    grad_logits = logits.sub_(lse[:, None]).exp_()
    grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
    return losses, grad_logits


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T, target_i); the gradient is computed chunk by chunk during the forward pass.

    Computing it in the forward pass (as Liger's fused linear cross-entropy does) means no chunk of logits
    has to be kept or recomputed for the backward pass: only grad_hidden (tokens, d) is stored.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_grad):  # noqa: D102
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if compute_grad and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if compute_grad and ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            losses, grad_logits = _chunk_cross_entropy(h, weight, targets[start:start + chunk_size],
                                                       grad_hidden is not None or grad_weight is not None)
            loss_sum += losses.sum()
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.float()
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
        )
        ctx.has_grads = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grad_hidden, grad_weight = ctx.saved_tensors
        has_hidden, has_weight = ctx.has_grads
        out_hidden = grad_hidden * grad_output.to(grad_hidden.dtype) if has_hidden else None
        out_weight = (grad_weight * grad_output).to(ctx.weight_dtype) if has_weight else None
        return out_hidden, out_weight, None, None, None


class _LinearCrossEntropyPerToken(torch.autograd.Function):
    """CE(hidden_i @ W^T, target_i) for every i, W frozen; dCE_i/dhidden_i is computed in the forward pass.

    The backward scales row i of the stored gradient by the incoming grad_i, so a weighted sum of the
    per-token losses (multi-adapter training: 1 / tokens of each token's client) costs no extra pass.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_grad):  # noqa: D102
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if compute_grad and ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk_size):
            chunk_losses, grad_logits = _chunk_cross_entropy(hidden[start:start + chunk_size], weight,
                                                             targets[start:start + chunk_size], grad_hidden is not None)
            losses[start:start + chunk_size] = chunk_losses
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else torch.empty(0))
        ctx.has_grad = grad_hidden is not None
        return losses

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (grad_hidden,) = ctx.saved_tensors
        out_hidden = grad_hidden * grad_output[:, None].to(grad_hidden.dtype) if ctx.has_grad else None
        return out_hidden, None, None, None, None


def linear_cross_entropy_per_token(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   chunk_size: int = DEFAULT_LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token CE losses (n,) fp32 of hidden (n, d) through a frozen head weight (V, d) against targets (n,)."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy_per_token needs a frozen head weight (LoRA does not train lm_head)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    compute_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _LinearCrossEntropyPerToken.apply(hidden, weight, targets, chunk_size, compute_grad)


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """tensor on device; a host tensor bound for CUDA goes through pinned memory without waiting on the stream.

    A blocking host-to-device copy synchronizes the stream: every step would wait there for all the work already
    queued (the previous step's backward and optimizer) before queuing more, leaving the GPU idle while Python
    catches up. Pinned + non_blocking keeps the CPU ahead; the caching host allocator keeps the pinned buffer
    alive until the copy has run.
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def chunked_causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, target_ids: torch.Tensor,
                           chunk_size: int = DEFAULT_LOSS_CHUNK_TOKENS,
                           linear_ce_sum: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                           ) -> tuple[torch.Tensor, int]:
    """(sum of CE over target tokens, number of target tokens) without materialising (tokens, vocab) logits.

    hidden (..., T, d) final hidden states; lm_head_weight (V, d); target_ids (..., T) already shifted
    (see shift_labels), -100 = no loss. Differentiable w.r.t. hidden (and lm_head_weight if it requires grad).
    linear_ce_sum(selected hidden (n, d), weight, targets (n,)) -> 0-d sum replaces the pure-torch chunked loss
    (a kernel set's fused one, client/kernels.py); it sees the target tokens only, as the chunked loss does.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_targets = target_ids.reshape(-1)
    # Found where the batch is (the host, for packed batches): nonzero on the GPU would wait for the whole
    # queued forward before the loss could be queued.
    keep = (flat_targets != IGNORE_INDEX).nonzero()[:, 0]
    targets = host_to_device(flat_targets.index_select(0, keep), hidden.device)
    keep = host_to_device(keep, hidden.device)
    # Only target tokens go through the lm_head; the gather's backward scatters zeros to the rest.
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    if linear_ce_sum is not None:
        return linear_ce_sum(selected, lm_head_weight, targets), int(keep.numel())
    compute_grad = torch.is_grad_enabled() and (selected.requires_grad or lm_head_weight.requires_grad)
    loss_sum = _LinearCrossEntropySum.apply(selected, lm_head_weight, targets, chunk_size, compute_grad)
    return loss_sum, int(keep.numel())


# ----------------------------------------------------------------------------------- model preparation


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(causal LM, decoder stack returning hidden states, lm_head) of a (peft-wrapped) HF causal LM."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm, causal_lm.get_decoder(), causal_lm.get_output_embeddings()


def is_quantized(model: torch.nn.Module) -> bool:
    """True when any parameter is a bitsandbytes 4-bit tensor (the QLoRA path)."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def set_checkpointing_policy(model: torch.nn.Module, checkpoint_every: int, offload: bool = False) -> int:
    """Non-reentrant gradient checkpointing on decoder layers i % checkpoint_every == 0 (0 = none); returns the count.

    offload: those layers keep their input in pinned host memory until backward (client/offload_checkpoint.py),
    where exact; idempotent both ways (every call starts from transformers' own checkpoint function).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    causal_lm, _, _ = causal_lm_parts(model)
    if checkpoint_every <= 0:
        causal_lm.gradient_checkpointing_disable()
        return 0
    causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in causal_lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % checkpoint_every == 0
    if offload:
        set_offloaded_checkpointing(layers, causal_lm.config)
    return sum(layer.gradient_checkpointing for layer in layers)


def prepare_model_for_fast_training(model: torch.nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                                    checkpoint_every: int = 1, fused_lora: bool = True,
                                    offload_checkpoints: bool = False) -> None:
    """Undo peft's fp32 upcast of frozen non-quantized weights (QLoRA only), set the checkpoint policy and the LoRA
    layers' forward (fused_lora: client/fused_lora.py's, else PEFT's); idempotent.

    LoRA parameters (trainable) stay fp32 for the optimizer; autocast runs their matmuls in compute_dtype.
    """
    if is_quantized(model):
        for param in model.parameters():
            if not param.requires_grad and param.dtype == torch.float32 and type(param).__name__ != "Params4bit":
                param.data = param.data.to(compute_dtype)
    set_checkpointing_policy(model, checkpoint_every, offload_checkpoints)
    use_fused_lora(model, fused_lora)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def packed_loss_sum(model: torch.nn.Module, packed: dict[str, torch.Tensor],
                    chunk_size: int = DEFAULT_LOSS_CHUNK_TOKENS,
                    autocast_dtype: torch.dtype | None = None,
                    linear_ce_sum: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    varlen: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over target tokens, number of target tokens) for one pack_sequences batch.

    varlen passes the packed sequences' boundaries (cu_seq_lens_q/k, max_length_q/k) down to the attention
    layers, for client/kernels.py's varlen attention (the model must use it: kernels.use_packed_attention).
    linear_ce_sum: see chunked_causal_lm_loss.
    """
    _, decoder, lm_head = causal_lm_parts(model)
    device = lm_head.weight.device
    extra = packed_attention_kwargs(packed["position_ids"], device) if varlen else {}
    # With varlen every row is one sequence or carries its boundaries: no attention mask is needed.
    with _autocast(device, autocast_dtype), mask_free_forward(model) if varlen else contextlib.nullcontext():
        out = decoder(input_ids=host_to_device(packed["input_ids"], device),
                      position_ids=host_to_device(packed["position_ids"], device),
                      attention_mask=None, use_cache=False, **extra)
    hidden = out.last_hidden_state
    # lm_head in its own (frozen, bf16 on QLoRA) dtype; the CE itself is computed in fp32 chunk by chunk.
    return chunked_causal_lm_loss(hidden.to(lm_head.weight.dtype), lm_head.weight, packed["target_ids"], chunk_size,
                                  linear_ce_sum)


# ------------------------------------------------------------------------------------------------ trainer


@dataclass
class FastPathSettings:
    """Knobs of the fast path; BENCHMARKS.md has what each costs and buys on an H100."""

    # Packing length in tokens; 0 = the longest example of the batch (no example is ever split).
    pack_len: int = 0
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS
    # Gradient-checkpoint every k-th decoder layer; 1 = all (least memory, the default: never above the plain
    # path's peak), 2 = half (1.2-3x faster on H100, 2-3x the activation memory), 0 = none (fastest).
    checkpoint_every: int = 1
    # Checkpointed layers keep their input in pinned host memory between forward and backward instead of on the
    # GPU (client/offload_checkpoint.py): ~1.7 GB less at llama-8b, for copies that overlap compute on a side stream.
    offload_checkpoints: bool = True
    compute_dtype: str = "bfloat16"
    # cuDNN's fused attention builds an execution plan for every new sequence shape; packed variable-length
    # batches have a new shape almost every step, so on an H100 it ran 2.4x slower than the memory-efficient
    # kernel when cold (BENCHMARKS.md, "cold-process" table). Off by default: SDPA then picks flash/efficient.
    # On, maskless causal calls (rows that are one whole sequence each) try cuDNN first (kernels.cuda_sdpa_priority):
    # faster on Hopper where shapes repeat (full rows, fixed lengths).
    # auto (on where the model's head dim is >= CUDNN_MIN_HEAD_DIM) | true | false: train.cudnn_attention.
    cudnn_attention: str = "auto"
    # Pad every packed row to pack_len: one width for all steps (fewer shapes for the kernels), at the cost of
    # computing the padding; measured as marginal once cuDNN attention is off.
    fixed_width: bool = False
    # Kernel set (client/kernels.py KERNEL_SETS): none | liger | auto (liger where it can run this model, else none).
    kernels: str = "auto"
    # Attention over packed rows (client/kernels.py): sdpa (block mask) | varlen (flash over cu_seqlens) | auto
    # (varlen where it can run this model, else sdpa).
    attention: str = "auto"
    # LoRA update added into the base layer's output by one in-place addmm (client/fused_lora.py) instead of PEFT's
    # out-of-place clone, scale and add; same result up to rounding. A switch so benchmarks can compare both.
    fused_lora: bool = True
    # A SwiGLU MLP whose three projections are LoRA layers runs as one autograd function that recomputes
    # silu(gate) * up in backward instead of keeping it (client/fused_lora.py _LoRASwiGLU): one
    # (tokens, intermediate) activation less per layer. Needs fused_lora; same result up to rounding.
    fused_mlp: bool = True
    # The fused functions dequantize NF4 base weights with one Triton kernel (client/nf4_kernel.py, bit-identical
    # to bitsandbytes') instead of bitsandbytes' three custom-op calls. CUDA with Triton only; a switch so
    # benchmarks can compare both.
    nf4_kernel: bool = True


# cuDNN's attention was faster than flash for full rows at head dim 128 (llama-8b) and slower at 64 (llama-1b) on
# an H200 (BENCHMARKS.md): train.cudnn_attention=auto turns it on from this head dim.
CUDNN_MIN_HEAD_DIM = 128


def _head_dim(model: torch.nn.Module | None) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    heads = getattr(config, "num_attention_heads", None)
    return getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)


def cudnn_attention_on(setting: str | bool, model: torch.nn.Module | None = None) -> bool:
    """train.cudnn_attention (auto | true | false; a bool too) for this model: auto = head dim >= CUDNN_MIN_HEAD_DIM."""
    value = str(setting).lower()
    if value == "auto":
        head_dim = _head_dim(model)
        return head_dim is not None and head_dim >= CUDNN_MIN_HEAD_DIM
    return value == "true"


def apply_attention_backends(settings: FastPathSettings, model: torch.nn.Module | None = None) -> None:
    """Turn PyTorch's cuDNN SDPA backend on or off as settings.cudnn_attention says for model (CUDA; process-wide).

    Process-wide because a site's process trains only this model; a context manager would not cover the
    checkpointed layers' recompute, which runs later, during backward. Benchmarks of the fast path call this
    too, so they measure the backends the trainer runs with.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(cudnn_attention_on(settings.cudnn_attention, model))


class FastLocalTrainer(LocalTrainer):
    """Drop-in for LocalTrainer (same data order, step/token accounting, optimizer and schedule), packed + chunked CE.

    DP-SGD (train_dp_sgd) is inherited unchanged: per-example clipping needs one example per row, not packing.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int, cfg: TrainConfig,
                 settings: FastPathSettings | None = None):
        super().__init__(model, pad_token_id, cfg)
        self.settings = settings or FastPathSettings()
        quantized = is_quantized(model)
        self.autocast_dtype = getattr(torch, self.settings.compute_dtype) if quantized else None
        prepare_model_for_fast_training(model, self.autocast_dtype or torch.float32, self.settings.checkpoint_every,
                                        self.settings.fused_lora, self.settings.offload_checkpoints)
        apply_attention_backends(self.settings, model)
        device_type = next(model.parameters()).device.type
        self.kernel_set = resolve_kernel_set(self.settings.kernels, device_type, model)
        self.kernel_set.apply(model)
        # After the kernel set: it may give the MLP its own forward (Liger's SwiGLU), which the fused MLP keeps
        # for the calls it cannot run.
        use_fused_mlp(model, self.settings.fused_mlp)
        use_nf4_kernel(model, self.settings.nf4_kernel)
        self.attention = resolve_attention(self.settings.attention, device_type, model)
        if self.attention == "varlen":
            use_packed_attention(model)

    def _collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(ex["input_ids"]) for ex in examples)
        return pack_sequences(examples, max(self.settings.pack_len, longest), self.pad_token_id,
                              fixed_width=self.settings.fixed_width)

    def _batch_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return packed_loss_sum(self.model, batch, self.settings.loss_chunk_tokens, self.autocast_dtype,
                               self.kernel_set.linear_ce_sum, varlen=self.attention == "varlen")

    def _target_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["target_ids"] != IGNORE_INDEX).sum())

    def _input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return _real_tokens(batch)


def _real_tokens(packed: dict[str, torch.Tensor]) -> int:
    """Non-padding input tokens of a pack_sequences batch."""
    return int(packed["num_real_tokens"])
