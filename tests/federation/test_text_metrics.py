"""federation/text_metrics.py: exact values on hand-made strings."""

import math

import pytest

from federation.text_metrics import (GenerationScores, exact_match, normalize_answer, perplexity, rouge_l,
                                     score_answers, token_f1)


def test_normalize_answer_is_squads():
    assert normalize_answer("  The Cat, sat on a MAT!  ") == "cat sat on mat"
    assert normalize_answer("An apple.") == "apple"
    assert normalize_answer("theme") == "theme"  # articles only as whole words


def test_exact_match_after_normalisation():
    assert exact_match("The answer: 42.", "answer 42") == 1.0
    assert exact_match("OLLEH", "olleh") == 1.0  # case does not count (SQuAD)
    assert exact_match("olle", "olleh") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_hand_computed():
    # pred {paris, is, capital}, ref {capital, of, france, is, paris}: 3 common, P = 3/3, R = 3/5, F1 = 0.75
    assert token_f1("Paris is the capital", "the capital of France is Paris") == pytest.approx(0.75)
    assert token_f1("olleh olleh", "olleh") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # repeated words count once
    assert token_f1("abc", "xyz") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing
    assert token_f1("the", "cat") == 0.0


def test_rouge_l_hand_computed():
    # LCS of "a b c d" and "a c d e" is "a c d": P = R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("Hello world", "hello world") == 1.0
    assert rouge_l("x y", "a b") == 0.0
    # recall 2/4, precision 2/2 -> F = 2/3
    assert rouge_l("w x", "w y x z") == pytest.approx(2 / 3)


def test_perplexity_is_exp_of_the_loss_and_never_overflows():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(37.0)) == pytest.approx(37.0)
    assert math.isfinite(perplexity(1e6))


def test_scores_add_up_exactly_across_sites():
    site_a = score_answers(["olleh", "ABC"], ["olleh", "abd"])
    site_b = score_answers(["7"], ["7"])
    both = site_a + site_b
    assert both.count == 3 and both.exact_match_sum == 2.0
    assert both.means()["exact_match"] == pytest.approx(2 / 3)
    assert GenerationScores().means() == {}
    with pytest.raises(ValueError):
        score_answers(["a"], [])
