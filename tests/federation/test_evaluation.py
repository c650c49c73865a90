"""client/evaluation.py: prompts from the label mask, batched left-padded greedy decoding, sampling, schedule."""

import pytest
import torch

from federation.evaluation import (evaluate_generation, generate_answers, generation_due, prompt_and_reference,
                               sample_indices)
from federation.compose import compose_config
from federation.config import EvalConfig
from federation.data import SiteDataset
from federation.model import build_lora_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = compose_config([f"model.cache_dir={tmp_path_factory.mktemp('models')}"])
    model, tokenizer, _ = build_lora_model(cfg.model, cfg.lora)
    # Non-zero LoRA B so the adapter changes the answers (a fresh adapter is the base model).
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    return cfg, model, tokenizer


RECORDS = [{"instruction": "Reverse: abc", "output": "cba"}, {"instruction": "Add: 2+30", "output": "32"},
           {"instruction": "Count vowels: banana", "output": "3"}, {"text": "plain text has no prompt"}]


def test_prompt_is_the_masked_prefix_and_reference_the_response(tiny):
    cfg, _, tokenizer = tiny
    dataset = SiteDataset(RECORDS, tokenizer, 96)
    prompt, reference = prompt_and_reference(dataset[0], tokenizer)
    assert tokenizer.decode(prompt) == "<|user|>\nReverse: abc\n<|assistant|>\n"
    assert reference == "cba"
    assert prompt_and_reference(dataset[3], tokenizer) is None  # plain text: nothing to answer


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny):
    cfg, model, tokenizer = tiny
    dataset = SiteDataset(RECORDS[:3], tokenizer, 96)
    prompts = [prompt_and_reference(dataset[i], tokenizer)[0] for i in range(3)]
    batched, generated = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0][0] for p in prompts]
    assert batched == single
    assert 3 <= generated <= 18
    # And the same as a hand-written greedy loop without the KV cache.
    ids = torch.tensor([prompts[1]])
    for _ in range(6):
        next_id = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        if next_id == tokenizer.eos_token_id:
            break
    assert tokenizer.decode(ids[0, len(prompts[1]):], skip_special_tokens=True).strip() == batched[1]


def test_evaluate_generation_scores_the_sample_and_skips_prompts_without_answers(tiny):
    cfg, model, tokenizer = tiny
    dataset = SiteDataset(RECORDS, tokenizer, 96)
    result = evaluate_generation(model, tokenizer, dataset, EvalConfig(max_new_tokens=4), keep_texts=True)
    assert result.scores.count == 3 and result.references == ["cba", "32", "3"]
    expected = sum(float(p.lower() == r) for p, r in zip(result.predictions, result.references))
    assert result.scores.exact_match_sum == expected
    assert evaluate_generation(model, tokenizer, dataset, EvalConfig(max_examples=2)).scores.count <= 2


def test_sample_is_seeded_sorted_and_stable():
    assert sample_indices(10, 0, 1) == list(range(10)) == sample_indices(10, 20, 1)
    sample = sample_indices(100, 7, 3)
    assert sample == sorted(sample) and len(set(sample)) == 7 and sample == sample_indices(100, 7, 3)


def test_generation_rounds():
    cfg = EvalConfig(every_n_rounds=3)
    assert [r for r in range(8) if generation_due(cfg, r, 7)] == [0, 3, 6, 7]
    assert not generation_due(EvalConfig(generate=False), 0, 7)


def test_mean_token_loss_is_the_trainers_eval_loss(tiny):
    from client.trainer import LocalTrainer
    from federation.evaluation import mean_token_loss

    cfg, model, tokenizer = tiny
    dataset = SiteDataset(RECORDS, tokenizer, 96)
    loss, tokens = mean_token_loss(model, dataset, tokenizer.pad_token_id, batch_size=3)
    expected = LocalTrainer(model, tokenizer.pad_token_id, cfg.train).evaluate(dataset)
    assert loss == pytest.approx(expected.loss, rel=1e-6) and tokens == expected.num_tokens
