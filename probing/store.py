"""The public capture store: one safetensors file per (model content, input set, hook, reducer, settings).

Probing and functional similarity both read it; only the per-model capture step (`capture_model`, run while the
model is loaded for behaviour) writes it. A key names everything a captured value depends on: the model's content
digest, the input set's digest, the hook, the reducer (which carries the storage dtype), the model precision, the
tokenisation length and `CAPTURE_VERSION` (bumped when capture code changes what it stores). Files are written
through a temp file + rename, so an interrupted capture leaves an entry whole or absent. Their tensors are packed
losslessly (`probing.packed`): the same values, so packing changed no key; entries written unpacked still load.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from probing.capture import DEFAULT_BATCH_TOKENS, HookRequest, InputSet, run_capture
from probing.hooks import HookRunner
from probing.packed import pack, unpack
from runstore.atomic import atomic_path, atomic_write_text, read_cached
from runstore.cache import cache_key, record

CAPTURE_VERSION = "2"  # 2: hook requests + reducers, float32/bfloat16 storage (1 stored pooled layers in fp16)
WHOLE_SIZES = "whole"  # the store's folder of per-model sizes of entries found whole (CaptureStore.missing)


@dataclass(frozen=True)
class CaptureKey:
    model_digest: str
    inputs_digest: str
    hook: str
    reducer: str
    precision: str
    max_length: int
    version: str = CAPTURE_VERSION

    @functools.cached_property
    def digest(self) -> str:
        """The key of the fields as a flat dict: what `asdict` gives for these str and int fields, without its
        recursive copy; computed once per key (a warm run needs ~20,000 of them, and `missing` reads each thrice)."""
        return cache_key("capture", {f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class ModelRef:
    """A model as the capture consumers see it: name, folder, content digest and the shape facts keys need."""

    name: str
    folder: Path
    digest: str
    n_blocks: int
    vocab_size: int


def model_ref(name: str, folder: Path, memo_dir: Path | None = None) -> ModelRef:
    """Reads only config.json and the content digest (its memo in `memo_dir`, the run's cache): deciding what is
    cached never loads weights."""
    from transformers import AutoConfig

    from merging.checkpoints import content_digest

    config = AutoConfig.from_pretrained(folder)
    return ModelRef(name, Path(folder), content_digest(folder, memo_dir), config.num_hidden_layers, config.vocab_size)


@dataclass(frozen=True)
class CaptureJob:
    """Hook requests over one input set."""

    inputs: InputSet = field(compare=False)
    requests: tuple[HookRequest, ...]
    batch_tokens: int = DEFAULT_BATCH_TOKENS  # not in the key: batching changes no value beyond fp rounding

    def key(self, request: HookRequest, model_digest: str, precision: str) -> CaptureKey:
        return CaptureKey(model_digest, self.inputs.digest, request.hook, request.reducer.name, precision,
                          self.inputs.max_length)


def _check_header(path: Path) -> bool:
    with safe_open(path, framework="pt"):
        return True


class CaptureStore:
    def __init__(self, root: Path, packed: bool = True):
        """`packed=False` writes entries as the store did before packing (benchmarks and tests compare the two)."""
        self.root = Path(root)
        self.packed = packed

    def path(self, key: CaptureKey) -> Path:
        return self.root / key.digest[:2] / f"{key.digest}.safetensors"

    def has(self, key: CaptureKey) -> bool:
        """Whether a whole entry is stored: opening reads only the header, which safetensors checks against the
        file's length, so an entry cut short (full disk, killed copy) is removed and counts as missing."""
        return read_cached(self.path(key), _check_header) is not None

    def load(self, key: CaptureKey) -> dict[str, torch.Tensor]:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no capture for {key.hook} ({key.reducer}) of model {key.model_digest[:12]} "
                                    f"on inputs {key.inputs_digest[:12]}: the per-model capture step has not run")
        with safe_open(path, framework="pt") as entry:
            return unpack({name: entry.get_tensor(name) for name in entry.keys()}, entry.metadata() or {})

    def save(self, key: CaptureKey, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        packed, layout = pack(tensors) if self.packed else ({k: v.contiguous() for k, v in tensors.items()}, {})
        with atomic_path(self.path(key)) as temp:
            safetensors.torch.save_file(packed, temp, metadata={
                **{k: json.dumps(v) for k, v in asdict(key).items()}, **metadata, **layout})

    def _whole_size(self, key: CaptureKey, recorded: int | None) -> int | None:
        """The size of `key`'s entry when it is whole (its `recorded` size, else checked by `has`), else None."""
        try:
            size = self.path(key).stat().st_size
        except FileNotFoundError:
            return None
        return size if size == recorded or self.has(key) else None

    def whole_sizes(self, model_digest: str) -> Path:
        """The model's list of entries already checked whole, {entry digest: file size} (see `missing`)."""
        return self.root / WHOLE_SIZES / f"{model_digest}.json"

    def missing(self, jobs: Sequence[CaptureJob], model: ModelRef, precision: str) -> list[CaptureJob]:
        """The jobs (each cut down to its missing requests) that still need the model; none missing is reported to
        the run's ledger (beside the store) as a hit of the model's captures (a miss is reported by the caller once
        captured, with the seconds capturing took).

        An entry whose size is the one recorded in the model's `whole_sizes` when it was last found whole counts as
        whole without opening it: entries are written whole or not at all (temp file + rename), so only a cut copy
        changes one, and that changes its size. Others are checked by `has` and then recorded: a warm run of a
        model's ~600 entries stats them instead of reading every header."""
        listed = self.whole_sizes(model.digest)
        known = read_cached(listed, lambda path: json.loads(path.read_text())) or {}
        whole, out = dict(known), []
        for job in jobs:
            requests = []
            for request in job.requests:
                key = job.key(request, model.digest, precision)
                size = self._whole_size(key, known.get(key.digest))
                if size is None:
                    requests.append(request)
                    whole.pop(key.digest, None)
                else:
                    whole[key.digest] = size
            if requests:
                out.append(CaptureJob(job.inputs, tuple(requests), job.batch_tokens))
        if whole != known:
            atomic_write_text(listed, json.dumps(whole, sort_keys=True))
        if not out:
            record(self.root.parent, "captures", model.name, True)
        return out


def capture_model(runner: HookRunner, model: ModelRef, jobs: Sequence[CaptureJob], store: CaptureStore,
                  precision: str, log: Callable[[str], None] = print) -> None:
    """Run every job on the loaded model and store each request's output under its key."""
    for job in jobs:
        outputs = run_capture(runner, job.inputs, job.requests, job.batch_tokens,
                              progress=f"{model.name} {job.inputs.name}")
        for request, tensors in outputs.items():
            store.save(job.key(request, model.digest, precision), tensors,
                       {"model": model.name, "inputs": job.inputs.name})
        log(f"{model.name}: captured {len(job.requests)} hook(s) on {job.inputs.name} through {runner.backend}")
