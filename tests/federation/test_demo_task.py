import re
import string

import pytest

from federation.config import DemoTaskConfig
from federation.data import format_example, tokenize_example
from federation.demo_task import generate_demo_task
from federation.tokenizer import build_char_tokenizer

SKILLS = ["reverse", "uppercase", "add", "vowels", "length", "parity", "sign", "compare"]


def small_cfg(**overrides):
    values = dict(skills=list(SKILLS), examples_per_skill=40, eval_examples_per_skill=10, seed=3)
    values.update(overrides)
    return DemoTaskConfig(**values)


def test_deterministic_and_seed_dependent():
    assert generate_demo_task(small_cfg()) == generate_demo_task(small_cfg())
    assert generate_demo_task(small_cfg()) != generate_demo_task(small_cfg(seed=4))


def test_counts_sources_and_record_shape():
    train, held_out = generate_demo_task(small_cfg())
    assert len(train) == len(SKILLS) * 40 and len(held_out) == len(SKILLS) * 10
    for skill in SKILLS:
        assert sum(r["source"] == skill for r in train) == 40
        assert sum(r["source"] == skill for r in held_out) == 10
    assert all(set(r) == {"instruction", "input", "output", "source"} and r["input"] == "" for r in train + held_out)


def test_eval_is_held_out_and_no_duplicates():
    train, held_out = generate_demo_task(small_cfg())
    train_keys = [(r["instruction"], r["input"]) for r in train]
    eval_keys = [(r["instruction"], r["input"]) for r in held_out]
    assert len(set(train_keys)) == len(train_keys)
    assert len(set(eval_keys)) == len(eval_keys)
    assert not set(train_keys) & set(eval_keys)


def test_answers_are_correct():
    train, held_out = generate_demo_task(small_cfg())
    for record in train + held_out:
        skill, argument = record["instruction"].split(": ")
        output = record["output"]
        if record["source"] in ("parity", "sign", "compare"):
            numbers = [int(x) for x in argument.split()]
            if record["source"] == "parity":
                assert skill == "Parity" and output == ("odd" if numbers[0] % 2 else "even")
            elif record["source"] == "sign":
                assert skill == "Sign" and numbers[0] != 0 and output == ("negative" if numbers[0] < 0 else "positive")
            else:
                assert skill == "Compare" and numbers[0] != numbers[1]
                assert output == ("less" if numbers[0] < numbers[1] else "more")
            continue
        if record["source"] == "add":
            left, right = (int(x) for x in argument.split("+"))
            assert 0 <= left <= 99 and 0 <= right <= 99 and output == str(left + right)
            continue
        assert re.fullmatch(r"[a-z]{3,7}", argument)
        if record["source"] == "reverse":
            assert skill == "Reverse" and output == argument[::-1]
        elif record["source"] == "length":
            assert skill == "Length" and output == str(len(argument))
        elif record["source"] == "uppercase":
            assert skill == "Uppercase" and output == argument.upper()
        else:
            assert skill == "Count vowels" and output == str(sum(c in "aeiou" for c in argument))


def test_answer_distributions_differ_between_skills():
    train, _ = generate_demo_task(small_cfg())
    outputs = {skill: [r["output"] for r in train if r["source"] == skill] for skill in SKILLS}
    assert all(set(o) <= set(string.ascii_lowercase) for o in outputs["reverse"])
    assert all(set(o) <= set(string.ascii_uppercase) for o in outputs["uppercase"])
    assert all(len(o) == 1 and o.isdigit() for o in outputs["vowels"])
    # Sums of two numbers in 0..99 are below 10 in only 55 of 10000 draws.
    assert sum(len(o) >= 2 for o in outputs["add"]) >= 36
    assert set(outputs["length"]) <= set("34567")
    # The binary skills give both answers (no constant-answer skill), each its own pair of words.
    assert set(outputs["parity"]) == {"even", "odd"}
    assert set(outputs["sign"]) == {"negative", "positive"}
    assert set(outputs["compare"]) == {"less", "more"}


def test_default_skills_have_pairwise_disjoint_answers():
    """A site trained on one default skill cannot score on another skill's held-out answers by its format alone."""
    default_skills = DemoTaskConfig().skills
    train, held_out = generate_demo_task(small_cfg(skills=default_skills))
    answers = {skill: {r["output"] for r in train + held_out if r["source"] == skill} for skill in default_skills}
    for skill in default_skills:
        others = set().union(*(answers[other] for other in default_skills if other != skill))
        assert not answers[skill] & others, skill


def test_skill_examples_do_not_depend_on_other_skills():
    alone, _ = generate_demo_task(small_cfg(skills=["add"]))
    together, _ = generate_demo_task(small_cfg(skills=["vowels", "add"]))
    assert alone == [r for r in together if r["source"] == "add"]


def test_unknown_skill_lists_supported():
    supported = "supported.*add.*compare.*length.*parity.*reverse.*sign.*uppercase.*vowels"
    with pytest.raises(ValueError, match=supported):
        generate_demo_task(small_cfg(skills=["reverse", "juggle"]))


def test_formatted_examples_fit_in_96_tokens_untruncated():
    tokenizer = build_char_tokenizer()
    train, held_out = generate_demo_task(small_cfg())
    for record in train + held_out:
        prompt, response = format_example(record, tokenizer, "chat_template")
        assert len(prompt + response) <= 96  # one token per character, "</s>" is one of 4 characters
        tokens = tokenize_example(prompt, response, tokenizer, max_seq_len=96)
        assert tokenizer.decode(tokens["input_ids"]) == prompt + response
