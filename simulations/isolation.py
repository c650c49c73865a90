"""Baseline for the demo task: one site training alone, evaluated on the union of all sites' held-out data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from federation.evaluation import evaluate_generation
from client.trainer import LocalTrainer
from federation.adapter import set_adapter_arrays
from federation.config import RunConfig
from federation.data import load_site_split, load_union_eval
from federation.model import build_lora_model, initial_adapter


@dataclass
class IsolationResult:
    """A local-only adapter's union eval loss after `steps` optimizer steps."""

    partition_id: int
    steps: int
    union_eval_loss: float
    # exact_match, token_f1, rouge_l of greedy answers to every union eval prompt (empty when eval.generate is off)
    union_scores: dict[str, float] = dataclasses.field(default_factory=dict)


def train_site_alone(cfg: RunConfig, partition_id: int) -> IsolationResult:
    """Train site `partition_id` for rounds x local_steps from the same initial adapter, with no federation."""
    model, tokenizer, _ = build_lora_model(cfg.model, cfg.lora)
    set_adapter_arrays(model, initial_adapter(cfg.model, cfg.lora))
    train_ds, _ = load_site_split(cfg.data, tokenizer, partition_id, cfg.federation.num_clients)
    trainer = LocalTrainer(model, tokenizer.pad_token_id, cfg.train)
    steps = 0
    # Same schedule as in the federation: one warm-up/cosine cycle per round of local_steps.
    for server_round in range(1, cfg.federation.rounds + 1):
        steps += trainer.train(train_ds, seed=cfg.train.seed * 1_000_003 + server_round * 1009 + partition_id).steps
    union = load_union_eval(cfg.data, tokenizer, cfg.federation.num_clients)
    loss = trainer.evaluate(union).loss
    scores = {}
    if cfg.eval.generate:  # every union prompt, as the federation's sites answer all of theirs at max_examples=0
        scores = evaluate_generation(model, tokenizer, union, dataclasses.replace(cfg.eval, max_examples=0)).scores
        scores = scores.means()
    return IsolationResult(partition_id, steps, loss, scores)
