"""Minimal-pair folders (BLiMP's layout): the sentences both stages score, behaviour outside and probes inside.

A folder holds `data/<UID>.jsonl`, one pair per line with at least the keys of `REQUIRED_KEYS` (BLiMP's other
keys are optional, a `split` key is honoured). One file is one paradigm; every line of it must agree on `UID`
(= the file's stem), `field`, `linguistics_term` and `lexically_identical`. Anything else is one
`MinimalPairError` line naming the file, the line and the key.

This reader lives in `evaluation/` because both stages read the same pairs: `evaluation.behavior` scores each pair
by log-likelihood through a generated lm-eval task group (`task_folder`), `probing.minimal_pair_tasks` turns each
sentence into one item of an acceptability probe. A paradigm's `digest` covers the selected lines' bytes and the
reader's version, so a changed paradigm recomputes its own captures and probes and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from runstore.cache import cache_key
from runstore.errors import UserError

REQUIRED_KEYS = ("sentence_good", "sentence_bad", "field", "linguistics_term", "UID", "pairID", "lexically_identical")
PARADIGM_KEYS = ("UID", "field", "linguistics_term", "lexically_identical")  # the same on every line of a file
SPLITS = ("train", "dev", "test")
# Shares of pairs per split where the file carries no `split` key: ranks of a salted hash of pairID, so a pair's
# two sentences share a split and the assignment does not depend on line order.
SPLIT_SHARES = {"train": 0.7, "dev": 0.1}  # test: the rest
SPLIT_SALT = "merge-eval minimal pairs"
MINIMAL_PAIRS_VERSION = "1"
TEMPLATE_DIR = Path(__file__).parent / "suites" / "minimal_pairs"


class MinimalPairError(UserError):
    """A minimal-pair folder that cannot be read; the message names the file, line and key."""


@dataclass(frozen=True)
class Pair:
    pair_id: str
    good: str
    bad: str
    split: str | None  # the file's own `split`, else None (assigned by `Paradigm.splits`)


@dataclass(frozen=True)
class Paradigm:
    source: str  # "blimp" for a BLiMP-layout folder, "suite" for the bundled suite
    uid: str
    field: str
    linguistics_term: str
    lexically_identical: bool
    pairs: tuple[Pair, ...]
    path: Path
    digest: str  # of the selected lines and the reader's version

    @property
    def name(self) -> str:
        """The probing task's and the behaviour task's shared name."""
        return f"{self.source}-{self.uid}"

    def splits(self) -> list[str]:
        """Per pair: its own `split`, else train/dev/test by rank of a salted hash of its pairID."""
        if self.pairs[0].split is not None:
            return [pair.split for pair in self.pairs]
        order = sorted(range(len(self.pairs)), key=lambda i: hashlib.sha256(
            f"{SPLIT_SALT}:{self.pairs[i].pair_id}".encode()).hexdigest())
        n_train = round(SPLIT_SHARES["train"] * len(order))
        n_dev = max(1, round(SPLIT_SHARES["dev"] * len(order)))
        splits = [""] * len(order)
        for rank, i in enumerate(order):
            splits[i] = "train" if rank < n_train else "dev" if rank < n_train + n_dev else "test"
        return splits


@dataclass(frozen=True)
class PairSelection:
    """What a config's `minimal_pairs` entry selects: a folder, named `source`; its paradigms (None: all) and the
    first `pairs` pairs of each (None: all)."""

    source: str
    folder: str
    paradigms: tuple[str, ...] | None = None
    pairs: int | None = None

    def read(self) -> list[Paradigm]:
        return read_source(self.folder, self.source, self.paradigms, self.pairs)


def paradigm_files(folder: str | Path) -> dict[str, Path]:
    """UID -> data/<UID>.jsonl of a minimal-pair folder; a folder without that layout is an error saying so."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MinimalPairError(f"{folder}: minimal-pair folder not found")
    files = sorted((folder / "data").glob("*.jsonl"))
    if not files:
        raise MinimalPairError(f"{folder}: not a minimal-pair folder in BLiMP's layout (no data/*.jsonl)")
    return {path.stem: path for path in files}


def _where(path: Path, number: int) -> str:
    return f"{path}: line {number}"


def _pair(record: object, path: Path, number: int) -> Pair:
    where = _where(path, number)
    if not isinstance(record, dict):
        raise MinimalPairError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        more = f" (and {', '.join(map(repr, missing[1:]))})" if missing[1:] else ""
        raise MinimalPairError(f"{where}: missing key {missing[0]!r}{more}")
    for key in ("sentence_good", "sentence_bad", "field", "linguistics_term", "UID"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise MinimalPairError(f"{where}: key {key!r} must be a non-empty string, got {record[key]!r}")
    if not isinstance(record["pairID"], (str, int)) or isinstance(record["pairID"], bool) or record["pairID"] == "":
        raise MinimalPairError(f"{where}: key 'pairID' must be a non-empty string or integer, got {record['pairID']!r}")
    if not isinstance(record["lexically_identical"], bool):
        raise MinimalPairError(f"{where}: key 'lexically_identical' must be true or false, "
                               f"got {record['lexically_identical']!r}")
    if record["UID"] != path.stem:
        raise MinimalPairError(f"{where}: key 'UID' is {record['UID']!r}, but the file is named {path.name}")
    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise MinimalPairError(f"{where}: key 'split' is {split!r}, not one of {', '.join(SPLITS)}")
    return Pair(str(record["pairID"]), record["sentence_good"], record["sentence_bad"], split)


def read_paradigm(path: str | Path, source: str, pairs: int | None = None) -> Paradigm:
    """One `data/<UID>.jsonl`, its first `pairs` lines (all when None), checked line by line.

    The file is read every time but parsed once per process for the same bytes (`_parse_paradigm`): a run reads its
    suite for every model (capture jobs, the behaviour cache key, probing tasks), and parsing is the cost."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MinimalPairError(f"{path}: cannot be read ({error.strerror})") from None
    return _parse_paradigm(path, source, pairs, data)


@functools.lru_cache(maxsize=256)
def _parse_paradigm(path: Path, source: str, pairs: int | None, data: bytes) -> Paradigm:
    """`read_paradigm` of `data`, the bytes of `path`: memoised by those bytes themselves, so an edited file is
    parsed again (a Paradigm is immutable, so every caller can share it; a file that fails is not memoised)."""
    lines = [line for line in data.splitlines() if line.strip()][:pairs]
    if not lines:
        raise MinimalPairError(f"{path}: no pairs")
    first, read, ids = None, [], {}
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MinimalPairError(f"{_where(path, number)}: not JSON ({getattr(error, 'msg', error)})") from None
        read.append(_pair(record, path, number))
        first = first or record
        for key in PARADIGM_KEYS:
            if record[key] != first[key]:
                raise MinimalPairError(f"{_where(path, number)}: key {key!r} is {record[key]!r}, line 1 has "
                                       f"{first[key]!r} (one file is one paradigm)")
        if read[-1].pair_id in ids:
            raise MinimalPairError(f"{_where(path, number)}: key 'pairID' {read[-1].pair_id!r} repeats line "
                                   f"{ids[read[-1].pair_id]}")
        ids[read[-1].pair_id] = number
        if (read[-1].split is None) != (read[0].split is None):
            raise MinimalPairError(f"{_where(path, number)}: key 'split' is on some lines and not on others")
    _check_splits(path, read)
    digest = cache_key("minimal-pairs", MINIMAL_PAIRS_VERSION, source, hashlib.sha256(b"\n".join(lines)).hexdigest())
    return Paradigm(source, first["UID"], first["field"], first["linguistics_term"], first["lexically_identical"],
                    tuple(read), path, digest)


def _check_splits(path: Path, pairs: list[Pair]) -> None:
    """A probe needs train, dev (to choose its regularisation) and test items."""
    if pairs[0].split is None:
        if len(pairs) < 3:
            raise MinimalPairError(f"{path}: {len(pairs)} pair(s); a paradigm needs at least 3 (train, dev, test)")
        return
    missing = [split for split in SPLITS if split not in {pair.split for pair in pairs}]
    if missing:
        raise MinimalPairError(f"{path}: key 'split' gives no {missing[0]} pair in the pairs read")


def read_source(folder: str | Path, source: str, paradigms: tuple[str, ...] | list[str] | None = None,
                pairs: int | None = None) -> list[Paradigm]:
    """The selected paradigms of a minimal-pair folder (all when None), in the order given (else by UID)."""
    files = paradigm_files(folder)
    if paradigms is not None:
        unknown = [name for name in paradigms if name not in files]
        if unknown:
            known = ", ".join(list(files)[:8]) + (f", ... ({len(files)} in all)" if len(files) > 8 else "")
            raise MinimalPairError(f"{folder}: unknown paradigm(s) {unknown}; known: {known}")
        files = {name: files[name] for name in paradigms}
    return [read_paradigm(path, source, pairs) for path in files.values()]


def group_name(source: str, linguistics_term: str) -> str:
    """The lm-eval group of a source's paradigms of one linguistics_term (the behaviour table's `group`)."""
    return f"{source}:{linguistics_term}"


def write_task_folder(paradigms: list[Paradigm], pairs: dict[str, int | None], folder: Path) -> list[str]:
    """lm-eval task YAMLs scoring every paradigm by log-likelihood, written into `folder`; returns the top groups.

    Tasks are data, as lm-eval's own BLiMP is: each paradigm is a task (`<source>-<UID>`) including the template
    beside this module, under a group per linguistics_term (`<source>:<term>`), under a group per source; group
    scores are lm-eval's size-weighted means. lm-eval lets a task sit in one group only, and BLiMP's terms cross
    its fields (npi_licensing is semantics and syntax_semantics), so the tree is source > term > paradigm.
    `pairs`: per source, the pairs read per paradigm (None: all), which the loader re-reads the same way.
    """
    folder.mkdir(parents=True, exist_ok=True)
    template = TEMPLATE_DIR / "_template.yaml"
    groups: dict[str, dict[str, list[str]]] = {}
    for paradigm in paradigms:
        config = {"include": str(template), "task": paradigm.name,
                  "dataset_kwargs": {"file": str(paradigm.path.resolve()), "source": paradigm.source,
                                     "pairs": pairs.get(paradigm.source)}}
        (folder / f"{paradigm.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        term = group_name(paradigm.source, paradigm.linguistics_term)
        groups.setdefault(paradigm.source, {}).setdefault(term, []).append(paradigm.name)
    aggregate = [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}]
    for source, terms in groups.items():
        for term, tasks in terms.items():
            (folder / f"_{term.replace(':', '__')}.yaml").write_text(yaml.safe_dump(
                {"group": term, "task": tasks, "aggregate_metric_list": aggregate}, sort_keys=False))
        (folder / f"_{source}.yaml").write_text(yaml.safe_dump(
            {"group": source, "task": list(terms), "aggregate_metric_list": aggregate}, sort_keys=False))
    return list(groups)
