"""The fast training path computes the same losses and gradients as the plain HF path (fp32, CPU, tiny Llama)."""

from __future__ import annotations

import pytest
import torch

from client.fast_train import (
    FastLocalTrainer,
    chunked_causal_lm_loss,
    host_to_device,
    pack_sequences,
    packed_loss_sum,
    shift_labels,
)
from federation.data import IGNORE_INDEX, collate_batch

VOCAB = 128
PAD = 0


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _tiny_lora_model(seed: int = 0):
    """Tiny fp32 Llama + LoRA on all linear layers, with B random (not PEFT's zeros) so every grad is non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=PAD, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def _examples(lengths: list[int], seed: int = 1, prompt_len: int = 2) -> list[dict[str, torch.Tensor]]:
    """Random token examples; the first prompt_len labels are -100 (prompt), as SiteDataset makes them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        ids = torch.randint(3, VOCAB, (length,), generator=gen)
        labels = ids.clone()
        labels[:prompt_len] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _hf_padded_loss_sum(model, examples) -> tuple[torch.Tensor, int]:
    batch = collate_batch(examples, PAD)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return out.loss * n_tokens, n_tokens


def test_shift_labels_moves_left_and_ends_ignored():
    assert shift_labels(torch.tensor([[-100, 5, 6, 7]])).tolist() == [[5, 6, 7, -100]]


def test_pack_sequences_first_fit_decreasing_layout():
    """Lengths 3, 2, 4 into rows of 5: FFD places 4 | 3, then 2 fits after the 3 -> rows [4], [3, 2]."""
    ex = [{"input_ids": torch.tensor([11, 12, 13]), "labels": torch.tensor([-100, 12, 13])},
          {"input_ids": torch.tensor([21, 22]), "labels": torch.tensor([-100, 22])},
          {"input_ids": torch.tensor([31, 32, 33, 34]), "labels": torch.tensor([-100, -100, 33, 34])}]
    packed = pack_sequences(ex, max_len=5, pad_token_id=PAD)
    assert packed["input_ids"].tolist() == [[31, 32, 33, 34, PAD], [11, 12, 13, 21, 22]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    # Each example's last token has no target: no example predicts its neighbour's first token.
    assert packed["target_ids"].tolist() == [[-100, 33, 34, -100, -100], [12, 13, -100, 22, -100]]
    assert int(packed["num_real_tokens"]) == 9


def test_pack_sequences_rejects_too_long_example():
    with pytest.raises(ValueError, match="more than the packing length"):
        pack_sequences(_examples([6]), max_len=5, pad_token_id=PAD)


def test_chunked_loss_matches_hf_loss_and_gradients():
    """Bounds: loss rel err < 1e-6 and LoRA-gradient rel err < 1e-5 (fp32; only summation order differs)."""
    model = _tiny_lora_model()
    examples = _examples([9, 6, 12])
    ref_loss, ref_n = _hf_padded_loss_sum(model, examples)
    ref_loss.backward()
    ref_grads = _lora_grads(model)
    model.zero_grad(set_to_none=True)

    batch = collate_batch(examples, PAD)
    hidden = model.get_base_model().get_decoder()(input_ids=batch["input_ids"],
                                                  attention_mask=batch["attention_mask"]).last_hidden_state
    targets = shift_labels(batch["labels"])
    loss, n_tokens = chunked_causal_lm_loss(hidden, model.get_base_model().lm_head.weight, targets, chunk_size=5)
    loss.backward()
    assert n_tokens == ref_n == (9 - 2) + (6 - 2) + (12 - 2)  # each example: length minus its 2 prompt tokens
    assert _rel_err(loss.detach(), ref_loss.detach()) < 1e-6
    grads = _lora_grads(model)
    for name, ref in ref_grads.items():
        assert _rel_err(grads[name], ref) < 1e-5, name


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_loss_equals_full_cross_entropy_including_weight_grad(chunk_size):
    """Against torch's CE on full logits, weight trainable too: loss rel err < 1e-6, grads rel err < 1e-5."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (2, 7), generator=gen)
    targets[0, :3] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t()).reshape(-1, 50), targets.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    ref_gh, ref_gw = torch.autograd.grad(ref, (hidden, weight))
    loss, n_tokens = chunked_causal_lm_loss(hidden, weight, targets, chunk_size=chunk_size)
    gh, gw = torch.autograd.grad(loss * 3.0, (hidden, weight))  # an upstream scale must reach both grads
    assert n_tokens == 11
    assert _rel_err(loss.detach(), ref.detach()) < 1e-6
    assert _rel_err(gh, 3.0 * ref_gh) < 1e-5
    assert _rel_err(gw, 3.0 * ref_gw) < 1e-5
    assert float(gh[0, :3].abs().sum()) == 0.0  # ignored positions get exactly no gradient


def test_packed_loss_equals_padded_hf_loss_and_gradients():
    """Packing (block-diagonal attention from restarting position ids) vs right-padded HF batch.

    Bounds: loss rel err < 1e-5 and LoRA-gradient rel err < 1e-5 (fp32; attention sums in another order).
    """
    model = _tiny_lora_model()
    examples = _examples([5, 11, 3, 8, 7], seed=3)
    ref_loss, ref_n = _hf_padded_loss_sum(model, examples)
    ref_loss.backward()
    ref_grads = _lora_grads(model)
    model.zero_grad(set_to_none=True)

    packed = pack_sequences(examples, max_len=16, pad_token_id=PAD)
    assert packed["input_ids"].shape[0] == 3  # 34 tokens in rows of 16: 11+5, 8+7, 3
    loss, n_tokens = packed_loss_sum(model, packed, chunk_size=7)
    loss.backward()
    assert n_tokens == ref_n
    assert _rel_err(loss.detach(), ref_loss.detach()) < 1e-5
    grads = _lora_grads(model)
    for name, ref in ref_grads.items():
        assert _rel_err(grads[name], ref) < 1e-5, name


def test_packing_isolates_examples():
    """An example's loss does not depend on what it is packed with (a broken mask would leak across)."""
    model = _tiny_lora_model()
    examples = _examples([6, 6], seed=4)
    with torch.no_grad():
        alone, _ = packed_loss_sum(model, pack_sequences(examples[:1], 12, PAD))
        together, _ = packed_loss_sum(model, pack_sequences(examples, 12, PAD))
        other, _ = packed_loss_sum(model, pack_sequences(examples[1:], 12, PAD))
    assert _rel_err(together, alone + other) < 1e-5


def test_fast_trainer_matches_local_trainer(tiny_lora):
    """Two optimizer steps (FedProx mu=0.5) from the same adapter and seed: adapters agree to rel err < 1e-4, eval loss < 1e-5.

    (Adam divides by sqrt(v), so gradient rounding differences are amplified; 1e-4 still catches any wrong
    example, order or normalisation, which move the adapter by O(lr) = 3e-3 relative.)
    """
    from client.trainer import LocalTrainer
    from federation.adapter import get_adapter_arrays, set_adapter_arrays
    from federation.data import load_site_split

    cfg, model, tokenizer, _ = tiny_lora
    train_ds, eval_ds = load_site_split(cfg.data, tokenizer, 0, 2)
    start = get_adapter_arrays(model)
    plain = LocalTrainer(model, tokenizer.pad_token_id, cfg.train)
    halve = lambda params: [p.grad.mul_(0.5) for p in params]  # noqa: E731 (a before_step hook)
    plain_result = plain.train(train_ds, seed=7, proximal_mu=0.5, before_step=halve)
    plain_adapter = get_adapter_arrays(model)
    plain_eval = plain.evaluate(eval_ds)

    set_adapter_arrays(model, start)
    fast = FastLocalTrainer(model, tokenizer.pad_token_id, cfg.train)
    fast_result = fast.train(train_ds, seed=7, proximal_mu=0.5, before_step=halve)
    fast_adapter = get_adapter_arrays(model)
    fast_eval = fast.evaluate(eval_ds)

    assert (fast_result.steps, fast_result.target_tokens, fast_result.input_tokens) == (
        plain_result.steps, plain_result.target_tokens, plain_result.input_tokens)
    assert abs(fast_result.train_loss - plain_result.train_loss) < 1e-5 * plain_result.train_loss
    moved = sum(float(((plain_adapter[k] - start[k]) ** 2).sum()) for k in start) ** 0.5
    assert moved > 0
    diff = sum(float(((fast_adapter[k] - plain_adapter[k]) ** 2).sum()) for k in start) ** 0.5
    norm = sum(float((plain_adapter[k] ** 2).sum()) for k in start) ** 0.5
    assert diff / norm < 1e-4
    assert fast_eval.num_tokens == plain_eval.num_tokens
    assert abs(fast_eval.loss - plain_eval.loss) < 1e-5 * plain_eval.loss


def test_fast_trainer_keeps_local_trainer_signatures():
    """client/app.py calls either trainer the same way; this fails when LocalTrainer's API moves on alone."""
    import inspect

    from client.trainer import LocalTrainer

    for name in ("train", "evaluate"):
        assert inspect.signature(getattr(FastLocalTrainer, name)) == inspect.signature(getattr(LocalTrainer, name))


@pytest.mark.parametrize("schedule,last_lr", [("cosine", 0.0), ("linear", 0.0), ("constant", 1.0)])
def test_lr_schedule_warms_up_linearly_then_follows_train_lr_schedule(schedule, last_lr):
    from client.trainer import make_lr_scheduler
    from federation.config import TrainConfig

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = make_lr_scheduler(optimizer, TrainConfig(lr=1.0, warmup_ratio=0.2, lr_schedule=schedule), steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])  # 2 warm-up steps
    assert optimizer.param_groups[0]["lr"] == pytest.approx(last_lr)
    if schedule == "cosine":
        assert lrs[6] == pytest.approx(0.5)  # half-way through the 8 decay steps


def test_host_to_device_keeps_values_and_leaves_cpu_tensors_alone():
    ids = torch.arange(12).reshape(3, 4)
    assert host_to_device(ids, torch.device("cpu")) is ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_host_to_device_does_not_wait_for_queued_work():
    device = torch.device("cuda")
    ids = torch.arange(4096).reshape(8, 512)
    stream = torch.cuda.current_stream(device)
    torch.cuda._sleep(500_000_000)  # ~0.2-0.5 s of GPU spinning queued ahead of the copy
    moved = host_to_device(ids, device)
    still_busy = not stream.query()  # a blocking copy would have returned only after the spin
    assert still_busy
    assert torch.equal(moved.cpu(), ids)


def test_cudnn_attention_auto_follows_the_head_dim_and_true_false_force_it():
    from transformers import LlamaConfig

    from client.fast_train import CUDNN_MIN_HEAD_DIM, cudnn_attention_on
    from federation.compose import compose_config

    wide, narrow = (torch.nn.Module(), torch.nn.Module())
    wide.config = LlamaConfig(hidden_size=CUDNN_MIN_HEAD_DIM * 4, num_attention_heads=4)
    narrow.config = LlamaConfig(hidden_size=CUDNN_MIN_HEAD_DIM * 2, num_attention_heads=4)
    assert cudnn_attention_on("auto", wide) and not cudnn_attention_on("auto", narrow)
    assert not cudnn_attention_on("auto", None)
    for value in ("true", True):
        assert cudnn_attention_on(value, narrow)
    for value in ("false", False):
        assert not cudnn_attention_on(value, wide)
    assert cudnn_attention_on(compose_config(["train.cudnn_attention=true"]).train.cudnn_attention, narrow)
    assert compose_config([]).train.cudnn_attention == "auto"
