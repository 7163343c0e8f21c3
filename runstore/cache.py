"""Cache keys, content digests and the cache ledger: one way for every stage to name and account for what it
stores.

A key is the sha256 of the canonical JSON of its parts (sorted keys, no whitespace, paths and other objects as
text), cut to `KEY_LENGTH` hex digits: 128 bits, beyond any collision a study's few thousand entries could meet,
and short enough for file names. The parts name everything the cached value depends on, the stage's code version
included, so a changed input or changed code is a miss and never a stale hit.

Every cached stage reports each decision to the run's ledger (`RUN_DIR/cache/ledger.jsonl`): one JSON line per
(stage, model, hit), and for a miss the wall seconds its computation took (a hit costs ~0, recorded as 0), so a run
can say what each model's own stages cost (bench/bench_e2e.py). A run opens its section with a start line
(`start_run`), written under the run-directory lock, so the lines up to the next start belong to that run whichever process or worker wrote them. Tests read it to
assert what a run recomputed, without timing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import polars as pl

from runstore.atomic import atomic_write_text, read_cached
from runstore.tables import write_parquet

KEY_LENGTH = 32
LEDGER = "ledger.jsonl"
DIGEST_MEMOS = "digests"  # the cache's folder of model-folder digests (merging.checkpoints.content_digest)
ALL_MODELS = "*"  # the ledger's model for a stage over every model of the run (correlations, the report)


def canonical_json(parts: object) -> str:
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def cache_key(*parts: object) -> str:
    """The key of a cache entry made from `parts` (JSON values; paths and other objects count by their text)."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:KEY_LENGTH]


def file_digest(path: Path) -> str:
    """sha256 of one file's bytes (full length), read in 4 MiB blocks: checkpoints are far larger than memory
    we want to spend on them."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def content_digest(files: Iterable[Path], root: Path | None = None) -> str:
    """Fingerprint of files' names and bytes: each named relative to `root` (default: its file name), so the same
    content in another folder has the same digest, and a renamed file does not."""
    entries = [[Path(p).relative_to(root).as_posix() if root else Path(p).name, file_digest(p)] for p in files]
    return cache_key("files", sorted(entries))


def code_version(*sources: Path | str) -> str:
    """Digest of the source files (or every file in source folders) that compute a stage's result: for stages
    without a hand-bumped version constant, a change to their code is a miss."""
    files = []
    for source in map(Path, sources):
        files += sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if source.is_dir() else [source]
    return content_digest(files, root=Path(__file__).resolve().parent.parent)


def _append(cache_dir: Path, line: dict) -> None:
    """One line appended: a single write() to an O_APPEND file lands at the end in one piece, so lines of
    concurrent writers (task threads, worker processes) never interleave. The newline comes first, so a line cut
    short (a full disk) never swallows the next one."""
    path = Path(cache_dir) / LEDGER
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, ("\n" + canonical_json(line)).encode())
    finally:
        os.close(fd)


def start_run(cache_dir: Path, run_id: str) -> None:
    """Open a run's section of the ledger (the caller holds the run-directory lock)."""
    _append(cache_dir, {"run": run_id, "pid": os.getpid(), "time": time.time()})


def record(cache_dir: Path | None, stage: str, model: str, hit: bool, seconds: float = 0.0) -> None:
    """Note one cache decision of `stage` for `model` (ALL_MODELS for a stage over the whole run) and, for a miss,
    the wall `seconds` computing it took (recorded once computed); no ledger without a cache directory (a stage
    called on its own, outside a run)."""
    if cache_dir is not None:
        _append(cache_dir, {"stage": stage, "model": model, "hit": bool(hit), "seconds": round(float(seconds), 6)})


def read_ledger(cache_dir: Path) -> pl.DataFrame:
    """Every decision in the ledger with its run's id: columns run, stage, model, hit, seconds (in order written;
    seconds 0 for hits and for lines of ledgers written before seconds were recorded). A line cut short (a process
    killed mid-write) is skipped."""
    rows, run = [], None
    path = Path(cache_dir) / LEDGER
    for text in path.read_text().splitlines() if path.is_file() else []:
        try:
            line = json.loads(text)
        except ValueError:  # empty, or cut short
            continue
        if "run" in line:
            run = line["run"]
        else:
            rows.append({"run": run, "stage": line["stage"], "model": line["model"], "hit": line["hit"],
                         "seconds": float(line.get("seconds", 0.0))})
    schema = {"run": pl.String, "stage": pl.String, "model": pl.String, "hit": pl.Boolean, "seconds": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


def cached_value(path: Path, stage: str, model: str, compute: Callable[[], object], read: Callable[[Path], object],
                 write: Callable[[object, Path], object]) -> tuple[object, bool]:
    """(`compute()`'s result, whether it came from the cache entry at `path`), read and written by the given
    functions and reported to the ledger of `path`'s cache directory (`path` = cache_dir/<stage>/<name>)."""
    cache_dir = Path(path).parent.parent
    hit = read_cached(path, read)
    if hit is not None:
        record(cache_dir, stage, model, True)
        return hit, True
    started = time.perf_counter()
    value = compute()
    write(value, path)
    record(cache_dir, stage, model, False, time.perf_counter() - started)
    return value, False


def cached_frame(cache_dir: Path | None, stage: str, model: str, key: str,
                 compute: Callable[[], pl.DataFrame]) -> tuple[pl.DataFrame, bool]:
    """(`compute()`'s rows, whether they came from the cache): kept as `cache_dir/<stage>/<key>.parquet` and
    reported to the ledger; computed every time without a cache directory."""
    if cache_dir is None:
        return compute(), False
    return cached_value(Path(cache_dir) / stage / f"{key}.parquet", stage, model, compute, pl.read_parquet,
                        write_parquet)


def cached_outputs(cache_dir: Path | None, stage: str, key: str, outputs: Sequence[Path],
                   make: Callable[[], object]) -> bool:
    """Run `make()` (which writes `outputs`) unless a stamp says these outputs were made for `key` and are unchanged
    since; returns whether it was a hit. The stamp (`cache_dir/<stage>/<key>.json`, written after the outputs)
    holds their digests, so a deleted or edited output is made again."""
    if cache_dir is None:
        make()
        return False
    stamp = Path(cache_dir) / stage / f"{key}.json"
    expected = read_cached(stamp, lambda path: json.loads(path.read_text()))
    hit = expected is not None and all(Path(p).is_file() for p in outputs) and expected == _digests(outputs)
    if hit:
        record(cache_dir, stage, ALL_MODELS, True)
        return True
    started = time.perf_counter()
    make()
    atomic_write_text(stamp, canonical_json(_digests(outputs)))
    record(cache_dir, stage, ALL_MODELS, False, time.perf_counter() - started)
    return False


def _digests(outputs: Sequence[Path]) -> dict[str, str]:
    """By file name: a run directory moved or copied elsewhere keeps its hits."""
    return {Path(p).name: file_digest(p) for p in outputs}
