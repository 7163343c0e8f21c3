"""The bundled minimal-pair suite: reproducible from its generator, lexically matched, balanced, split by pair."""

from __future__ import annotations

import filecmp
import json
import math
import re
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from probing.build_suite import (CALIBRATION_PAIRS, PAIRS, SUITE_DIR, SuiteError, generate, generate_suite, main,
                                 prove_context, read_blimp, readme, write_data)
from probing.suite_checks import SOLVED, context_scores, layer0_embedder, required_items
from probing.suite_paradigms import PARADIGMS, Pair, Paradigm
from probing.similarity.unlabeled import pool_text

HOLMES_PHENOMENA = {"morphology", "syntax", "semantics", "reasoning", "discourse"}


def _committed() -> dict[str, list[dict]]:
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((SUITE_DIR / "data").glob("*.jsonl"))}


def test_committed_data_is_what_the_generator_builds(tmp_path):
    write_data(tmp_path, generate_suite())
    committed = sorted(p.name for p in (SUITE_DIR / "data").iterdir())
    assert committed == sorted(p.name for p in (tmp_path / "data").iterdir())
    assert all(filecmp.cmp(SUITE_DIR / "data" / n, tmp_path / "data" / n, shallow=False) for n in committed)
    assert sorted(p.name for p in SUITE_DIR.iterdir()) == ["README.md", "data", "proofs.json"]  # no Holmes folders


def test_paradigms_cover_every_phenomenon_with_blimp_keys():
    suite = _committed()
    assert 12 <= len(suite) <= 16 and {r["field"] for rs in suite.values() for r in rs} == HOLMES_PHENOMENA
    for uid, records in suite.items():
        assert len(records) == PAIRS and [r["pairID"] for r in records] == [str(i) for i in range(PAIRS)]
        for r in records:
            assert r["UID"] == uid and {"sentence_good", "sentence_bad", "linguistics_term", "lexically_identical",
                                        "split"} <= set(r)
            if r["one_prefix_method"]:
                assert r["sentence_good"].startswith(r["one_prefix_prefix"] + " " + r["one_prefix_word_good"])
                assert r["sentence_bad"].startswith(r["one_prefix_prefix"] + " " + r["one_prefix_word_bad"])
        sentences = [s for r in records for s in (r["sentence_good"], r["sentence_bad"])]
        assert len(set(sentences)) == len(sentences), uid


def _words(text: str) -> Counter:
    return Counter(re.findall(r"[\w']+", text.lower()))


def test_pairs_are_lexically_matched_and_no_word_marks_the_label():
    """Identical paradigms: the same words. Others: one word differs, and each differing form occurs in good and
    bad sentences alike (at most 2:1 either way), so its presence alone does not predict the label."""
    for uid, records in _committed().items():
        good_only, bad_only = Counter(), Counter()
        for r in records:
            good, bad = _words(r["sentence_good"]), _words(r["sentence_bad"])
            if r["lexically_identical"]:
                assert good == bad, r
            else:
                assert sum((good - bad).values()) == 1 == sum((bad - good).values()), r
            good_only += good - bad
            bad_only += bad - good
        for word in good_only | bad_only:
            if good_only[word] + bad_only[word] >= 10:
                assert good_only[word] <= 2 * bad_only[word] and bad_only[word] <= 2 * good_only[word], (uid, word)


def test_splits_are_per_pair_stratified_40_10_50():
    for uid, records in _committed().items():
        assert Counter(r["split"] for r in records) == {"train": 0.4 * PAIRS, "dev": 0.1 * PAIRS, "test": 0.5 * PAIRS}


def test_a_paradigm_that_cannot_fill_its_pairs_is_refused(tmp_path, capsys, monkeypatch):
    tiny = Paradigm("tiny", "syntax", "t", True, ("",), lambda rng, _: Pair("A b c.", "A c b."), "one pair only")
    with pytest.raises(SuiteError, match="tiny has fewer than 3 distinct pairs"):
        generate(tiny, 3)
    monkeypatch.setattr("probing.build_suite.PARADIGMS", [tiny])  # refused before any model is loaded
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path)])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: suite: paradigm tiny")


def test_similarity_pool_holds_the_suites_good_sentences_only():
    text = pool_text()
    records = [r for rs in _committed().values() for r in rs]
    assert all(r["sentence_good"] in text for r in records[::50])
    assert not any(r["sentence_bad"] in text for r in records if not r["lexically_identical"])


def _bag_of_random_vectors(sentences):
    """A stand-in for layer 0: each word a fixed random vector, a sentence the mean of its words' vectors."""
    vectors: dict[str, np.ndarray] = {}

    def vector(word: str) -> np.ndarray:
        if word not in vectors:
            vectors[word] = np.random.default_rng(zlib.crc32(word.encode())).normal(size=32)
        return vectors[word]
    return np.stack([np.mean([vector(w) for w in re.findall(r"[\w']+|\.", s)], axis=0) for s in sentences])


def _marked(rng, _):
    """Lexically trivial: the good sentence always holds `indeed`, the bad one `perhaps`."""
    noun, verb = rng.choice(["dog", "cat", "bird", "horse", "king"]), rng.choice(["slept", "ran", "sang", "left"])
    place = rng.choice(["here", "there", "early", "late", "twice", "again", "today", "outside", "inside", "home"])
    return Pair(f"The {noun} indeed {verb} {place}.", f"The {noun} perhaps {verb} {place}.")


def test_needs_context_check_refuses_a_lexically_trivial_paradigm_and_passes_a_real_one():
    trivial = Paradigm("marked", "syntax", "t", False, ("",), _marked, "a marker word says which is good")
    scores = context_scores(generate(trivial, 150), _bag_of_random_vectors)
    assert scores["layer0"] >= 0.95 and scores["bow"] >= 0.95
    with pytest.raises(SuiteError, match=r"^suite: paradigm marked is solved without context: layer-0 probe test "
                                         r"accuracy 1\.000 >= 0\.75$"):
        prove_context({"marked": generate(trivial, 150)}, _bag_of_random_vectors)
    real = _committed()["subject_verb_agreement"]
    assert prove_context({"subject_verb_agreement": real}, _bag_of_random_vectors)["subject_verb_agreement"][
        "bow"] < SOLVED


def test_power_formula_matches_the_hand_computation():
    assert required_items(0.1) == math.ceil(((1.959964 + 0.841621) * math.sqrt(0.1 - 0.0025) / 0.05) ** 2) == 307
    assert required_items(0.05) < required_items(0.1) < required_items(0.2)


@pytest.mark.slow
def test_committed_proofs_hold_on_the_real_base_model():
    """Layer 0 of the embedded base model and bag-of-words stay below the threshold on every committed paradigm,
    as the README says; lexically identical paradigms sit at exactly 0.5."""
    from merging.family import build_family
    from probing.build_suite import _load, load_proofs

    suite = _committed()
    proofs = load_proofs(SUITE_DIR, suite)
    scores = prove_context(suite, layer0_embedder(*_load(build_family(("base",))["base"])))
    for uid, s in scores.items():
        assert s["layer0"] == pytest.approx(proofs["context"][uid]["layer0"], abs=0.02), uid
        if suite[uid][0]["lexically_identical"]:
            assert s["layer0"] == s["bow"] == 0.5, uid
    assert (SUITE_DIR / "README.md").read_text() == readme(suite, proofs)


def test_calibration_reads_blimp_counterparts_from_a_path(tmp_path):
    """The real BLiMP files (../shared/blimp, never copied into the repo): every counterpart named exists."""
    blimp = Path(__file__).resolve().parents[1].parent / "shared" / "blimp"
    counterparts = read_blimp(blimp)
    assert set(counterparts) == {u for p in PARADIGMS for u in p.blimp} and len(counterparts) >= 5
    for uid, records in counterparts.items():
        assert len(records) == CALIBRATION_PAIRS and {r["UID"] for r in records} == {uid}
    with pytest.raises(SuiteError, match=r"--calibrate: .*/data/regular_plural_subject_verb_agreement_1\.jsonl not "
                                         r"found"):
        read_blimp(tmp_path)
