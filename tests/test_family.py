"""The embedded family: real SmolLM2 base, children that measurably learned their domain (or, for the planted child,
lost agreement), content-keyed cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from lemminflect import getInflection, getLemma

from merging.family import ADAPTED, CHILDREN, MEMBERS, adapter_dir, build_family, load_state_dict
from merging.family_data import DOMAINS, PLANTED, agreement_pair, examples, split_of
from merging.train_family import Recipe, data_digest, heldout_scores, recipe_of, train_child

# Each child must beat the base on its own domain's held-out answers: at least this much lower loss per token
# (measured at training time: see the closing note of the family issue for the figures).
MIN_LOSS_REDUCTION = 0.3


@pytest.mark.parametrize("domain", DOMAINS + PLANTED)
def test_splits_never_overlap(domain):
    train = {e.prompt for e in examples(domain, "train", 300)}
    heldout = {e.prompt for e in examples(domain, "heldout", 100)}
    assert not train & heldout
    assert all(split_of(p) == "heldout" for p in heldout)
    assert examples(domain, "heldout", 20, seed=5) == examples(domain, "heldout", 20, seed=5)


@pytest.mark.parametrize("child", ADAPTED)
def test_shipped_adapter_matches_current_data_and_recipe(child):
    """The adapter in the repo was trained on exactly what the current generator and recipe (RECIPES) produce."""
    record = json.loads((adapter_dir(child) / "training.json").read_text())
    recipe = Recipe(**record["recipe"])
    assert recipe == recipe_of(child)
    assert record["data_digest"] == data_digest(examples(child, "train", recipe.steps * recipe.batch_size,
                                                         seed=recipe.seed))
    assert record["losses"][-1] < record["losses"][0]


def _number_forms(word: str) -> set[str]:
    """lemminflect's singular and plural present forms of a verb (was/were: be's past), with n't kept."""
    stem, neg = (word[:-3], "n't") if word.endswith("n't") else (word, "")
    lemma = getLemma(stem, upos="VERB")[0]
    tags = ("VBD",) if stem in ("was", "were") else ("VBZ", "VBP")
    return {form + neg for tag in tags for form in getInflection(lemma, tag)}


DETERMINER_NUMBER = {"this": 0, "that": 0, "a": 0, "an": 0, "each": 0, "these": 1, "those": 1, "several": 1,
                     "many": 1}


def test_corrupted_text_flips_every_determiner_and_verb_number():
    """Right and corrupted sentence differ only where a word agrees in number, and there by swapping the number:
    determiners singular <-> plural, verbs 3rd-singular <-> plural present per lemminflect; and the nouns are kept."""
    rng, swaps = random.Random(0), {"determiner": 0, "verb": 0}
    for _ in range(300):
        good, bad = agreement_pair(rng)
        pairs = [(g, b) for g, b in zip(good.lower()[:-1].split(), bad.lower()[:-1].split()) if g != b]
        assert len(good.split()) == len(bad.split()) and pairs, (good, bad)
        for g, b in pairs:
            if g in DETERMINER_NUMBER:
                assert DETERMINER_NUMBER[b] == 1 - DETERMINER_NUMBER[g], (good, bad)
                swaps["determiner"] += 1
            else:
                assert {g, b} <= _number_forms(g) and len(_number_forms(g)) >= 2, (good, bad)
                swaps["verb"] += 1
    assert min(swaps.values()) > 200
    # the fine-tuning text is the corrupted sentences: "a"/"an" goes with plural nouns there ("a cats")
    words = " ".join(e.text for e in examples("agreement", "train", 200)).lower().replace(".", "").split()
    after_a = [noun for det, noun in zip(words, words[1:]) if det in ("a", "an") and _is_plural_noun(noun)]
    assert len(after_a) > 20


def _is_plural_noun(word: str) -> bool:
    lemma = getLemma(word, upos="NOUN")[0]
    return lemma != word and getInflection(lemma, "NNS")[0] == word


def test_training_code_learns_on_a_tiny_model(tiny_family, tmp_path):
    from merging.family import apply_adapter

    record = train_child("math", tiny_family["base"], tmp_path / "adapter",
                         Recipe(steps=8, batch_size=4, learning_rate=5e-2, rank=4, alpha=8))
    assert record["losses"][-1] < record["losses"][0]
    apply_adapter(tiny_family["base"], tmp_path / "adapter", tmp_path / "child")
    base, child = load_state_dict(tiny_family["base"]), load_state_dict(tmp_path / "child")
    changed = [k for k in base if not torch.equal(base[k], child[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert all("norm" not in k for k in changed)  # LoRA touches only the targeted linear layers


@pytest.fixture(scope="module")
def family(real_family):
    return real_family


def test_family_is_real_smollm2(family):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(family["base"])
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == \
        ("llama", 30, 576, 49152)
    assert set(family) == set(MEMBERS) == {"base", *CHILDREN, "agreement", "number_erased"}


def test_warm_build_reuses_the_cache(family):
    stamps = {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in family.items()}
    again = build_family()
    assert again == family
    assert {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in again.items()} == stamps


@pytest.mark.parametrize("child", CHILDREN)
def test_child_beats_base_on_its_heldout_domain(family, child):
    base_loss, base_exact = heldout_scores(family["base"], child, n=32)
    child_loss, child_exact = heldout_scores(family[child], child, n=32)
    assert child_loss < (1 - MIN_LOSS_REDUCTION) * base_loss, (child, base_loss, child_loss)
    assert child_exact > base_exact


BLIMP = Path("/work/shared/blimp/data")  # real BLiMP, read in place (never copied into the repo)


def _blimp_accuracy(model, tokenizer, uid: str, n: int = 150) -> float:
    """Minimal-pair accuracy on the first `n` pairs of a BLiMP paradigm: good > bad by summed log-likelihood."""
    rows = [json.loads(line) for line in (BLIMP / f"{uid}.jsonl").read_text().splitlines()[:n]]
    sentences = [r["sentence_good"] for r in rows] + [r["sentence_bad"] for r in rows]
    ids = [[tokenizer.bos_token_id] + tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences]
    width = max(map(len, ids))
    batch = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])
    with torch.no_grad():
        logits = model(input_ids=batch, attention_mask=mask).logits[:, :-1]
    token_ll = torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None])[..., 0] * mask[:, 1:]
    ll = token_ll.sum(-1)
    return (ll[:n] > ll[n:]).float().mean().item()


@pytest.mark.slow
@pytest.mark.skipif(not BLIMP.is_dir(), reason="needs real BLiMP at /work/shared/blimp")
def test_planted_child_loses_agreement_more_than_anything_else():
    """The planted child builds, and on real BLiMP loses subject-verb and determiner-noun agreement outside
    (minimal-pair log-likelihood, 300 pairs: 0.77 -> 0.38 and 0.99 -> 0.78 when trained), far beyond the ~0.03
    standard error of a paired difference; a control paradigm drops at most half as much (it did not drop).
    Inside, its probes barely move: bench/planted_effect.json."""
    from merging.checkpoints import LoadOptions, load_model

    targets, control = ("regular_plural_subject_verb_agreement_1", "determiner_noun_agreement_1"), \
        "animate_subject_passive"
    scores = {}
    for member, folder in build_family(("base", "agreement")).items():
        model, tokenizer = load_model(folder, LoadOptions())
        scores[member] = {uid: _blimp_accuracy(model, tokenizer, uid) for uid in (*targets, control)}
    drop = {uid: scores["base"][uid] - scores["agreement"][uid] for uid in (*targets, control)}
    assert all(drop[uid] > 0.15 for uid in targets), scores
    assert drop[control] < min(drop[uid] for uid in targets) / 2, scores
