"""Offloaded checkpointing gives the same loss and LoRA gradients as the usual checkpoint and as none (CPU)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from client import offload_checkpoint
from client.fast_train import pack_sequences, packed_loss_sum, set_checkpointing_policy
from client.offload_checkpoint import offloaded_checkpoint
from tests.client.test_fast_train import PAD, _examples, _lora_grads, _rel_err, _tiny_lora_model


def _loss_and_grads(model, packed):
    model.zero_grad(set_to_none=True)
    loss, _ = packed_loss_sum(model, packed, chunk_size=7)
    loss.backward()
    return loss.detach(), _lora_grads(model)


def _decoder_layers(model):
    return list(model.get_base_model().model.layers)


@pytest.mark.parametrize("every", [1, 2])
def test_offloaded_checkpoint_equals_the_usual_one_and_none(every):
    model = _tiny_lora_model().double()
    model.train()
    packed = pack_sequences(_examples([5, 11, 3, 8, 7], seed=3), max_len=16, pad_token_id=PAD)
    set_checkpointing_policy(model, 0)
    ref_loss, ref_grads = _loss_and_grads(model, packed)
    results = {}
    for offload in (False, True):
        assert set_checkpointing_policy(model, every, offload=offload) == (2 if every == 1 else 1)
        installed = [layer._gradient_checkpointing_func is offloaded_checkpoint for layer in _decoder_layers(model)]
        assert installed == ([True, every == 1] if offload else [False, False])
        results[offload] = _loss_and_grads(model, packed)
    assert offload_checkpoint._pending == []  # every saved input was taken back by its backward
    for loss, grads in results.values():
        assert _rel_err(loss, ref_loss) < 1e-12
        for name, grad in ref_grads.items():
            assert grad.abs().sum() > 0 and _rel_err(grads[name], grad) < 1e-10, name


def test_the_layer_runs_without_grad_in_forward_and_again_in_backward():
    """Forward keeps no graph inside the layer (the point of checkpointing); backward reruns it once."""
    calls = []
    weight = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def run(hidden, scale):
        calls.append(torch.is_grad_enabled())
        return (hidden @ weight).tanh() * scale

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = offloaded_checkpoint(run, x * 1.0, 2.0)
    assert calls == [False]
    out.sum().backward()
    assert calls == [False, True]
    expected_x, expected_w = torch.autograd.grad(((x @ weight).tanh() * 2.0).sum(), [x, weight])
    assert _rel_err(x.grad, expected_x) < 1e-12 and _rel_err(weight.grad, expected_w) < 1e-12


def test_switching_offload_off_restores_the_usual_checkpoint():
    """On twice (idempotent), then off: every checkpointed layer has transformers' non-reentrant checkpoint again."""
    from torch.utils.checkpoint import checkpoint

    model = _tiny_lora_model()
    model.train()
    packed = pack_sequences(_examples([5, 11, 3], seed=3), max_len=16, pad_token_id=PAD)
    for _ in range(2):
        assert set_checkpointing_policy(model, 1, offload=True) == 2
        assert all(layer._gradient_checkpointing_func is offloaded_checkpoint for layer in _decoder_layers(model))
    assert set_checkpointing_policy(model, 1, offload=False) == 2
    for layer in _decoder_layers(model):
        func = layer._gradient_checkpointing_func
        assert func.func is checkpoint and func.keywords == {"use_reentrant": False}
    loss, _ = packed_loss_sum(model, packed, chunk_size=7)
    assert offload_checkpoint._pending == []  # no layer offloaded its input in this forward
    loss.backward()


def test_a_tuple_output_gets_the_same_gradients():
    """A layer returning (tensor, non-tensor, tensor) backpropagates through both tensors."""
    weight = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def run(hidden):
        return (hidden @ weight).tanh(), "not a tensor", (hidden * weight.diagonal()).exp()

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    first, tag, second = offloaded_checkpoint(run, x * 1.0)
    assert tag == "not a tensor"
    (first.sum() + (second * 2).sum()).backward()
    ref_first, _, ref_second = run(x)
    expected_x, expected_w = torch.autograd.grad(ref_first.sum() + (ref_second * 2).sum(), [x, weight])
    assert _rel_err(x.grad, expected_x) < 1e-12 and _rel_err(weight.grad, expected_w) < 1e-12


def test_an_input_needing_no_grad_keeps_the_usual_checkpoint():
    """Offloaded, the layer's backward would never run and its weights would get no gradient."""
    weight = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64)  # e.g. frozen embeddings without enable_input_require_grads
    out = offloaded_checkpoint(lambda hidden: (hidden @ weight).tanh(), x)
    assert "Offloaded" not in type(out.grad_fn).__name__
    out.sum().backward()
    (expected_w,) = torch.autograd.grad((x @ weight).tanh().sum(), [weight])
    assert _rel_err(weight.grad, expected_w) < 1e-12


def test_a_graph_dropped_without_backward_frees_its_saved_input():
    x = torch.randn(3, 4, requires_grad=True)
    out = offloaded_checkpoint(lambda hidden: hidden * 2, x * 1.0)
    saved = weakref.ref(offload_checkpoint._pending[-1]())
    del out
    gc.collect()
    assert saved() is None and all(ref() is None for ref in offload_checkpoint._pending)
    offload_checkpoint._pending.clear()


def test_other_inputs_needing_grad_or_dropout_keep_the_usual_checkpoint():
    bias = torch.randn(4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    out = offloaded_checkpoint(lambda hidden, b: hidden + b, x * 1.0, bias)
    assert "Offloaded" not in type(out.grad_fn).__name__
    out.sum().backward()
    assert bias.grad is not None and torch.equal(bias.grad, torch.full((4,), 3.0))

    model = _tiny_lora_model()
    model.get_base_model().config.attention_dropout = 0.1
    set_checkpointing_policy(model, 1, offload=True)
    assert not any(layer._gradient_checkpointing_func is offloaded_checkpoint for layer in _decoder_layers(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host memory, side stream)")
def test_offloaded_checkpoint_on_cuda_under_autocast():
    model = _tiny_lora_model().cuda()
    model.train()
    packed = pack_sequences(_examples([5, 11, 3, 8, 7], seed=3), max_len=16, pad_token_id=PAD)
    results = []
    for offload in (False, True):
        set_checkpointing_policy(model, 1, offload=offload)
        model.zero_grad(set_to_none=True)
        loss, _ = packed_loss_sum(model, packed, chunk_size=7, autocast_dtype=torch.bfloat16)
        loss.backward()
        results.append((loss.detach().float(), _lora_grads(model)))
    (ref_loss, ref_grads), (loss, grads) = results
    assert _rel_err(loss, ref_loss) < 1e-3
    for name, grad in ref_grads.items():
        assert _rel_err(grads[name], grad) < 1e-2, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host memory, side stream)")
def test_the_offloaded_input_leaves_the_gpu_until_backward():
    """After forward the caller's input is freed on the GPU (the usual checkpoint keeps it); its copy is pinned."""
    from torch.utils.checkpoint import checkpoint

    weight = torch.randn(64, 64, device="cuda", requires_grad=True)
    x = torch.randn(1024, 64, device="cuda", requires_grad=True)

    def run(hidden):
        return (hidden @ weight).tanh()

    def gpu_bytes_held_after_forward(checkpoint_func):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        hidden = x * 1.0  # a device tensor only the checkpoint can keep alive once dropped here
        out = checkpoint_func(run, hidden)
        del hidden
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - before - out.nbytes, out

    held_usual, out = gpu_bytes_held_after_forward(lambda f, h: checkpoint(f, h, use_reentrant=False))
    assert held_usual >= x.nbytes  # the measure sees a kept input
    out.sum().backward()
    expected_x, expected_w = x.grad.clone(), weight.grad.clone()
    x.grad, weight.grad = None, None

    held_offloaded, out = gpu_bytes_held_after_forward(offloaded_checkpoint)
    saved = offload_checkpoint._pending[-1]()
    assert held_offloaded == 0
    assert saved.host.device.type == "cpu" and saved.host.is_pinned()
    out.sum().backward()
    assert offload_checkpoint._pending == []
    assert _rel_err(x.grad, expected_x) < 1e-5 and _rel_err(weight.grad, expected_w) < 1e-5
