"""The capture store on disk: packed against plain entries, and the precision the probes' pooled states need.

    nice -n 10 python bench/bench_store.py [--pairs 200] [--tokens 2048]

One model (the embedded base) is captured once, as a run captures it: the bundled paradigms' pooled states and
sentence log-likelihoods, and a similarity set's token states, attention patterns and top-k log-probs. Then:
- **packing**: every entry saved and loaded packed (`probing.packed`, ours) and plain (the store's format before,
  baseline); bytes on disk per reducer, and whether the loaded values are bit-identical;
- **pool precision**: the probe tables of every paradigm from the float32 pools against the same pools rounded to
  fewer mantissa bits: 21 (four float32 ulps: the probes' own float noise), 15, 10 (float16's, at float32's range)
  and 7 (bfloat16). A storage precision is float noise when it changes predictions only in the (task, layer)
  cells where the 21-bit rounding changes some. Fewer bits would shrink the pools, the largest part of the store.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from evaluation.minimal_pairs import PairSelection  # noqa: E402
from merging.checkpoints import LoadOptions, load_model  # noqa: E402
from probing.capture import probe_inputs, task_features  # noqa: E402
from probing.hooks import HookRunner  # noqa: E402
from probing.minimal_pair_tasks import BUNDLED_DIR, minimal_pair_tasks  # noqa: E402
from probing.similarity.functional import functional_jobs  # noqa: E402
from probing.similarity.unlabeled import TokenWindows  # noqa: E402
from probing.stage import layer_keys, probe_jobs, probe_task  # noqa: E402
from probing.store import CaptureStore, capture_model, model_ref  # noqa: E402

MANTISSA_BITS = (21, 15, 10, 7)
SEEDS = [0, 1, 2]


def rounded(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 values rounded to `bits` mantissa bits (of float32's 23), halves away from zero; 7 is bfloat16."""
    if bits == 7:
        return x.bfloat16().float()
    drop = 23 - bits
    as_int = x.contiguous().view(torch.int32)
    return ((as_int + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)


def _timed_copy(source: CaptureStore, target: CaptureStore, keys: list) -> tuple[float, float]:
    """Seconds to save every entry into `target` and to load it back, checking the values come back bit for bit."""
    values = {key: source.load(key) for key in keys}
    started = time.perf_counter()
    for key, tensors in values.items():
        target.save(key, tensors, {"model": "base"})
    saved = time.perf_counter() - started
    started = time.perf_counter()
    identical = all(torch.equal(v.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
                    for key, tensors in values.items() for v, w in zip(tensors.values(), target.load(key).values()))
    if not identical:
        raise AssertionError(f"{target.root}: an entry loads other values than were saved")
    return saved, time.perf_counter() - started


def _bytes_by_reducer(store: CaptureStore, keys: list) -> Counter:
    sizes: Counter = Counter()
    for key in keys:
        sizes[key.reducer.split("-")[0]] += store.path(key).stat().st_size
    return sizes


def _probe_flips(store: CaptureStore, model, tasks, jobs) -> dict[int, dict[tuple[str, int], int]]:
    """Per mantissa width, per (task, layer): test predictions that differ from the float32 pools' probe."""
    flips: dict[int, dict[tuple[str, int], int]] = {bits: {} for bits in MANTISSA_BITS}
    for task, job in zip(tasks, jobs):
        pooled = torch.stack([store.load(key)["value"].float() for key in layer_keys(job, model.digest, "float32")])
        _, index = probe_inputs(task, "mean", 128)  # probe_jobs' defaults, as the jobs were built
        reference = probe_task(task_features(pooled, index), task, SEEDS, True, False).items
        for bits in MANTISSA_BITS:
            predictions = probe_task(task_features(rounded(pooled, bits), index), task, SEEDS, True, False).items
            changed = reference.filter(predictions["prediction"] != reference["prediction"])["layer"].value_counts()
            flips[bits] |= {(task.name, layer): count for layer, count in changed.iter_rows()}
    return flips


def store_rows(folder: Path, pairs: int = 200, tokens: int = 2048, paradigms: tuple[str, ...] | None = None,
               log=print) -> list[dict]:
    model = model_ref("base", folder)
    tasks = minimal_pair_tasks((PairSelection("suite", str(BUNDLED_DIR), paradigms, pairs),))
    windows = TokenWindows(tokens, min(128, tokens))
    probes = probe_jobs(tasks, model.n_blocks)
    jobs = probes + functional_jobs(windows, model.n_blocks)
    keys = [job.key(request, model.digest, "float32") for job in jobs for request in job.requests]
    with tempfile.TemporaryDirectory(prefix="bench-store-") as scratch:
        captured = CaptureStore(Path(scratch) / "captured")
        capture_model(HookRunner(*load_model(folder, LoadOptions())), model, jobs, captured, "float32", log=log)
        packed, plain = CaptureStore(Path(scratch) / "packed"), CaptureStore(Path(scratch) / "plain", packed=False)
        packed_s, plain_s = _timed_copy(captured, packed, keys), _timed_copy(captured, plain, keys)
        packed_bytes, plain_bytes = _bytes_by_reducer(packed, keys), _bytes_by_reducer(plain, keys)
        started = time.perf_counter()
        flips = _probe_flips(captured, model, tasks, probes)
        probe_s = (time.perf_counter() - started) / (1 + len(MANTISSA_BITS))
    items = sum(int(t.split_mask("test").sum()) for t in tasks) * (model.n_blocks + 1)
    workload = (f"one model's store: {len(tasks)} paradigm(s) x {pairs} pairs (pooled, {model.n_blocks + 1} "
                f"layers) + {tokens} similarity tokens; 1 thread")
    by_reducer = ", ".join(f"{name} {plain_bytes[name] / 1e6:.1f} -> {packed_bytes[name] / 1e6:.1f} MB "
                           f"({plain_bytes[name] / max(packed_bytes[name], 1):.2f}x)" for name in plain_bytes)
    total_ratio = sum(plain_bytes.values()) / sum(packed_bytes.values())
    rows = [{"section": "store", "workload": workload, "ours": "packed entries (Blosc2: byte shuffle + zstd 1), "
             "save + load", "ours_s": sum(packed_s), "baseline": "plain safetensors entries (before), save + load",
             "baseline_s": sum(plain_s), "ratio": sum(plain_s) / sum(packed_s),
             "quality": f"bit-identical values; on disk {sum(plain_bytes.values()) / 1e6:.1f} -> "
                        f"{sum(packed_bytes.values()) / 1e6:.1f} MB ({total_ratio:.2f}x smaller): {by_reducer}",
             "bytes": {"plain": dict(plain_bytes), "packed": dict(packed_bytes)}}]
    noise = flips[MANTISSA_BITS[0]]
    for bits in MANTISSA_BITS[1:]:
        beyond = {place: n for place, n in flips[bits].items() if place not in noise}
        tasks_beyond = sorted({task for task, _ in beyond})
        rows.append({"section": "store", "workload": f"probe tables of {len(tasks)} paradigm(s) from pools "
                     f"rounded to fewer mantissa bits ({items} test predictions, seeds {SEEDS})",
                     "ours": f"pools at {bits} mantissa bits ({(bits + 9) / 32:.2f} of float32's size)",
                     "ours_s": probe_s, "baseline": "pools at float32 (kept)", "baseline_s": probe_s, "ratio": 1.0,
                     "quality": f"{sum(flips[bits].values())} predictions change against {sum(noise.values())} at 21 "
                                f"bits (float noise: {len(noise)} (task, layer) cells); outside those cells "
                                f"{sum(beyond.values())} change, in {len(beyond)} cells of {len(tasks_beyond)} "
                                f"task(s){': ' + ', '.join(tasks_beyond) if tasks_beyond else ''}",
                     "flips": {f"{task}@{layer}": n for (task, layer), n in flips[bits].items()},
                     "noise_flips": {f"{task}@{layer}": n for (task, layer), n in noise.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    from merging.family import build_family

    torch.set_num_threads(1)
    for row in store_rows(build_family(("base",))["base"], args.pairs, args.tokens):
        print(f"{row['ours']}: {row['ours_s']:.2f} s vs {row['baseline']}: {row['baseline_s']:.2f} s; {row['quality']}")


if __name__ == "__main__":
    main()
