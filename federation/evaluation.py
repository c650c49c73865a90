"""Generation-based evaluation: greedy answers to held-out prompts, scored against the reference responses.

Shared core: used by the ClientApp's evaluate handler (on the resident model, with the round's global adapter),
by `fedtune eval` and by the coordinator's gold set (server/gold_set.py). The prompt of an example is its tokens with label -100 (federation/data.py masks the prompt),
the reference is the decoded response tokens; only the scores' sums and counts leave a site.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from federation import progress
from federation.config import EvalConfig
from federation.data import IGNORE_INDEX, SiteDataset, collate_batch
from federation.text_metrics import GenerationScores, score_answers


@dataclass
class GenerationResult:
    """Scores of the generated answers and what generating them cost."""

    scores: GenerationScores
    generated_tokens: int
    seconds: float
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """New tokens (up to and including eos) generated per wall-clock second."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def batch_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over target tokens, number of target tokens) for one batch (the trainer's too)."""
    device = next(p for p in model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    num_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    # HF's causal-LM loss is the mean over shifted target tokens; scale back to a sum.
    return out.loss.float() * num_tokens, num_tokens


@torch.no_grad()
def mean_token_loss(model, dataset: SiteDataset, pad_token_id: int, batch_size: int) -> tuple[float, int]:
    """(mean next-token cross-entropy over the target tokens, their number), as client/trainer.py's evaluate."""
    model.eval()
    loss_sum, token_sum = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate_batch([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                              pad_token_id)
        summed, tokens = batch_loss_sum(model, batch)
        loss_sum += float(summed)
        token_sum += tokens
    return loss_sum / max(token_sum, 1), token_sum


def generation_due(eval_cfg: EvalConfig, server_round: int, total_rounds: int) -> bool:
    """Whether an evaluate round also generates: every eval.every_n_rounds rounds (round 0 included) and the last."""
    if not eval_cfg.generate:
        return False
    return server_round % eval_cfg.every_n_rounds == 0 or server_round >= total_rounds


def sample_indices(num_examples: int, max_examples: int, seed: int) -> list[int]:
    """A seeded sample of max_examples indices (all when max_examples is 0 or >= num_examples), sorted.

    The same seed gives the same sample every round, so rounds are scored on the same examples.
    """
    if max_examples <= 0 or max_examples >= num_examples:
        return list(range(num_examples))
    chosen = np.random.default_rng(seed).choice(num_examples, size=max_examples, replace=False)
    return sorted(int(i) for i in chosen)


def prompt_and_reference(example: dict[str, torch.Tensor], tokenizer) -> tuple[list[int], str] | None:
    """(prompt ids, reference text) of a tokenized example; None when it has no prompt (plain-text records)."""
    labels = example["labels"].tolist()
    targets = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    prompt_len = targets[0] if targets else len(labels)
    if prompt_len == 0:
        return None
    reference = tokenizer.decode([labels[i] for i in targets], skip_special_tokens=True)
    return example["input_ids"][:prompt_len].tolist(), reference.strip()


def _left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, longest - len(prompt):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     batch_size: int, label: str = "eval") -> tuple[list[str], int]:
    """(greedy answers, new tokens generated) for token-id prompts: batched, left-padded, with the KV cache."""
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    answers, generated = [], 0
    with progress.track(f"{label} generation", len(prompts), "answers", rate_unit="tokens") as bar:
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = _left_padded(prompts[start:start + batch_size], pad)
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                    eos_token_id=eos, pad_token_id=pad)
            batch_generated = 0
            for row in output[:, input_ids.shape[1]:].tolist():
                if eos in row:
                    row = row[:row.index(eos) + 1]
                batch_generated += len(row)
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            generated += batch_generated
            bar.advance(input_ids.shape[0], batch_generated)
    return answers, generated


def evaluate_generation(model, tokenizer, dataset: SiteDataset, eval_cfg: EvalConfig,
                        keep_texts: bool = False, label: str = "eval") -> GenerationResult:
    """Greedy answers to (a sample of eval.max_examples of) `dataset`'s prompts, scored against its references."""
    pairs = [prompt_and_reference(dataset[i], tokenizer)
             for i in sample_indices(len(dataset), eval_cfg.max_examples, eval_cfg.sample_seed)]
    pairs = [pair for pair in pairs if pair is not None]
    start = time.perf_counter()
    if not pairs:
        return GenerationResult(GenerationScores(), 0, 0.0)
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    predictions, generated = generate_answers(model, tokenizer, prompts, eval_cfg.max_new_tokens,
                                              eval_cfg.batch_size, label)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    scores = score_answers(predictions, references)
    if not keep_texts:  # a site never lets texts leave the process; only `fedtune eval` prints them
        return GenerationResult(scores, generated, seconds)
    return GenerationResult(scores, generated, seconds, predictions, references)
