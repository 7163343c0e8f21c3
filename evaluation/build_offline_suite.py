"""Generate the bundled offline behaviour suite's data: `python -m evaluation.build_offline_suite`.

The committed jsonl files under evaluation/suites/offline/data/ are this script's output (a test regenerates and
compares). Domain tasks (math, instruct, code) use family_data's own prompt formats on HELD-OUT prompts only, so
they measure the skill each child was tuned for on items it never saw; each domain gets a `greedy` task (is the
exact answer the model's greedy continuation) and a `choice` task (gold answer against near-miss distractors in
the same format, so format alone cannot win). General English competence (agreement, tense, adjective order...)
is no longer here: the bundled minimal-pair suite (probing/suite, config `minimal_pairs`) scores it outside and
inside the model on the same sentences.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Callable

from evaluation.suites import OFFLINE_DIR
from merging.family_data import examples

DATA_DIR = OFFLINE_DIR / "data"
# Sized for the runtime budget (~13k scored tokens per model): lm-eval scores every choice as its own sequence.
N_GREEDY = 40  # items per domain greedy task (one sequence each)
N_CHOICE = 30  # items per domain choice task (gold + N_DISTRACTORS sequences each)
N_DISTRACTORS = 2
SEED = 7

# ---- domain tasks -------------------------------------------------------------------------------------------


def _math_distractors(answer: str) -> list[str]:
    """Same worked sum with a wrong result: only the arithmetic separates gold from distractor."""
    a, op, b, c = re.fullmatch(r" (\d+) ([-+*]) (\d+) = (\d+)\. The answer is \d+\.", answer).groups()
    a, b, c = int(a), int(b), int(c)
    other_op = {"+": a - b, "-": a + b, "*": a + b}[op]
    wrong = sorted({c + 1, c - 1, c + 10, c - 10, other_op} - {c})
    return [f" {a} {op} {b} = {w}. The answer is {w}." for w in wrong if w >= 0]


def _instruct_distractors(prompt: str, rng: random.Random) -> list[str]:
    """Near misses per instruction kind (wrong count, wrong end point, the smaller number, wrong order...)."""
    text = prompt.removeprefix("Instruction: ").removesuffix("\nResponse:")
    if m := re.fullmatch(r"Repeat the word '(\w+)' (\d) times\.", text):
        word, k = m.group(1), int(m.group(2))
        other = rng.choice([w for w in ("river", "cloud", "stone", "light") if w != word])
        options = [" ".join([word] * (k - 1)), " ".join([word] * (k + 1)), " ".join([other] * k)]
    elif m := re.fullmatch(r"List the numbers from (\d+) to (\d+)\.", text):
        lo, hi = int(m.group(1)), int(m.group(2))
        spans = [(lo, hi + 1), (lo, hi - 1), (lo + 1, hi)]
        options = [", ".join(str(i) for i in range(s, e + 1)) for s, e in spans]
    elif m := re.fullmatch(r"Which number is larger: (\d+) or (\d+)\?", text):
        x, y = int(m.group(1)), int(m.group(2))
        options = [str(min(x, y)), str(max(x, y) + 1), str(x + y)]
    elif m := re.fullmatch(r"What is the last word of this sentence: '(.+)'\?", text):
        words = m.group(1).split()
        options = [words[0], words[-2], words[len(words) // 2]]
    elif m := re.fullmatch(r"Put these words in alphabetical order: (.+)\.", text):
        words = m.group(1).split(", ")
        orders = [words, sorted(words, reverse=True), sorted(words)[1:] + sorted(words)[:1],
                  sorted(words)[-1:] + sorted(words)[:-1]]
        options = [", ".join(o) for o in orders]
    else:
        raise ValueError(f"no distractor rule for instruct prompt {prompt!r}")
    return [" " + o for o in options]


# Code near misses: one small edit each (a constant off by one, a flipped operator, the wrong builtin).
_CODE_EDITS: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"\b(\d+)\b(?!\])", lambda m: str(int(m.group(1)) + 1)),
    (r"\b(\d+)\b(?!\])", lambda m: str(max(int(m.group(1)) - 1, 0))),
    (r" \+ ", lambda m: " - "), (r" \+ ", lambda m: " * "), (r" \* ", lambda m: " + "), (r" - ", lambda m: " + "),
    (r"upper", lambda m: "lower"), (r"upper", lambda m: "title"), (r"max", lambda m: "min"),
    (r"max", lambda m: "sum"), (r"\[0\]", lambda m: "[-1]"), (r"\[0\]", lambda m: "[1]"),
    (r"== 0", lambda m: "== 1"), (r" > ", lambda m: " < "), (r"\[-", lambda m: "["), (r"' '", lambda m: "''"),
    (r"' '", lambda m: "','"),
    (r"\[n \* n", lambda m: "[n * 2"),
]


def _code_distractors(answer: str) -> list[str]:
    return [re.sub(pattern, fix, answer, count=1) for pattern, fix in _CODE_EDITS]


_DISTRACTORS = {
    "math": lambda ex, rng: _math_distractors(ex.answer),
    "instruct": lambda ex, rng: _instruct_distractors(ex.prompt, rng),
    "code": lambda ex, rng: _code_distractors(ex.answer),
}


def _near_misses(domain: str, example, rng: random.Random) -> list[str]:
    """N_DISTRACTORS distinct candidates that differ from the gold answer, chosen by `rng`."""
    candidates = sorted(set(_DISTRACTORS[domain](example, rng)) - {example.answer})
    if len(candidates) < N_DISTRACTORS:
        raise ValueError(f"fewer than {N_DISTRACTORS} distractors for {example.prompt!r}")
    return rng.sample(candidates, N_DISTRACTORS)


def _choice_item(context: str, gold: str, wrong: list[str], rng: random.Random) -> dict:
    choices = [gold, *wrong]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "gold": choices.index(gold)}


def domain_tasks(domain: str) -> dict[str, list[dict]]:
    """`<domain>_greedy` and `<domain>_choice` on disjoint held-out prompts of the child's own format."""
    rng = random.Random(f"offline/{domain}/{SEED}")
    items = examples(domain, "heldout", N_GREEDY + N_CHOICE, seed=SEED)
    greedy = [{"context": ex.prompt, "target": ex.answer} for ex in items[:N_GREEDY]]
    choice = [_choice_item(ex.prompt, ex.answer, _near_misses(domain, ex, rng), rng) for ex in items[N_GREEDY:]]
    return {f"{domain}_greedy": greedy, f"{domain}_choice": choice}


def build() -> dict[str, list[dict]]:
    """Every task's items, keyed by task file stem (deterministic: same output on every machine)."""
    tasks: dict[str, list[dict]] = {}
    for domain in ("math", "instruct", "code"):
        tasks |= domain_tasks(domain)
    return tasks


def render(items: list[dict]) -> str:
    return "".join(json.dumps({"id": i, **item}, ensure_ascii=False) + "\n" for i, item in enumerate(items))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, items in build().items():
        (args.out / f"{name}.jsonl").write_text(render(items))
        print(f"{name}: {len(items)} items")


if __name__ == "__main__":
    main()
