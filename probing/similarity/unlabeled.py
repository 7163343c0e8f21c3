"""The unlabeled similarity set: fixed, versioned text the project ships, cut into full token windows.

Text comes from the bundled offline behaviour suite (prompt + its reference continuation: arithmetic, code,
instructions, agreement...) and the bundled minimal-pair suite's good sentences, taken round-robin across their
files so that any prefix mixes every kind of text. The set is the first `tokens` tokens of that text under the model's
tokenizer, as `tokens // window` windows of `window` tokens: no padding, so every token of every window is
compared between models. Its digest (version, text, sizes) is part of every capture key; the token ids themselves
follow from the tokenizer, which is part of the model's content digest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from itertools import zip_longest

import torch

from evaluation.suites import OFFLINE_DIR
from probing.capture import Batch, CaptureError
from probing.minimal_pair_tasks import BUNDLED_DIR  # not build_suite.SUITE_DIR: that module imports sklearn (~0.6 s)
from runstore.cache import cache_key

SET_VERSION = "1"


def _minimal_pair_texts(path) -> list[str]:
    """The good sentence of every pair: acceptable text only (the bad one differs in a word or an order)."""
    return [json.loads(line)["sentence_good"] for line in path.read_text().splitlines()]


def _suite_texts(path) -> list[str]:
    texts = []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        if "target" in item:
            texts.append(item["context"] + item["target"])
        else:
            texts.append(item["context"] + item["choices"][item["gold"]])
    return texts


@cache
def pool_text() -> str:
    """Every shipped text once, interleaved across source files, joined by blank lines."""
    sources = [_suite_texts(p) for p in sorted((OFFLINE_DIR / "data").glob("*.jsonl"))]
    sources += [_minimal_pair_texts(p) for p in sorted((BUNDLED_DIR / "data").glob("*.jsonl"))]
    seen = dict.fromkeys(t.strip() for group in zip_longest(*sources) for t in group if t)
    return "\n\n".join(t for t in seen if t)


class TokenWindows:
    """`tokens // window` full windows of `window` tokens of the pool text (an `InputSet` for `run_capture`)."""

    def __init__(self, tokens: int = 10_000, window: int = 128):
        if tokens < window:
            raise CaptureError(f"similarity set: tokens={tokens} is less than one window of {window}")
        self.tokens, self.window = tokens, window
        self.n_rows = tokens // window
        self.max_length = window
        self.name = f"similarity-set-v{SET_VERSION}"
        self.digest = cache_key("similarity-set", SET_VERSION, pool_text(), tokens, window)

    def token_ids(self, tokenizer) -> torch.Tensor:
        """[n_rows, window] ids; a clear error when the shipped text is too short for the requested size."""
        ids = tokenizer(pool_text(), add_special_tokens=False)["input_ids"]
        need = self.n_rows * self.window
        if len(ids) < need:
            raise CaptureError(f"similarity set: the shipped text gives {len(ids)} tokens, fewer than "
                               f"similarity.tokens={self.tokens} asks for")
        return torch.tensor(ids[:need]).reshape(self.n_rows, self.window)

    def batches(self, tokenizer, batch_tokens: int) -> Iterator[Batch]:
        ids = self.token_ids(tokenizer)
        batch_size = max(1, batch_tokens // self.window)
        for begin in range(0, self.n_rows, batch_size):
            chunk = ids[begin:begin + batch_size]
            rows = torch.arange(begin, begin + len(chunk))[:, None]
            yield Batch(chunk, torch.ones_like(chunk), rows)
