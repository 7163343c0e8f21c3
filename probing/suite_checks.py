"""Proofs the bundled suite ships with: its paradigms need context, and its test splits have the power asked of them.

Needs context (issue 21): per paradigm, a probe on layer 0 of the base model (the mean of each sentence's token
embeddings: with RoPE, layer 0 carries no position, so it sees a bag of tokens) and a bag-of-words model, both
logistic regressions with C cross-validated on the train split (folds by pair), scored on the test split the
probes use. A paradigm either solves at `SOLVED` accuracy or more is refused.

Power: a paired comparison of two models on n test items with discordance d (the fraction of items where exactly
one of the two is right) resolves an accuracy difference delta at two-sided alpha 0.05 and power 0.8 when
n >= ((z_.975 + z_.8) * sqrt(d - delta^2) / delta)^2 (the normal approximation of McNemar's test, Connor 1987).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import norm
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# Refuse a paradigm whose token-only test accuracy reaches 0.75: halfway from chance (0.5) to solved (1.0). A
# paradigm at chance stays far below it (at 200 test sentences chance accuracy has sd 0.035: 0.75 is 7 sd away),
# and a paradigm that tokens get three quarters right measures vocabulary, not context.
SOLVED = 0.75
CS = np.logspace(-4, 2, 7)
FOLDS = 5
DELTA, ALPHA, POWER = 0.05, 0.05, 0.8

Embed = Callable[[Sequence[str]], np.ndarray]  # sentences -> [n, d] features


def pair_sentences(records: list[dict]) -> list[str]:
    """Good then bad sentence of each pair (any minimal-pair file, BLiMP's too)."""
    return [s for r in records for s in (r["sentence_good"], r["sentence_bad"])]


def items(records: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Sentences (good then bad of each pair), labels (1 = good), splits, and the pair group each belongs to."""
    sentences = pair_sentences(records)
    labels = np.tile([1, 0], len(records))
    splits = np.repeat([r["split"] for r in records], 2)
    groups = np.repeat([int(r["pairID"]) for r in records], 2)
    return sentences, labels, splits, groups


def held_out_correct(features, labels: np.ndarray, splits: np.ndarray, groups: np.ndarray,
                     scale: bool) -> np.ndarray:
    """Per test item: did a logistic regression trained on the train split get it right? C is chosen by 5-fold
    cross-validation on the train split with folds by pair (both sentences of a pair in one fold)."""
    train, test = splits == "train", splits == "test"
    folds = list(GroupKFold(FOLDS).split(features[train], labels[train], groups[train]))
    model = LogisticRegressionCV(Cs=CS, cv=folds, solver="liblinear", l1_ratios=(0.0,), scoring="accuracy",
                                 use_legacy_attributes=False)
    model = make_pipeline(StandardScaler(), model) if scale else model
    model.fit(features[train], labels[train])
    return model.predict(features[test]) == labels[test]


def bag_of_words(sentences: Sequence[str]):
    """Unigram counts; single characters (digits, `a`) count as words too."""
    return CountVectorizer(token_pattern=r"(?u)\b\w+\b").fit_transform(sentences)


def context_scores(records: list[dict], embed: Embed) -> dict:
    """Test accuracy of the layer-0 probe and of bag-of-words on one paradigm, and the test size (sentences)."""
    sentences, labels, splits, groups = items(records)
    layer0 = held_out_correct(embed(sentences), labels, splits, groups, scale=True)
    bow = held_out_correct(bag_of_words(sentences), labels, splits, groups, scale=False)
    return {"layer0": float(layer0.mean()), "bow": float(bow.mean()), "n_test": int(len(layer0))}


def solved_by_tokens(uid: str, scores: dict) -> str | None:
    """The refusal line for a paradigm that tokens alone solve, else None."""
    for name, key in (("layer-0 probe", "layer0"), ("bag-of-words", "bow")):
        if scores[key] >= SOLVED:
            return (f"suite: paradigm {uid} is solved without context: {name} test accuracy {scores[key]:.3f} >= "
                    f"{SOLVED}")
    return None


def required_items(discordance: float, delta: float = DELTA) -> int:
    """Test items a paired (McNemar) comparison needs to resolve `delta` at ALPHA, POWER (module docstring)."""
    z = norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER)
    return math.ceil((z * math.sqrt(max(discordance - delta ** 2, 0.0)) / delta) ** 2)


def resolvable_delta(discordance: float, n: int) -> float:
    """The smallest accuracy difference n paired items resolve at ALPHA, POWER: `required_items` solved for delta."""
    z = norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER)
    return z * math.sqrt(discordance / (n + z ** 2))


def layer0_embedder(model, tokenizer) -> Embed:
    """Mean token embedding of each sentence under the model's input embeddings: what layer 0 holds."""
    matrix = model.get_input_embeddings().weight.detach().float()

    def embed(sentences: Sequence[str]) -> np.ndarray:
        return np.stack([matrix[tokenizer(s)["input_ids"]].mean(0).numpy() for s in sentences])
    return embed


@torch.no_grad()
def forward(model, tokenizer, sentences: Sequence[str], layer: int | None = None, batch: int = 32):
    """Per sentence: the summed log-probability of its tokens (float32, right padding), and, when `layer` is given,
    the mean of that layer's hidden states over the sentence's tokens.

    Each sentence is scored after the tokenizer's BOS (else EOS) token, as lm-eval scores a continuation with an
    empty context, so its first token counts too."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix
    likelihoods, pooled = [], []
    for begin in range(0, len(sentences), batch):
        ids = [[prefix] + tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences[begin:begin + batch]]
        width = max(map(len, ids))
        tokens = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        out = model(input_ids=tokens, attention_mask=mask, output_hidden_states=layer is not None)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
        likelihoods.append((logp * mask[:, 1:]).sum(-1).numpy())
        if layer is not None:
            hidden, weights = out.hidden_states[layer][:, 1:].float(), mask[:, 1:, None].float()
            pooled.append(((hidden * weights).sum(1) / weights.sum(1)).numpy())
    return np.concatenate(likelihoods), (np.concatenate(pooled) if pooled else None)


def minimal_pair_correct(likelihoods: np.ndarray) -> np.ndarray:
    """Per pair (sentences good, bad, good, bad...): does the good sentence get the higher log-likelihood?"""
    return likelihoods[0::2] > likelihoods[1::2]
