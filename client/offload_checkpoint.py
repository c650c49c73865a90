"""Gradient checkpointing whose saved layer inputs wait in pinned host memory (fast trainer, memory-lean regime).

Non-reentrant checkpointing keeps every checkpointed decoder layer's input (tokens, hidden) on the GPU until
backward: 32 x 67 MB = 2.1 GB at llama-8b with 8,192 tokens. Here each input is copied to pinned host memory on a
side CUDA stream while the next layers compute, and the GPU copy is freed; backward brings it back (the previous
layer's input is prefetched while this one recomputes), reruns the layer with gradients on and backpropagates
through it, as torch's reentrant checkpoint does (torch.utils.checkpoint). Unsloth's "unsloth" gradient
checkpointing is the same idea. Hand-written rather than torch's save_on_cpu hook around the usual checkpoint
(transformers' activation_checkpointing_enable(offload=True)), which offloads the same inputs but copies on the
compute stream both ways: the copies queue between the layers' kernels instead of overlapping them, and nothing
is prefetched.

Exact only without randomness in the layer (no dropout: the recompute would draw new masks, and no RNG state is
kept to replay them) and where the layer input is the only tensor argument needing a gradient;
set_offloaded_checkpointing installs it only on layers without dropout, offloaded_checkpoint falls back to the
usual checkpoint for the rest. On a CPU the "host copy" is the tensor itself, so the recompute path runs (and is
tested) without CUDA.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn


class _SavedInput:
    """One checkpointed layer's input between forward and backward: in host memory, or prefetched back."""

    def __init__(self, host: torch.Tensor, device: torch.device, copied: torch.cuda.Event | None):
        self.host = host
        self.device = device
        self.copied = copied  # the device-to-host copy's event (CUDA), waited on before the copy back
        self.prefetched: torch.Tensor | None = None
        self.arrived: torch.cuda.Event | None = None

    def prefetch(self, stream: torch.cuda.Stream) -> None:
        """Start the host-to-device copy on stream (CUDA); fetch() waits for it."""
        if self.prefetched is not None or self.device.type != "cuda":
            return
        with torch.cuda.stream(stream):
            stream.wait_event(self.copied)
            self.prefetched = self.host.to(self.device, non_blocking=True)
            self.arrived = torch.cuda.Event()
            self.arrived.record(stream)

    def fetch(self) -> torch.Tensor:
        """The input on its device again, for the current stream."""
        if self.device.type != "cuda":
            return self.host
        if self.prefetched is None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)
            return self.host.to(self.device, non_blocking=True)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.arrived)
        self.prefetched.record_stream(current)  # made on the side stream, used on this one
        return self.prefetched


# Inputs saved by forward passes whose backward has not run yet, oldest first (weak: a graph that is dropped
# without backward frees its inputs). Backward of one layer prefetches the input of the layer before it.
_pending: list[weakref.ref] = []
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def _offload(hidden: torch.Tensor) -> _SavedInput:
    if hidden.device.type != "cuda":
        return _SavedInput(hidden.detach(), hidden.device, None)
    stream = _side_stream(hidden.device)
    stream.wait_stream(torch.cuda.current_stream(hidden.device))  # hidden is written by now
    host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(hidden.detach(), non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(stream)
    hidden.record_stream(stream)  # its memory is not reused before the copy has read it
    return _SavedInput(host, hidden.device, copied)


def _previous_pending(saved: _SavedInput) -> _SavedInput | None:
    """Drop saved (and dead entries) from _pending; the live entry saved before it, if any."""
    previous = None
    for ref in list(_pending):
        entry = ref()
        if entry is None or entry is saved:
            _pending.remove(ref)
            continue
        previous = entry
    return previous


class _OffloadedCheckpoint(torch.autograd.Function):
    """run(hidden, *args) -> a tensor or a tuple, recomputed in backward from hidden kept in host memory."""

    @staticmethod
    def forward(ctx, run, hidden, *args):  # noqa: D102
        device_type = hidden.device.type
        ctx.run, ctx.args = run, args
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.saved = _offload(hidden)
        _pending.append(weakref.ref(ctx.saved))
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, *grad_outputs):  # noqa: D102
        saved = ctx.saved
        previous = _previous_pending(saved)
        hidden = saved.fetch().detach().requires_grad_(True)
        if previous is not None and saved.device.type == "cuda":
            previous.prefetch(_side_stream(saved.device))  # overlaps this layer's recompute and backward
        device_type, autocast, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=autocast):
            outputs = ctx.run(hidden, *ctx.args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        # Outputs without a gradient path (non-tensors, integer tensors) have nothing to propagate: skipped.
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs, strict=True)
                 if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None]
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        ctx.saved = None
        return (None, hidden.grad, *(None for _ in ctx.args))


def offloaded_checkpoint(run: Callable[..., torch.Tensor | tuple], *args) -> torch.Tensor | tuple:
    """transformers' _gradient_checkpointing_func: run(hidden, *rest) with hidden = args[0] offloaded until backward.

    Falls back to torch's non-reentrant checkpoint where offloading is not exact: no tensor first argument, a first
    argument that needs no gradient (this Function's backward would never run, so the layer's LoRA weights would
    silently get none, the reentrant checkpoint's pitfall), or another tensor argument that needs a gradient.
    """
    from torch.utils.checkpoint import checkpoint

    hidden = args[0] if args else None
    offloadable = (torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad
                   and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args[1:]))
    if not offloadable:
        return checkpoint(run, *args, use_reentrant=False)
    return _OffloadedCheckpoint.apply(run, *args)


def has_dropout(layer: nn.Module, config) -> bool:
    """True when the layer draws random numbers in training (dropout modules or attention dropout)."""
    modules = any(isinstance(m, nn.Dropout) and m.p > 0 for m in layer.modules())
    return modules or (getattr(config, "attention_dropout", 0.0) or 0.0) > 0


def set_offloaded_checkpointing(layers: list[nn.Module], config) -> int:
    """Give each checkpointed layer without randomness offloaded_checkpoint; returns how many got it."""
    count = 0
    for layer in layers:
        if layer.gradient_checkpointing and not has_dropout(layer, config):
            layer._gradient_checkpointing_func = offloaded_checkpoint
            count += 1
    return count
