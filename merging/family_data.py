"""Generated domain data for the embedded model family (instruct, math, code).

Each domain is a small grammar of prompts with one correct answer, so the children learn a narrow, checkable
skill in minutes of CPU fine-tuning, and the behaviour stage can score the same skill on items the children never
saw. Train and held-out items are split by a hash of the prompt text: a prompt lands in exactly one split whatever
seed or sample size asks for it, so no held-out item can leak into fine-tuning.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Literal

Split = Literal["train", "heldout"]
DOMAINS = ("instruct", "math", "code")
HELDOUT_FRACTION = 0.2

_NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Lev", "Mia", "Ned",
          "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tia", "Uma", "Vic", "Wes", "Yara", "Zoe"]
_OBJECTS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells", "stickers", "cookies",
            "balloons", "buttons", "candles", "tickets", "flowers", "rocks"]
_WORDS = ["river", "cloud", "apple", "stone", "green", "happy", "light", "music", "table", "tiger", "water",
          "dream", "house", "paper", "smile", "train", "window", "garden", "silver", "orange", "winter", "pocket"]
_SENTENCES = ["the cat sat on the warm mat", "we walked home after the long game", "she reads a book every night",
              "the old train left the station early", "my brother plays the piano well",
              "birds sing in the tall trees", "he painted the fence bright blue", "they baked bread for the party",
              "a small boat crossed the quiet lake", "the children laughed at the clown"]


@dataclass(frozen=True)
class Example:
    """One prompt with its single correct answer (the answer starts with a space, as a continuation)."""

    domain: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to, fixed by its text alone."""
    bucket = hashlib.sha256(prompt.encode()).digest()[0] / 256
    return "heldout" if bucket < HELDOUT_FRACTION else "train"


def _math(rng: random.Random) -> tuple[str, str]:
    name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 39)
        question = f"{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?"
        work, result = f"{a} + {b}", a + b
    elif kind == "sub":
        a = rng.randint(10, 80)
        b = rng.randint(1, a - 1)
        question = f"{name} has {a} {obj} and gives away {b}. How many {obj} does {name} have left?"
        work, result = f"{a} - {b}", a - b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question = f"{name} fills {a} boxes with {b} {obj} each. How many {obj} are there in total?"
        work, result = f"{a} * {b}", a * b
    return f"Question: {question}\nAnswer:", f" {work} = {result}. The answer is {result}."


def _instruct(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["repeat", "count", "larger", "last", "sort"])
    if kind == "repeat":
        word, k = rng.choice(_WORDS), rng.randint(2, 4)
        instruction, response = f"Repeat the word '{word}' {k} times.", " ".join([word] * k)
    elif kind == "count":
        start = rng.randint(1, 40)
        stop = start + rng.randint(2, 5)
        instruction = f"List the numbers from {start} to {stop}."
        response = ", ".join(str(i) for i in range(start, stop + 1))
    elif kind == "larger":
        x, y = rng.sample(range(1, 100), 2)
        instruction, response = f"Which number is larger: {x} or {y}?", str(max(x, y))
    elif kind == "last":
        sentence = rng.choice(_SENTENCES)
        instruction, response = f"What is the last word of this sentence: '{sentence}'?", sentence.split()[-1]
    else:
        words = rng.sample(_WORDS, 3)
        instruction = f"Put these words in alphabetical order: {', '.join(words)}."
        response = ", ".join(sorted(words))
    return f"Instruction: {instruction}\nResponse:", f" {response}"


_FUNCTION_NAMES = ["compute", "solve", "transform", "helper", "process", "calculate", "evaluate", "apply"]
_CODE_TEMPLATES: list[Callable[[random.Random, int], tuple[str, str, str]]] = [
    lambda rng, k: ("a, b", "Return the sum of a and b.", "a + b"),
    lambda rng, k: ("x", f"Return x multiplied by {k}.", f"x * {k}"),
    lambda rng, k: ("items", "Return the first element of items.", "items[0]"),
    lambda rng, k: ("items", f"Return the last {k} elements of items.", f"items[-{k}:]"),
    lambda rng, k: ("text", "Return text in upper case.", "text.upper()"),
    lambda rng, k: ("n", "Return True if n is even.", "n % 2 == 0"),
    lambda rng, k: ("values", f"Return how many values are greater than {k}.", f"sum(1 for v in values if v > {k})"),
    lambda rng, k: ("numbers", "Return the squares of numbers as a list.", "[n * n for n in numbers]"),
    lambda rng, k: ("values", "Return the largest of values.", "max(values)"),
    lambda rng, k: ("s", f"Return s repeated {k} times.", f"s * {k}"),
    lambda rng, k: ("words", "Return the words joined by single spaces.", "' '.join(words)"),
    lambda rng, k: ("x", f"Return x plus {k}.", f"x + {k}"),
]


def _code(rng: random.Random) -> tuple[str, str]:
    template = rng.choice(_CODE_TEMPLATES)
    args, doc, body = template(rng, rng.randint(2, 12))
    name = f"{rng.choice(_FUNCTION_NAMES)}_{rng.randint(1, 99)}"
    return f'def {name}({args}):\n    """{doc}"""', f"\n    return {body}"


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "instruct": _instruct, "math": _math, "code": _code,
}


def examples(domain: str, split: Split, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct examples of `domain` from `split`, deterministic in (domain, split, n, seed)."""
    if domain not in _GENERATORS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    rng = random.Random(f"{domain}/{split}/{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    for _ in range(n * 200):
        prompt, answer = _GENERATORS[domain](rng)
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        out.append(Example(domain, prompt, answer))
        if len(out) == n:
            return out
    raise ValueError(f"domain {domain!r} has fewer than {n} distinct {split} prompts")
