"""The coordinator's own scoring of each round's global adapter on a set it holds (eval.gold_set).

Only when a gold set is given does the coordinator load base weights (lazily, on the first round it scores);
otherwise it never does. The numbers are the sites' (federation/evaluation.py): loss, perplexity, and the
exact match / token F1 / ROUGE-L of greedy answers in generation rounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from federation.config import RunConfig


class GoldSetScorer:
    """Scores global adapters on cfg.eval.gold_set; the model and the tokenized set are loaded on first use."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.model = self.tokenizer = self.dataset = None

    def _load(self) -> None:
        from peft import get_peft_model

        from federation.data import SiteDataset
        from federation.model import load_base_model, load_tokenizer, model_source, peft_lora_config

        base, _, _ = load_base_model(self.cfg.model)
        self.model = get_peft_model(base, peft_lora_config(self.cfg.lora, model_source(self.cfg.model)))
        self.tokenizer = load_tokenizer(self.cfg.model)
        self.dataset = SiteDataset.from_jsonl(self.cfg.eval.gold_set, self.tokenizer, self.cfg.data)

    def score(self, adapter: dict[str, np.ndarray], server_round: int) -> dict[str, Any]:
        """The gold_* columns of a metrics.jsonl row for this round's global adapter."""
        from federation.adapter import set_adapter_arrays
        from federation.evaluation import evaluate_generation, generation_due, mean_token_loss
        from federation.text_metrics import perplexity

        if self.model is None:
            self._load()
        set_adapter_arrays(self.model, adapter)
        loss, _ = mean_token_loss(self.model, self.dataset, self.tokenizer.pad_token_id,
                                  self.cfg.train.eval_batch_size)
        columns: dict[str, Any] = {"gold_loss": loss, "gold_perplexity": perplexity(loss),
                                   "gold_examples": len(self.dataset)}
        if generation_due(self.cfg.eval, server_round, self.cfg.federation.rounds):
            scores = evaluate_generation(self.model, self.tokenizer, self.dataset, self.cfg.eval).scores
            columns.update({f"gold_{name}": value for name, value in scores.means().items()})
            columns["gold_generated"] = scores.count
        return columns
