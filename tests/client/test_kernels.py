"""train.kernels / train.attention: selection, the CPU default equals today's trainer, the loss and varlen seams."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
import types

import pytest
import torch

import client.kernels as kernels
from client.fast_train import FastLocalTrainer, FastPathSettings, chunked_causal_lm_loss, pack_sequences, packed_loss_sum
from federation.config import ATTENTION_CHOICES, KERNEL_CHOICES, TrainConfig
from federation.data import IGNORE_INDEX, collate_batch
from tests.client.test_fast_train import PAD, _examples, _lora_grads, _rel_err, _tiny_lora_model


@pytest.fixture
def liger_installed(monkeypatch):
    """find_spec answers as if liger-kernel were installed (CI has none); everything else is asked for real."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "liger_kernel" else real(name, *a))


@pytest.fixture
def varlen_available(monkeypatch):
    """The varlen path counts as available (as on CUDA with torch's varlen_attn); its model check stays real."""
    monkeypatch.setitem(kernels.ATTENTION_PATHS, "varlen",
                        dataclasses.replace(kernels.ATTENTION_PATHS["varlen"], unavailable=lambda device_type: None))


def test_registries_match_the_config_choices():
    """One list of names: what validation accepts is what client/kernels.py can resolve."""
    assert set(KERNEL_CHOICES) == {*kernels.KERNEL_SETS, "auto"}
    assert set(ATTENTION_CHOICES) == {*kernels.ATTENTION_PATHS, "auto"}


def test_auto_kernels_is_liger_only_on_cuda_with_liger_installed(monkeypatch, liger_installed):
    assert kernels.resolve_kernel_set("auto", "cuda").name == "liger"
    assert kernels.resolve_kernel_set("auto", "cpu").name == "none"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert kernels.resolve_kernel_set("auto", "cuda").name == "none"


def test_explicit_liger_that_cannot_run_says_why():
    with pytest.raises(ValueError, match="train.kernels=liger: .*CUDA"):
        kernels.resolve_kernel_set("liger", "cpu")
    with pytest.raises(ValueError, match="valid: none, liger, auto"):
        kernels.resolve_kernel_set("fused", "cuda")


def test_auto_attention_is_varlen_only_on_cuda(monkeypatch):
    assert kernels.resolve_attention("auto", "cpu") == "sdpa"
    assert kernels.resolve_attention("AUTO", "cuda") == ("varlen" if importlib.util.find_spec(
        "torch.nn.attention.varlen") else "sdpa")
    with pytest.raises(ValueError, match="train.attention=varlen: .*CUDA"):
        kernels.resolve_attention("varlen", "cpu")
    monkeypatch.setitem(kernels.ATTENTION_PATHS, "varlen", kernels.AttentionPath(
        "varlen", unavailable=lambda device_type: "no varlen here"))
    assert kernels.resolve_attention("auto", "cuda") == "sdpa"


def test_defaults_are_auto(make_cfg):
    """The composed config and the schema both default to auto (the fastest path that can run)."""
    cfg = make_cfg()
    assert (cfg.train.kernels, cfg.train.attention) == ("auto", "auto")
    assert (TrainConfig().kernels, TrainConfig().attention) == ("auto", "auto")
    assert (FastPathSettings().kernels, FastPathSettings().attention) == ("auto", "auto")


def test_auto_kernels_skips_liger_for_a_model_type_it_does_not_support(monkeypatch, liger_installed, caplog):
    """CUDA + liger-kernel, but a model type outside Liger's table: auto runs none and logs why; explicit raises."""
    model = _tiny_lora_model()  # model_type "llama"
    monkeypatch.setattr(kernels, "_liger_model_types", lambda: {"llama"})
    assert kernels.resolve_kernel_set("auto", "cuda", model).name == "liger"
    monkeypatch.setattr(kernels, "_liger_model_types", lambda: {"gemma", "mistral"})
    with caplog.at_level(logging.INFO, logger="fedtune.client"):
        assert kernels.resolve_kernel_set("auto", "cuda", model).name == "none"
    assert "train.kernels=auto runs none (skipped liger: Liger has no kernels for model type 'llama'" in caplog.text
    with pytest.raises(ValueError, match="train.kernels=liger: Liger has no kernels for model type 'llama'"):
        kernels.resolve_kernel_set("liger", "cuda", model)


@pytest.mark.parametrize(("setting", "value", "reason"), [
    ("sliding_window", 8, "sliding-window attention"),
    ("layer_types", ["sliding_attention", "full_attention"], "sliding-window attention"),
    ("attn_logit_softcapping", 50.0, "soft-caps attention logits"),
    ("attention_dropout", 0.1, "attention dropout")])
def test_auto_attention_skips_varlen_for_attention_it_does_not_compute(varlen_available, caplog, setting, value,
                                                                       reason):
    """Varlen available, but the model's attention is not plain causal softmax: auto runs sdpa, explicit raises."""
    model = _tiny_lora_model()
    assert kernels.resolve_attention("auto", "cuda", model) == "varlen"
    setattr(model.get_base_model().config, setting, value)
    with caplog.at_level(logging.INFO, logger="fedtune.client"):
        assert kernels.resolve_attention("auto", "cuda", model) == "sdpa"
    (message,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train.attention=auto")]
    assert message.startswith("train.attention=auto runs sdpa (skipped varlen: ") and reason in message
    with pytest.raises(ValueError, match=f"train.attention=varlen: .*{reason}"):
        kernels.resolve_attention("varlen", "cuda", model)


def test_sliding_window_switched_off_keeps_varlen(varlen_available):
    """Qwen2-style configs carry a sliding_window that use_sliding_window=False leaves unused."""
    model = _tiny_lora_model()
    config = model.get_base_model().config
    config.sliding_window, config.use_sliding_window = 4096, False
    assert kernels.resolve_attention("auto", "cuda", model) == "varlen"


def test_trainer_resolves_auto_for_its_model_and_logs_it_once(varlen_available, caplog):
    """FastLocalTrainer hands its model to the resolution; a resident model trained again is not logged again."""
    model = _tiny_lora_model()
    model.get_base_model().config.sliding_window = 8
    with caplog.at_level(logging.INFO, logger="fedtune.client"):
        for _ in range(3):
            trainer = FastLocalTrainer(model, PAD, TrainConfig())
            assert (trainer.kernel_set.name, trainer.attention) == ("none", "sdpa")
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("train.attention=auto runs sdpa (skipped varlen: the model uses sliding-window")
               for m in messages) == 1
    assert sum(m.startswith("train.kernels=auto runs none (skipped liger: ") for m in messages) == 1


def test_auto_on_cpu_trains_exactly_like_todays_fast_trainer():
    """The defaults (auto) on a CPU: no patch, model still SDPA, loss and grads bit-identical to none/sdpa."""
    model = _tiny_lora_model()
    packed = pack_sequences(_examples([5, 11, 3, 8], seed=3), max_len=16, pad_token_id=PAD)
    today = FastLocalTrainer(model, PAD, TrainConfig(), FastPathSettings(kernels="none", attention="sdpa"))
    loss, n = today._batch_loss_sum(packed)
    loss.backward()
    ref_grads = _lora_grads(model)
    model.zero_grad(set_to_none=True)

    auto = FastLocalTrainer(model, PAD, TrainConfig())
    assert (auto.kernel_set.name, auto.attention) == ("none", "sdpa")
    assert model.get_base_model().config._attn_implementation == "sdpa"
    auto_loss, auto_n = auto._batch_loss_sum(packed)
    auto_loss.backward()
    assert auto_n == n and torch.equal(auto_loss, loss)
    for name, grad in _lora_grads(model).items():
        assert torch.equal(grad, ref_grads[name]), name


def test_explicit_varlen_on_cpu_is_refused_by_the_trainer():
    with pytest.raises(ValueError, match="train.attention=varlen"):
        FastLocalTrainer(_tiny_lora_model(), PAD, TrainConfig(), FastPathSettings(attention="varlen"))


def test_linear_ce_hook_sees_only_target_tokens_and_matches_the_chunked_loss():
    """A kernel set's loss (here full-logits torch CE, the reference) replaces the chunked one: same loss and grads."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 6, 16, generator=gen, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen)
    targets = torch.randint(0, 40, (3, 6), generator=gen)
    targets[1, :4] = IGNORE_INDEX
    seen = []

    def full_ce_sum(h, w, t):
        seen.append(h.shape[0])
        return torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")

    ref, ref_n = chunked_causal_lm_loss(hidden, weight, targets, chunk_size=4)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    loss, n = chunked_causal_lm_loss(hidden, weight, targets, linear_ce_sum=full_ce_sum)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert seen == [n] and n == ref_n == 14
    assert _rel_err(loss.detach(), ref.detach()) < 1e-6
    assert _rel_err(grad, ref_grad) < 1e-5
    assert float(grad[1, :4].abs().sum()) == 0.0


def test_packed_cu_seqlens_opens_a_sequence_at_every_restart_and_row():
    position_ids = torch.tensor([[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]])  # test_fast_train's FFD layout
    cu, longest = kernels.packed_cu_seqlens(position_ids)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 4, 5, 8, 10] and longest == 4


def test_rows_that_are_each_one_whole_sequence_need_no_varlen_boundaries():
    """Full rows (one sequence each, no padding tail) go to plain causal attention; any restart or tail does not."""
    full = torch.arange(6).repeat(3, 1)
    assert kernels.packed_attention_kwargs(full, torch.device("cpu")) == {}
    for packed in (torch.tensor([[0, 1, 2, 0, 1, 2]] * 2), torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1]])):
        kwargs = kernels.packed_attention_kwargs(packed, torch.device("cpu"))
        assert kwargs["cu_seq_lens_q"].numel() > packed.shape[0] + 1


def test_full_rows_through_the_varlen_setting_equal_the_mask_path(reference_varlen):
    """Full rows with varlen on run transformers' causal SDPA (no kernel call, no mask): same loss and grads."""
    model = _tiny_lora_model()
    packed = pack_sequences(_examples([9, 9, 9], seed=4), max_len=9, pad_token_id=PAD)
    assert packed["input_ids"].shape == (3, 9)
    ref, _ = packed_loss_sum(model, packed, chunk_size=7)
    ref.backward()
    ref_grads = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    kernels.use_packed_attention(model)
    masks = []
    sdpa = kernels.packed_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface
    for name in (kernels.PACKED_ATTENTION, kernels.PACKED_ATTENTION_NO_MASK):
        AttentionInterface.register(name, spy)
    try:
        loss, _ = packed_loss_sum(model, packed, chunk_size=7, varlen=True)
    finally:
        kernels.register_packed_attention()
    loss.backward()
    assert reference_varlen == [] and masks == [None, None]  # plain causal attention in both layers
    assert _rel_err(loss.detach(), ref.detach()) < 1e-5
    for name, grad in _lora_grads(model).items():
        assert _rel_err(grad, ref_grads[name]) < 1e-5, name


@pytest.fixture
def reference_varlen(monkeypatch):
    """The varlen attention runs the pure-torch per-sequence kernel (flash needs CUDA); counts its calls."""
    calls = []

    def kernel(*args):
        calls.append(args[0].shape)
        return kernels.reference_varlen_kernel(*args)

    monkeypatch.setattr(kernels, "varlen_kernel", kernel)
    return calls


def test_varlen_attention_equals_the_block_mask(reference_varlen):
    """Packed loss and LoRA grads through the registered varlen attention vs today's mask: rel err < 1e-5 (fp32)."""
    model = _tiny_lora_model()
    packed = pack_sequences(_examples([5, 11, 3, 8, 7], seed=3), max_len=16, pad_token_id=PAD)
    ref, ref_n = packed_loss_sum(model, packed, chunk_size=7)
    ref.backward()
    ref_grads = _lora_grads(model)
    model.zero_grad(set_to_none=True)

    kernels.use_packed_attention(model)
    loss, n = packed_loss_sum(model, packed, chunk_size=7, varlen=True)
    loss.backward()
    rows, width = packed["input_ids"].shape
    assert reference_varlen == [torch.Size([rows * width, 4, 16])] * 2  # both layers, flattened (tokens, heads, dim)
    assert n == ref_n and _rel_err(loss.detach(), ref.detach()) < 1e-5
    for name, grad in _lora_grads(model).items():
        assert _rel_err(grad, ref_grads[name]) < 1e-5, name


def test_a_varlen_batch_makes_no_attention_mask_and_padded_batches_still_do(reference_varlen, monkeypatch):
    """transformers finds packing from position ids with a GPU sync and builds a block mask varlen never reads:
    neither happens for a varlen batch (packed or full rows); a padded batch afterwards still gets its mask."""
    from transformers import masking_utils
    from transformers.masking_utils import AttentionMaskInterface

    detections, masks = [], []
    find = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                        lambda position_ids: detections.append(position_ids.shape) or find(position_ids))

    def counted_mask(*args, **kwargs):
        masks.append(kwargs.get("batch_size"))
        return masking_utils.sdpa_mask(*args, **kwargs)

    model = _tiny_lora_model()
    kernels.use_packed_attention(model)
    AttentionMaskInterface.register(kernels.PACKED_ATTENTION, counted_mask)
    try:
        for lengths, width in (([5, 11, 3, 8, 7], 16), ([9, 9], 9)):  # packed rows, then full rows
            packed = pack_sequences(_examples(lengths, seed=3), max_len=width, pad_token_id=PAD)
            loss, _ = packed_loss_sum(model, packed, chunk_size=7, varlen=True)
            loss.backward()
        assert detections == [] and masks == []
        assert model.get_base_model().config._attn_implementation == kernels.PACKED_ATTENTION
        # Without varlen boundaries (the sdpa setting's packed rows) transformers still finds the packing.
        packed_loss_sum(model, packed, chunk_size=7, varlen=False)
        assert detections and masks
        batch = collate_batch(_examples([4, 9, 6], seed=6), PAD)
        masks.clear()
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert masks == [3]  # evaluation's padded batch: its padding mask, built once for the layers
    finally:
        kernels.register_packed_attention()


def test_mask_free_forward_puts_the_attention_back_after_an_error():
    model = _tiny_lora_model()
    kernels.use_packed_attention(model)
    config = model.get_base_model().config
    with pytest.raises(RuntimeError):
        with kernels.mask_free_forward(model):
            assert config._attn_implementation == kernels.PACKED_ATTENTION_NO_MASK
            raise RuntimeError("a failed forward")
    assert config._attn_implementation == kernels.PACKED_ATTENTION
    plain = _tiny_lora_model()
    before = plain.get_base_model().config._attn_implementation
    with kernels.mask_free_forward(plain):  # a model without the packed attention is left as it is
        assert plain.get_base_model().config._attn_implementation == before


def test_varlen_model_still_evaluates_padded_batches_with_their_mask(reference_varlen):
    """Calls without cu_seq_lens (evaluation's padded batches) go to SDPA with the padding mask: same logits."""
    model = _tiny_lora_model()
    batch = collate_batch(_examples([4, 9, 6], seed=6), PAD)
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kernels.use_packed_attention(model)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert reference_varlen == []
    real = batch["attention_mask"].bool()
    assert _rel_err(out[real], ref[real]) < 1e-6


cuda_liger = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                                reason="Liger's fused linear cross-entropy needs CUDA and liger-kernel")


@cuda_liger
def test_liger_linear_ce_sum_matches_the_chunked_loss_on_cuda():
    """bf16 hidden and head as the fast path feeds them: loss rel err < 1e-3, hidden grad rel err < 1e-2."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(1000, 64, device="cuda", generator=gen).bfloat16() * 0.1
    targets = torch.randint(0, 1000, (300,), device="cuda", generator=gen)
    targets[:50] = IGNORE_INDEX
    ref, _ = chunked_causal_lm_loss(hidden, weight, targets, chunk_size=64)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    loss, _ = chunked_causal_lm_loss(hidden, weight, targets, linear_ce_sum=kernels.liger_linear_ce_sum)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert _rel_err(loss.detach(), ref.detach()) < 1e-3
    assert _rel_err(grad.float(), ref_grad.float()) < 1e-2



def _liger_ce_inputs():
    """As the fast path feeds the loss: bf16 target-token hidden states and frozen head; Liger cuts 3000 rows at
    d=256, V=32000 into 93 chunks of 32 and one of 24."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(32000, 256, device="cuda", generator=gen) * 0.05).bfloat16()
    targets = torch.randint(0, 32000, (3000,), device="cuda", generator=gen)
    return hidden, weight, targets


@cuda_liger
@pytest.mark.parametrize("scale", [1.0, 1 / 3000])
def test_own_liger_launch_equals_liger_fused_linear_cross_entropy_on_cuda(scale):
    """Liger's kernels with Liger's arguments, chunks and order: loss and hidden gradient bitwise equal to Liger's
    own function (cuBLAS and the Triton kernels are deterministic on one stream), for an upstream gradient of 1
    (Liger skips its scaling) and of 1/3000 (both scale with element_mul_kernel)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hidden, weight, targets = _liger_ce_inputs()
    assert kernels._liger_kernels() is not None  # else both sides below run Liger's function
    ours = kernels.liger_linear_ce_sum(hidden, weight, targets)
    (ours_grad,) = torch.autograd.grad(ours * scale, hidden)
    theirs = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum")
    (theirs_grad,) = torch.autograd.grad(theirs * scale, hidden)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=0)


@cuda_liger
def test_liger_linear_ce_sum_does_not_sync_with_the_host_on_cuda():
    """Forward and backward of the loss queue their work without waiting on the GPU (Liger's function does:
    target_mask.sum().item())."""
    hidden, weight, targets = _liger_ce_inputs()
    assert kernels._liger_kernels() is not None

    def step():
        (kernels.liger_linear_ce_sum(hidden, weight, targets) / 3000).backward()

    step()  # Triton compiles its kernels at first launch: the steady state is what each training step sees
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="called a synchronizing CUDA operation"):
            torch.ones((), device="cuda").item()  # the mode is on and catches a host read
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_liger_chunk_rows_follow_liger_sizing():
    """(chunk, V) logits about as large as the (n, d) input, a power of 2, never more than n (Liger's own example:
    4096*4 tokens, V=32000, H=4096 -> 2048)."""
    assert kernels._liger_chunk_rows(16384, 4096, 32000) == 2048
    assert kernels._liger_chunk_rows(3000, 256, 32000) == 32
    assert kernels._liger_chunk_rows(5, 64, 10) == 5


class _FakeKernel:
    """A Triton kernel stand-in: kernel[grid](...) records the grid and keyword arguments, then runs body."""

    def __init__(self, name, arg_names, body=None):
        self.__name__, self.arg_names, self.body, self.launches = name, list(arg_names), body, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            self.body(*args, **kwargs)
        return launch


def _fake_ce(*, X_ptr, Y_ptr, loss_ptr, HAS_GRADIENTS, **_):
    """liger_cross_entropy_kernel for reduction="sum": each row's CE into loss_ptr and its gradient over its logits."""
    logits = X_ptr.float()
    lse = logits.logsumexp(-1)
    loss_ptr.copy_(lse - logits.gather(1, Y_ptr[:, None])[:, 0])
    if HAS_GRADIENTS:
        grad = (logits - lse[:, None]).exp()
        grad[torch.arange(Y_ptr.shape[0]), Y_ptr] -= 1.0
        X_ptr.copy_(grad)


def _fake_mul(X_ptr, X_stride, grad_output_ptr, n_cols, **_):
    """element_mul_kernel: X *= grad_output in place."""
    X_ptr.mul_(grad_output_ptr)


def _fake_liger_kernels(ce_arg_names=kernels._LIGER_CE_KERNEL_ARGS):
    return (_FakeKernel("liger_cross_entropy_kernel", ce_arg_names, _fake_ce),
            _FakeKernel("element_mul_kernel", kernels._LIGER_MUL_KERNEL_ARGS, _fake_mul))


def test_own_liger_launch_passes_every_kernel_argument_chunk_by_chunk():
    """With the kernels' effect in torch (CPU): the sum CE and its hidden gradient scaled by the upstream one, from
    one launch per Liger chunk, each passing exactly the parameters the signature check expects."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 8, generator=gen).requires_grad_()
    weight = torch.randn(40, 8, generator=gen)
    targets = torch.randint(0, 40, (37,), generator=gen)
    ce, mul = _fake_liger_kernels()
    loss = kernels._LigerLinearCESum.apply(hidden, weight, targets, ce, mul)
    (grad,) = torch.autograd.grad(loss * 0.5, hidden)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.5, hidden)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert [grid for grid, _ in ce.launches] == [(8,)] * 4 + [(5,)]  # _liger_chunk_rows(37, 8, 40) == 8
    assert all(set(args) == kernels._LIGER_CE_KERNEL_ARGS | {"num_warps"} for _, args in ce.launches)
    assert ce.launches[0][1]["n_non_ignore"] == 37 and ce.launches[0][1]["BLOCK_SIZE"] == 64
    assert [grid for grid, _ in mul.launches] == [(37,)]


@pytest.fixture
def fake_liger(monkeypatch):
    """liger_kernel's modules as liger_linear_ce_sum imports them, with fake kernels and a recording wrapper."""
    wrapper_calls = []

    def liger_fused_linear_cross_entropy(hidden, weight, targets, reduction):
        wrapper_calls.append(reduction)
        return torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction=reduction)

    def install(ce, mul):
        monkeypatch.setitem(sys.modules, "liger_kernel.ops.cross_entropy",
                            types.SimpleNamespace(liger_cross_entropy_kernel=ce))
        monkeypatch.setitem(sys.modules, "liger_kernel.ops.utils", types.SimpleNamespace(element_mul_kernel=mul))
        monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional",
                            types.SimpleNamespace(liger_fused_linear_cross_entropy=liger_fused_linear_cross_entropy))
        return wrapper_calls

    kernels._liger_kernels.cache_clear()
    yield install
    kernels._liger_kernels.cache_clear()


def _ce_inputs(weight_requires_grad=False):
    """6 target tokens, d=16, V=10: one Liger chunk."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(6, 16, generator=gen).requires_grad_(),
            torch.randn(10, 16, generator=gen).requires_grad_(weight_requires_grad), torch.tensor([1, 2, 3, 4, 5, 6]))


def test_liger_linear_ce_sum_launches_liger_kernels_itself_for_a_frozen_head(fake_liger, caplog):
    """Kernels with the expected signature: launched by us for a frozen head (ours), Liger's function otherwise."""
    ce, mul = _fake_liger_kernels()
    wrapper_calls = fake_liger(ce, mul)
    with caplog.at_level(logging.WARNING, logger="fedtune.client"):
        kernels.liger_linear_ce_sum(*_ce_inputs())
        assert len(ce.launches) == 1 and wrapper_calls == []
        kernels.liger_linear_ce_sum(*_ce_inputs(weight_requires_grad=True))  # a trained head: Liger's own
    assert len(ce.launches) == 1 and wrapper_calls == ["sum"]
    assert caplog.records == []


def test_liger_linear_ce_sum_falls_back_to_liger_when_its_kernel_signature_differs(fake_liger, caplog):
    """A Liger whose kernel renamed a parameter: its own function runs every call, and the site log says why once."""
    ce, mul = _fake_liger_kernels(kernels._LIGER_CE_KERNEL_ARGS - {"n_non_ignore"} | {"n_valid"})
    wrapper_calls = fake_liger(ce, mul)
    with caplog.at_level(logging.WARNING, logger="fedtune.client"):
        for _ in range(2):
            kernels.liger_linear_ce_sum(*_ce_inputs())
    assert wrapper_calls == ["sum", "sum"] and ce.launches == []
    assert len(caplog.records) == 1
    assert "also takes ['n_valid'] and does not take ['n_non_ignore']" in caplog.records[0].getMessage()

def _old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The first torch signature (no scale, no GQA), computed by the reference kernel at its fixed 1/sqrt(D)."""
    assert key.shape[1] == query.shape[1], "this signature has no GQA"
    assert is_causal and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    return kernels.reference_varlen_kernel(query, key, value, cu_seq_q, max_q, query.shape[-1] ** -0.5)


def _new_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """The later signature (keyword scale, window_size causal, enable_gqa)."""
    assert window_size == (-1, 0) and enable_gqa == (key.shape[1] != query.shape[1])
    return kernels.reference_varlen_kernel(query, key, value, cu_seq_q, max_q, scale)


@pytest.mark.parametrize("fake", [_old_varlen_attn, _new_varlen_attn])
@pytest.mark.parametrize("scale", [None, 0.25, 0.1])
def test_torch_varlen_adapter_handles_both_signatures(monkeypatch, fake, scale):
    """GQA (4 query heads, 2 K/V heads), a non-default scale: the adapter's result equals the reference's."""
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", fake)
    gen = torch.Generator().manual_seed(7)
    query, key, value = (torch.randn(10, heads, 16, generator=gen) for heads in (4, 2, 2))
    cu = torch.tensor([0, 4, 5, 10], dtype=torch.int32)
    got = kernels._torch_varlen_kernel(query, key, value, cu, 5, scale)
    want = kernels.reference_varlen_kernel(query, key, value, cu, 5, scale)
    assert _rel_err(got, want) < 1e-6


def test_trainer_with_varlen_and_checkpointing_matches_the_mask_path(monkeypatch, reference_varlen):
    """FastLocalTrainer(attention=varlen), every layer checkpointed (the recompute in backward must see the same
    sequence boundaries): loss and LoRA grads equal the sdpa trainer's to rel err < 1e-5."""
    # allow it on a CPU
    monkeypatch.setitem(kernels.ATTENTION_PATHS, "varlen", kernels.AttentionPath("varlen", lambda device_type: None))
    packed = pack_sequences(_examples([5, 11, 3, 8, 7], seed=8), max_len=16, pad_token_id=PAD)
    results = {}
    for attention in ("sdpa", "varlen"):
        model = _tiny_lora_model()
        model.train()
        trainer = FastLocalTrainer(model, PAD, TrainConfig(), FastPathSettings(attention=attention, checkpoint_every=1))
        loss, _ = trainer._batch_loss_sum(packed)
        loss.backward()
        results[attention] = (loss.detach(), _lora_grads(model))
    assert len(reference_varlen) == 4  # 2 layers forward + 2 recomputed in backward
    assert _rel_err(results["varlen"][0], results["sdpa"][0]) < 1e-5
    for name, grad in results["varlen"][1].items():
        assert _rel_err(grad, results["sdpa"][1][name]) < 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention needs CUDA")
def test_cudnn_first_causal_attention_matches_flash_on_cuda():
    """With cuDNN SDPA enabled, maskless causal calls run cuDNN (where it takes them): output and grads as flash's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 256, 64, device="cuda", generator=gen).bfloat16().requires_grad_()
    kv = [torch.randn(2, 2, 256, 64, device="cuda", generator=gen).bfloat16().requires_grad_() for _ in range(2)]
    upstream = torch.randn(2, 8, 256, 64, device="cuda", generator=gen).bfloat16()
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        results = []
        for context in (lambda: kernels.cuda_sdpa_priority(q, None), lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)):
            with context():
                out = torch.nn.functional.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=True)
            results.append((out.float(), [g.float() for g in torch.autograd.grad(out, [q, *kv], upstream)]))
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)
    (out, grads), (ref_out, ref_grads) = results
    assert _rel_err(out, ref_out) < 2e-2
    for grad, ref in zip(grads, ref_grads):
        assert _rel_err(grad, ref) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("torch.nn.attention.varlen") is None,
                    reason="flash varlen attention needs CUDA and torch.nn.attention.varlen")
def test_torch_varlen_kernel_matches_the_reference_on_cuda():
    """Installed torch's varlen_attn (bf16, GQA 8/2 heads) vs per-sequence SDPA: output and q/k/v grads rel err < 2e-2."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"q": (300, 8, 64), "k": (300, 2, 64), "v": (300, 2, 64)}
    leaves = {n: torch.randn(s, device="cuda", generator=gen).bfloat16().requires_grad_() for n, s in shapes.items()}
    cu = torch.tensor([0, 17, 130, 131, 300], dtype=torch.int32, device="cuda")
    upstream = torch.randn(300, 8, 64, device="cuda", generator=gen).bfloat16()
    results = []
    for kernel in (kernels._torch_varlen_kernel, kernels.reference_varlen_kernel):
        out = kernel(leaves["q"], leaves["k"], leaves["v"], cu, 169, 64 ** -0.5)
        grads = torch.autograd.grad(out, list(leaves.values()), upstream)
        results.append((out.float(), [g.float() for g in grads]))
    (out, grads), (ref_out, ref_grads) = results
    assert _rel_err(out, ref_out) < 2e-2
    for grad, ref in zip(grads, ref_grads):
        assert _rel_err(grad, ref) < 2e-2
