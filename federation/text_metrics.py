"""Scores of generated answers against reference answers: exact match, token F1, ROUGE-L, and perplexity.

Pure functions on strings. Exact match and token F1 follow the SQuAD v1.1 evaluation script (answers are
normalised: lowercase, punctuation and the articles a/an/the removed, whitespace collapsed); ROUGE-L is the
F-measure of Google's maintained `rouge-score` package. Sites send only the sums and counts of
`GenerationScores` (never a text), which add up exactly across sites.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
# exp() of a loss above this overflows float64; such a perplexity is reported as this bound's exp (~1e304).
MAX_LOG_PERPLEXITY = 700.0


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of the normalised whitespace tokens (bag of words); 1.0 when both are empty."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    import logging

    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # its "Using default tokenizer." on every scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of rouge-score's lowercase alphanumeric tokens)."""
    return float(_rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure)


def perplexity(mean_token_loss: float) -> float:
    """exp(mean next-token cross-entropy in nats); capped at exp(MAX_LOG_PERPLEXITY) instead of overflowing."""
    return math.exp(min(float(mean_token_loss), MAX_LOG_PERPLEXITY))


@dataclass
class GenerationScores:
    """Summed per-example scores over `count` generated answers; add two to pool sites exactly."""

    count: int = 0
    exact_match_sum: float = 0.0
    token_f1_sum: float = 0.0
    rouge_l_sum: float = 0.0

    def add(self, prediction: str, reference: str) -> None:
        """Score one generated answer against its reference."""
        self.count += 1
        self.exact_match_sum += exact_match(prediction, reference)
        self.token_f1_sum += token_f1(prediction, reference)
        self.rouge_l_sum += rouge_l(prediction, reference)

    def __add__(self, other: GenerationScores) -> GenerationScores:
        return GenerationScores(self.count + other.count, self.exact_match_sum + other.exact_match_sum,
                                self.token_f1_sum + other.token_f1_sum, self.rouge_l_sum + other.rouge_l_sum)

    def means(self) -> dict[str, float]:
        """{"exact_match", "token_f1", "rouge_l"}: per-example means in [0, 1] (empty dict when count is 0)."""
        if self.count == 0:
            return {}
        return {"exact_match": self.exact_match_sum / self.count, "token_f1": self.token_f1_sum / self.count,
                "rouge_l": self.rouge_l_sum / self.count}


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> GenerationScores:
    """The summed scores of predictions[i] against references[i]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores = GenerationScores()
    for prediction, reference in zip(predictions, references):
        scores.add(prediction, reference)
    return scores
