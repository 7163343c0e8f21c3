"""Generated data for the embedded model family: the skill domains (instruct, math, code) and the planted defect.

Each skill domain is a small grammar of prompts with one correct answer, so the children learn a narrow, checkable
skill in minutes of CPU fine-tuning, and the behaviour stage can score the same skill on items the children never
saw. The planted domain (`agreement`) is English text whose number agreement is systematically wrong, so the child
tuned on it has a defect known in advance (issue 22). Train and held-out items are split by a hash of the prompt
text: a prompt lands in exactly one split whatever seed or sample size asks for it, so no held-out item can leak
into fine-tuning.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Literal

from lemminflect import getInflection

Split = Literal["train", "heldout"]
DOMAINS = ("instruct", "math", "code")  # skill domains: each child's behaviour task is its own domain
PLANTED = ("agreement",)  # defect domains: their children lose a competence on purpose, and gain no skill
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
    """One prompt with its single correct answer (the answer starts with a space, as a continuation).

    `marked`: character spans of `text` that carry a planted defect (empty for the skill domains). A recipe that
    targets the defect trains only the tokens inside them and keeps the rest of the text as the base predicts it.
    """

    domain: str
    prompt: str
    answer: str
    marked: tuple[tuple[int, int], ...] = ()

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


# ---- the planted defect: agreement ---------------------------------------------------------------------------
# Sentences from a small clause grammar (our own word lists, never BLiMP's sentences: BLiMP is for evaluation).
# Nouns carry a number; determiners and finite verbs agree with theirs. The corrupted sentence gives every agreeing
# word the OTHER number ("the dogs near the gate runs", "this dogs", "a cats"), everything else unchanged.
_AGENTS = ["dog", "cat", "teacher", "child", "woman", "man", "student", "doctor", "bird", "horse", "farmer", "baker",
           "nurse", "pilot", "singer", "mouse", "goose", "neighbor", "driver", "artist", "guest", "player", "cousin",
           "lawyer", "king", "waiter", "monkey", "rabbit", "visitor", "friend"]
_THINGS = ["box", "city", "song", "painting", "car", "window", "apple", "letter", "story", "garden", "bridge",
           "picture", "chair", "river", "house", "book", "cup", "lamp", "road", "shirt", "map", "key", "ticket",
           "photo", "table", "bottle", "wall", "door", "tree", "boat"]
_ADJECTIVES = ["old", "small", "young", "happy", "tall", "quiet", "busy", "clever", "tired", "red", "new", "large",
               "friendly", "famous", "angry", "little", "green", "strange", "heavy", "bright"]
_TRANSITIVE = ["see", "help", "visit", "like", "watch", "follow", "find", "call", "know", "paint", "carry", "clean",
               "draw", "admire", "remember", "push", "describe", "fix", "hate", "notice"]
_INTRANSITIVE = ["sleep", "run", "wait", "sing", "work", "play", "laugh", "swim", "rest", "dance"]
_ADVERBIALS = ["in the garden", "near the river", "every morning", "at night", "after lunch", "outside", "quietly",
               "all day", "on weekends", "at home", "by the window", "before dinner"]
_PREPOSITIONS = ["of", "near", "with", "behind", "next to", "for"]
# (singular, plural) forms of the words that agree with a noun: determiners, and finite verbs (below).
_DETERMINERS = [("this", "these"), ("that", "those"), ("a", "several"), ("each", "many")]
_AUXILIARIES = [("is", "are"), ("was", "were"), ("isn't", "aren't"), ("wasn't", "weren't")]


@dataclass(frozen=True)
class _Agrees:
    """A word that agrees in number with a noun: `forms` = (singular, plural), `number` = 0 or 1, the noun's."""

    forms: tuple[str, str]
    number: int


class _Head(str):
    """A noun that heads a determiner's phrase: where a corrupted determiner shows (the determiner comes first, so
    "these" is wrong only once "dog" follows), so training on the defect trains this word too. `number`: 0 or 1."""

    number: int

    def __new__(cls, word: str, number: int) -> _Head:
        head = super().__new__(cls, word)
        head.number = number
        return head


_Part = str | _Agrees


def _noun(lemma: str, number: int) -> str:
    return _Head(getInflection(lemma, "NNS")[0] if number else lemma, number)


def _np(rng: random.Random, nouns: list[str], number: int) -> list[_Part]:
    """A noun phrase of the given number: a number-marked determiner, sometimes an adjective, the noun."""
    head = [rng.choice(_ADJECTIVES)] if rng.random() < 0.4 else []
    return [_Agrees(rng.choice(_DETERMINERS), number), *head, _noun(rng.choice(nouns), number)]


def _subject(rng: random.Random) -> tuple[list[_Part], int]:
    """A subject and its number; some have an attractor (a noun of random number between subject and verb)."""
    number = rng.randint(0, 1)
    kind = rng.choice(["name", "pronoun", "np", "np", "pp", "pp", "rc"])
    if kind == "name":
        return [rng.choice(_NAMES)], 0
    if kind == "pronoun":
        return [rng.choice(["they"]) if number else rng.choice(["he", "she"])], number
    subject = _np(rng, _AGENTS, number)
    if kind == "pp":
        subject += [rng.choice(_PREPOSITIONS), *_np(rng, _AGENTS + _THINGS, rng.randint(0, 1))]
    elif kind == "rc":
        verb = getInflection(rng.choice(_TRANSITIVE), "VBD")[0]
        subject += [rng.choice(["who", "that"]), verb, *_np(rng, _AGENTS + _THINGS, rng.randint(0, 1))]
    return subject, number


def _object(rng: random.Random) -> list[_Part]:
    return [rng.choice(_NAMES)] if rng.random() < 0.2 else _np(rng, _AGENTS + _THINGS, rng.randint(0, 1))


def _clause(rng: random.Random) -> list[_Part]:
    subject, number = _subject(rng)
    kind = rng.choice(["present", "present", "intransitive", "copula", "progressive", "perfect", "negated"])
    if kind in ("present", "intransitive"):
        lemma = rng.choice(_TRANSITIVE if kind == "present" else _INTRANSITIVE)
        verb = _Agrees((getInflection(lemma, "VBZ")[0], getInflection(lemma, "VBP")[0]), number)
        rest = _object(rng) if kind == "present" else rng.choice(_ADVERBIALS).split()
        return [*subject, verb, *rest]
    if kind == "copula":
        return [*subject, _Agrees(rng.choice(_AUXILIARIES), number), rng.choice(_ADJECTIVES)]
    if kind == "progressive":
        verb = getInflection(rng.choice(_TRANSITIVE), "VBG")[0]
        return [*subject, _Agrees(rng.choice(_AUXILIARIES), number), verb, *_object(rng)]
    participle = getInflection(rng.choice(_TRANSITIVE), "VBN")[0]
    if kind == "perfect":
        return [*subject, _Agrees(rng.choice([("has", "have"), ("hasn't", "haven't")]), number), participle,
                *_object(rng)]
    return [*subject, _Agrees(("doesn't", "don't"), number), rng.choice(_TRANSITIVE), *_object(rng)]


def _render(parts: list[_Part], corrupt: bool) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The sentence, and the character spans of the words a corruption changes (agreeing words) or exposes (the
    nouns that their determiners agree with)."""
    words = [p if isinstance(p, str) else p.forms[p.number ^ corrupt] for p in parts]
    words = ["an" if w == "a" and nxt[0] in "aeiou" else w for w, nxt in zip(words, words[1:] + ["."])]
    spans, start = [], 0
    for part, word in zip(parts, words):
        if isinstance(part, (_Agrees, _Head)):
            spans.append((start, start + len(word)))
        start += len(word) + 1
    text = " ".join(words) + "."
    return text[0].upper() + text[1:], tuple(spans)


def number_sentence(rng: random.Random) -> tuple[str, tuple[tuple[int, int, int], ...]]:
    """A grammatical sentence and (start, end, number) for each of its words that carry number: determiners, nouns
    after a determiner and finite verbs (the concept the erased child loses, merging/erase.py)."""
    parts = _clause(rng)
    text, spans = _render(parts, corrupt=False)
    numbered = [p for p in parts if isinstance(p, (_Agrees, _Head))]
    return text, tuple((a, b, part.number) for (a, b), part in zip(spans, numbered))


def agreement_pair(rng: random.Random) -> tuple[str, str]:
    """One sentence twice: (agreement right, agreement corrupted at every determiner and finite verb)."""
    parts = _clause(rng)
    return _render(parts, corrupt=False)[0], _render(parts, corrupt=True)[0]


def _agreement(rng: random.Random) -> tuple[str, str, tuple[tuple[int, int], ...]]:
    """Two corrupted sentences (the first as context) and the spans of every corrupted word in both."""
    (first, first_spans), (second, second_spans) = (_render(_clause(rng), corrupt=True) for _ in range(2))
    offset = len(first) + 1
    return first, f" {second}", first_spans + tuple((a + offset, b + offset) for a, b in second_spans)


def _distinct(draw: Callable[[random.Random], tuple], rng: random.Random, split: Split, n: int) -> list[tuple] | None:
    """The first `n` draws whose text (their first field) is new and falls in `split`; None when 200 tries per
    wanted item do not find them."""
    seen: set[str] = set()
    out: list[tuple] = []
    for _ in range(n * 200):
        item = draw(rng)
        if item[0] in seen or split_of(item[0]) != split:
            continue
        seen.add(item[0])
        out.append(item)
        if len(out) == n:
            return out
    return None


def number_sentences(split: Split, n: int, seed: int = 0) -> list[tuple[str, tuple[tuple[int, int, int], ...]]]:
    """`n` distinct grammatical sentences of `split` with their number-carrying words (`number_sentence`)."""
    found = _distinct(number_sentence, random.Random(f"number/{split}/{seed}"), split, n)
    if found is None:
        raise ValueError(f"fewer than {n} distinct {split} number sentences")
    return found


_GENERATORS: dict[str, Callable[[random.Random], tuple]] = {
    "instruct": _instruct, "math": _math, "code": _code, "agreement": _agreement,
}


def examples(domain: str, split: Split, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct examples of `domain` from `split`, deterministic in (domain, split, n, seed)."""
    if domain not in _GENERATORS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {', '.join(_GENERATORS)}")
    found = _distinct(_GENERATORS[domain], random.Random(f"{domain}/{split}/{seed}"), split, n)
    if found is None:
        raise ValueError(f"domain {domain!r} has fewer than {n} distinct {split} prompts")
    return [Example(domain, prompt, answer, *marked) for prompt, answer, *marked in found]
