"""The built-in offline task: each skill is a different source with its own answer distribution.

The default skills are ones the tiny random-init model (conf/model/tiny.yaml) learns with LoRA in a CPU demo's
budget, each answered from the input and each with answers no other skill gives: a word's length (a digit 3-7),
a number's parity (even/odd), a number's sign (negative/positive) and the order of two numbers (less/more). A
site holding one skill can score at most that skill's share of the union of held-out examples; a federation of
single-skill sites learns all of them. The older skills (reverse, uppercase, add, vowels) stay selectable by
name; on the tiny model they are not learned beyond each skill's most common answer (README, "The demo task").
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from federation.config import DemoTaskConfig

WORD_MIN_LETTERS = 3
WORD_MAX_LETTERS = 7
ADDEND_MAX = 99
NUMBER_MAX = 999
COMPARED_MAX = 99
VOWELS = "aeiou"
# Give up drawing distinct examples after this many draws per example asked for (the skill's space is
# too small for the requested counts).
MAX_DRAWS_PER_EXAMPLE = 100


def _random_word(rng: random.Random) -> str:
    length = rng.randint(WORD_MIN_LETTERS, WORD_MAX_LETTERS)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _random_word(rng)
    return f"Reverse: {word}", word[::-1]


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = _random_word(rng)
    return f"Uppercase: {word}", word.upper()


def _add(rng: random.Random) -> tuple[str, str]:
    left, right = rng.randint(0, ADDEND_MAX), rng.randint(0, ADDEND_MAX)
    return f"Add: {left}+{right}", str(left + right)


def _vowels(rng: random.Random) -> tuple[str, str]:
    word = _random_word(rng)
    return f"Count vowels: {word}", str(sum(char in VOWELS for char in word))


def _length(rng: random.Random) -> tuple[str, str]:
    word = _random_word(rng)
    return f"Length: {word}", str(len(word))


def _parity(rng: random.Random) -> tuple[str, str]:
    number = rng.randint(0, NUMBER_MAX)
    return f"Parity: {number}", "even" if number % 2 == 0 else "odd"


def _sign(rng: random.Random) -> tuple[str, str]:
    number = rng.randint(1, NUMBER_MAX)
    if rng.random() < 0.5:
        return f"Sign: -{number}", "negative"
    return f"Sign: {number}", "positive"


def _compare(rng: random.Random) -> tuple[str, str]:
    left, right = rng.sample(range(COMPARED_MAX + 1), 2)  # distinct: the answer is never a tie
    return f"Compare: {left} {right}", "less" if left < right else "more"


SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse,
    "uppercase": _uppercase,
    "add": _add,
    "vowels": _vowels,
    "length": _length,
    "parity": _parity,
    "sign": _sign,
    "compare": _compare,
}


def _skill_examples(skill: str, count: int, seed: int) -> list[tuple[str, str]]:
    """`count` distinct (instruction, output) pairs of one skill, in draw order."""
    # A per-skill stream: adding or reordering skills does not change another skill's examples.
    rng = random.Random(f"{seed}:{skill}")
    examples: dict[str, str] = {}
    for _ in range(count * MAX_DRAWS_PER_EXAMPLE):
        if len(examples) == count:
            break
        instruction, output = SKILLS[skill](rng)
        examples.setdefault(instruction, output)
    if len(examples) < count:
        raise ValueError(f"skill {skill!r} cannot produce {count} distinct examples (got {len(examples)})")
    return list(examples.items())


def generate_demo_task(cfg: DemoTaskConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) alpaca records {"instruction", "input": "", "output", "source": skill}; eval is held out."""
    unknown = [skill for skill in cfg.skills if skill not in SKILLS]
    if unknown:
        raise ValueError(f"unknown demo skill(s) {unknown}; supported: {sorted(SKILLS)}")
    if len(set(cfg.skills)) != len(cfg.skills):
        raise ValueError(f"demo skills must be distinct, got {list(cfg.skills)}")
    if cfg.examples_per_skill < 1 or cfg.eval_examples_per_skill < 0:
        raise ValueError(
            f"need examples_per_skill >= 1 and eval_examples_per_skill >= 0, got "
            f"{cfg.examples_per_skill} and {cfg.eval_examples_per_skill}"
        )
    train: list[dict] = []
    held_out: list[dict] = []
    for skill in cfg.skills:
        examples = _skill_examples(skill, cfg.examples_per_skill + cfg.eval_examples_per_skill, cfg.seed)
        records = [
            {"instruction": instruction, "input": "", "output": output, "source": skill}
            for instruction, output in examples
        ]
        # Instructions are distinct within a skill and prefixed by it, so eval never repeats a train example.
        train.extend(records[: cfg.examples_per_skill])
        held_out.extend(records[cfg.examples_per_skill :])
    return train, held_out
