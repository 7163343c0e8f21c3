"""lm-eval `custom_dataset` for minimal-pair paradigms: the pairs `evaluation.minimal_pairs` reads, in file order
(doc_id = the pair's position), so behaviour scores exactly the pairs the probes are built from."""

import datasets

from evaluation.minimal_pairs import read_paradigm


def load(file: str, source: str, pairs: int | None = None, **_: object) -> dict[str, datasets.Dataset]:
    paradigm = read_paradigm(file, source, pairs)
    rows = [{"pairID": p.pair_id, "sentence_good": p.good, "sentence_bad": p.bad} for p in paradigm.pairs]
    return {"test": datasets.Dataset.from_list(rows)}
