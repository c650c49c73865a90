"""Local DP-SGD with Opacus on a tiny LoRA Llama: per-example gradients, training, accounting across rounds."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from federation.dp_sgd import _noise_only_step, dp_train_steps, make_dp_sgd, per_sequence_causal_lm_loss
from federation.privacy import calibrate_noise_multiplier, central_dp_epsilon, freeze_lora_A

VOCAB, SEQ_LEN, NUM_EXAMPLES, BATCH_SIZE = 128, 12, 32, 8
SAMPLE_RATE = BATCH_SIZE / NUM_EXAMPLES  # Opacus uses 1 / len(loader)
DELTA = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class TokenDataset(Dataset):
    """Random token sequences; the first 3 positions are prompt (-100) and some are right-padded."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=gen)
        self.labels = self.input_ids.clone()
        self.labels[:, :3] = -100
        self.attention_mask = torch.ones_like(self.input_ids)
        for i in range(0, n, 3):
            self.attention_mask[i, SEQ_LEN - 2 - i % 4 :] = 0
        self.labels[self.attention_mask == 0] = -100

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "attention_mask": self.attention_mask[i]}


def tiny_lora_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    # Non-zero B so that the A matrices get real gradients as well.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.05)
    return model


def setup_dp(model, noise_multiplier=1.0, **kwargs):
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(TokenDataset(NUM_EXAMPLES), batch_size=BATCH_SIZE)
    return make_dp_sgd(model, torch.optim.SGD(params, lr=0.05), loader, max_grad_norm=1.0,
                       noise_multiplier=noise_multiplier, **kwargs)


def test_per_sequence_loss_is_token_mean_per_sequence():
    logits = torch.zeros(2, 3, 4)  # uniform: every token costs log(4)
    labels = torch.tensor([[5, 1, 2], [5, -100, -100]])
    loss = per_sequence_causal_lm_loss(logits, labels)
    assert torch.allclose(loss, torch.tensor([math.log(4), 0.0]))


def test_opacus_hooks_give_exact_per_example_gradients_for_peft_lora():
    model = tiny_lora_model()
    data = TokenDataset(6)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reference = []
    for i in range(6):
        model.zero_grad()
        logits = model(input_ids=data.input_ids[i : i + 1], attention_mask=data.attention_mask[i : i + 1]).logits
        per_sequence_causal_lm_loss(logits, data.labels[i : i + 1]).mean().backward()
        reference.append([p.grad.clone() for _, p in params])
    model.zero_grad()

    setup = setup_dp(model)
    logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    per_sequence_causal_lm_loss(logits, data.labels).mean().backward()
    assert {n for n, p in params if p.grad_sample is not None} == {n for n, _ in params}
    for k, (name, param) in enumerate(params):
        assert param.grad_sample.shape == (6, *param.shape), name
        for i in range(6):
            torch.testing.assert_close(param.grad_sample[i], reference[i][k], rtol=1e-4, atol=1e-6)
    setup.close()
    assert not hasattr(params[0][1], "grad_sample")


def test_dp_sgd_trains_only_lora_and_epsilon_grows():
    torch.manual_seed(0)
    model = tiny_lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    setup = setup_dp(model)

    losses = dp_train_steps(setup, 3)
    assert any(math.isfinite(x) for x in losses) and not any(math.isinf(x) for x in losses)
    eps_3 = setup.epsilon(DELTA)
    assert math.isfinite(eps_3) and eps_3 > 0
    dp_train_steps(setup, 2)
    eps_5 = setup.epsilon(DELTA)
    assert eps_5 > eps_3
    assert eps_5 == pytest.approx(central_dp_epsilon(1.0, SAMPLE_RATE, 5, DELTA), rel=1e-12)

    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (".lora_A." in name or ".lora_B." in name), name
    setup.close()


def test_accountant_history_carries_over_rounds():
    torch.manual_seed(0)
    model = tiny_lora_model()
    round_1 = setup_dp(model, noise_multiplier=1.5)
    dp_train_steps(round_1, 3)
    eps_1 = round_1.epsilon(DELTA)
    state = round_1.close()
    assert state["history"] == [[1.5, SAMPLE_RATE, 3]]

    # A new round: new optimizer and hooks, same site accountant.
    round_2 = setup_dp(model, noise_multiplier=1.5, accountant_state=state)
    assert round_2.epsilon(DELTA) == eps_1
    dp_train_steps(round_2, 3)
    assert round_2.accountant_state()["history"] == [[1.5, SAMPLE_RATE, 6]]
    assert round_2.epsilon(DELTA) == pytest.approx(central_dp_epsilon(1.5, SAMPLE_RATE, 6, DELTA), rel=1e-12)
    assert round_2.epsilon(DELTA) > eps_1
    round_2.close()

    # Without the carried state the budget would (wrongly) restart at zero.
    fresh = setup_dp(model, noise_multiplier=1.5)
    assert fresh.epsilon(DELTA) == 0
    fresh.close()


def test_target_epsilon_is_calibrated_over_all_rounds():
    torch.manual_seed(0)
    model = tiny_lora_model()
    total_steps, target = 4, 8.0
    setup = setup_dp(model, noise_multiplier=None, target_epsilon=target, target_delta=DELTA, total_steps=total_steps)
    sigma = setup.optimizer.noise_multiplier
    assert sigma == calibrate_noise_multiplier(target, DELTA, SAMPLE_RATE, total_steps)
    setup.close()
    state = None
    for _ in range(2):  # two rounds of two steps
        setup = setup_dp(model, noise_multiplier=None, target_epsilon=target, target_delta=DELTA,
                         total_steps=total_steps, accountant_state=state)
        dp_train_steps(setup, total_steps // 2)
        state = setup.close()
    spent = setup.epsilon(DELTA)
    assert target - 0.05 <= spent <= target


def test_empty_poisson_batch_still_takes_a_noisy_step():
    torch.manual_seed(0)
    model = tiny_lora_model()
    setup = setup_dp(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _noise_only_step(setup.optimizer)
    assert setup.accountant_state()["history"] == [[1.0, SAMPLE_RATE, 1]]
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if p.requires_grad)
    setup.close()


def test_ffa_lora_with_dp_sgd_keeps_A_at_init():
    torch.manual_seed(0)
    model = tiny_lora_model()
    freeze_lora_A(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    setup = setup_dp(model)
    dp_train_steps(setup, 2)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]) == (".lora_B." not in name), name
    setup.close()


def _poisson_batches(setup, steps=8):
    """Index lists of the next `steps` Poisson batches (the sampler yields len(loader) per pass)."""
    batches: list[list[int]] = []
    while len(batches) < steps:
        batches += list(setup.data_loader.batch_sampler)
    return batches[:steps]


def test_poisson_sampling_and_noise_cannot_be_replayed_from_any_seed():
    # Everything a replaying coordinator controls is identical: model init, data, the global torch seed.
    setups, params = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = tiny_lora_model(seed=0)
        setup = setup_dp(model)
        _noise_only_step(setup.optimizer)  # zero gradients: the step is the noise alone
        params.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        setups.append(setup)
    assert all(not torch.equal(params[0][n], params[1][n]) for n in params[0])
    torch.manual_seed(0)
    first = _poisson_batches(setups[0])
    torch.manual_seed(0)
    second = _poisson_batches(setups[1])
    assert first != second
    # Still Poisson sampling at rate 1 / len(loader): about BATCH_SIZE examples per batch.
    sizes = [len(batch) for batch in _poisson_batches(setups[0], 200)]
    assert abs(sum(sizes) / len(sizes) - BATCH_SIZE) < 5 * math.sqrt(BATCH_SIZE * (1 - SAMPLE_RATE) / len(sizes))
    for setup in setups:
        setup.close()


def test_the_log_says_once_that_dp_sgd_randomness_is_not_reproducible(monkeypatch, caplog):
    import federation.dp_sgd as dp_sgd

    monkeypatch.setattr(dp_sgd, "_announced_os_entropy", False)
    model = tiny_lora_model()
    with caplog.at_level(logging.INFO, logger="fedtune.dp_sgd"):
        for _ in range(2):  # two rounds
            setup_dp(model).close()
    assert sum("not reproducible by design" in r.getMessage() for r in caplog.records) == 1


def test_rejects_gradient_checkpointing_and_ambiguous_noise():
    model = tiny_lora_model()
    model.base_model.model.gradient_checkpointing_enable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="gradient_checkpointing"):
            setup_dp(model)
    with pytest.raises(ValueError, match="exactly one"):
        setup_dp(tiny_lora_model(), noise_multiplier=1.0, target_epsilon=1.0)


def test_empty_first_poisson_batch_is_a_noise_only_step(monkeypatch):
    """CI caught this one: when Poisson sampling draws an empty *first* batch, Opacus's collate has no batch to copy
    the structure from and yields a list of zero-length tensors instead of our dict. The site must still take the
    noise-only step, not fail the round."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    drawn = UniformWithReplacementSampler.__iter__

    def empty_first(self):
        yield []
        yield from drawn(self)

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", empty_first)
    torch.manual_seed(0)
    model = tiny_lora_model()
    setup = setup_dp(model)
    losses = dp_train_steps(setup, 3)
    assert math.isnan(losses[0]) and all(math.isfinite(loss) for loss in losses[1:])
    assert setup.accountant_state()["history"] == [[1.0, SAMPLE_RATE, 3]]
    setup.close()
